"""The package's layout, read from its source: imports flow one way, tools stay apart.

Every `import` and `from ... import` of every module is read with `ast`, those inside functions
too (a lazy import is still a dependency), and resolved to the project's modules.
"""
import ast
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "eesmm_jax"
ROOT_NAME = "eesmm_jax"


def module_names() -> dict[str, pathlib.Path]:
  names = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join(parts)] = path
  # configs/ is installed as eesmm_jax.configs (setup.py's package_dir).
  for path in (PACKAGE.parent / "configs").glob("*.py"):
    stem = path.stem
    names["eesmm_jax.configs" + ("" if stem == "__init__" else "." + stem)] = path
  return names


def imports_of(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
  """The project's modules that `name` (at `path`) imports, anywhere in its body."""
  is_package = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the importing module's package
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:  # `import eesmm_jax.x.y` names eesmm_jax.x.y
        target = target.rpartition(".")[0]
      if target.startswith(ROOT_NAME) and target != name:
        out.add(target)
  return out


def import_graph() -> dict[str, set[str]]:
  names = module_names()
  return {name: imports_of(path, name, set(names)) for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_walk_finds_the_imports_it_should():
  """The reader itself: lazy, aliased and `from package import module` imports all count."""
  graph = import_graph()
  assert "eesmm_jax.data.tfdata" in graph["eesmm_jax.data"]         # lazy, inside a function
  assert "eesmm_jax.step" in graph["eesmm_jax.train"]               # `step as step_lib`
  assert "eesmm_jax.data.common" in graph["eesmm_jax.data.tfdata"]  # `from pkg.mod import X`
  assert len(graph) > 30, sorted(graph)


def test_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_its_way_back_to_itself():
  assert cycles(import_graph()) == []


def test_the_library_does_not_import_the_tools():
  """tools/ (benchmark, study, demo, kernel bench, FLOPs, allocator) build on the library, never
  the reverse; only the trainer's command line sets up the allocator, as every entry point."""
  allowed = {("eesmm_jax.main", "eesmm_jax.tools.allocator")}
  wrong = sorted((name, dep) for name, deps in import_graph().items()
                 if not name.startswith("eesmm_jax.tools")
                 for dep in deps if dep.startswith("eesmm_jax.tools")
                 and (name, dep) not in allowed)
  assert wrong == []


@pytest.mark.parametrize("package", ["eesmm_jax.models", "eesmm_jax.ops"])
def test_models_and_kernels_know_nothing_of_training(package):
  """What is learned (models/) and how it is computed (ops/) import no trainer, data or tool."""
  graph = import_graph()
  inner = ("eesmm_jax.models", "eesmm_jax.ops")
  # The weights loader reads the converter's layouts (convert sits beside the models).
  allowed = {"eesmm_jax.convert"}
  wrong = sorted((name, dep) for name, deps in graph.items()
                 if name == package or name.startswith(package + ".")
                 for dep in deps if not dep.startswith(inner) and dep not in allowed)
  assert wrong == []


def test_every_module_is_reached_by_the_walk():
  on_disk = {p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
  assert on_disk <= set(module_names().values()), sorted(
      os.fspath(p) for p in on_disk - set(module_names().values()))
