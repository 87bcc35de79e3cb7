"""The CPU allocator (eesmm_jax/tools/allocator.py): on in a process started by an entry point
and in this pytest process; off with EESMM_ALLOCATOR=system; never changed by an import."""
import os
import re
import subprocess
import sys

import pytest

from eesmm_jax.tools import allocator

glibc_only = pytest.mark.skipif(
    allocator.glibc_version() is None or not allocator.malloc_is_glibc(),
    reason="the allocator is tuned where malloc is glibc's")


def run_module(**env) -> tuple[str, int, int]:
  """`python -m eesmm_jax.tools.allocator` in a fresh process: (what is active, page faults of writing
  a 256 MiB block after an equal one was freed, the block's pages)."""
  clean = {k: v for k, v in os.environ.items() if k != allocator.ENV}
  out = subprocess.run([sys.executable, "-m", "eesmm_jax.tools.allocator"], env={**clean, **env},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  active, check = out.stdout.strip().splitlines()
  _, faults, pages = (int(n) for n in re.findall(r"\d+", check))  # 256 MiB, faults, pages
  return active, faults, pages


@glibc_only
def test_readme_way_keeps_freed_memory_and_system_opts_out():
  active, faults, pages = run_module()
  assert active == (f"glibc {allocator.glibc_version()} "
                    "(mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD=-1 M_ARENA_MAX=1)"), active
  assert faults < pages // 16, (active, faults, pages)

  active, system_faults, _ = run_module(EESMM_ALLOCATOR="system")
  assert active == f"system glibc {allocator.glibc_version()} (EESMM_ALLOCATOR=system)", active
  # glibc as it comes unmaps the freed block and faults every page of the new one in again
  # (every 4 KiB page; where the kernel backs it with huge pages, every 2 MiB one).
  assert system_faults > faults, (faults, system_faults)


@glibc_only
def test_this_pytest_process_is_tuned():
  if os.environ.get(allocator.ENV, "auto") == "system":
    pytest.skip("EESMM_ALLOCATOR=system")
  assert allocator.describe().startswith("glibc"), allocator.describe()
  faults, pages = allocator.refault_pages()
  assert faults < pages // 16, (allocator.describe(), faults, pages)


@glibc_only
def test_glibc_is_auto():
  assert run_module(EESMM_ALLOCATOR="glibc")[0] == run_module()[0]


def test_unknown_choice_changes_nothing():
  active, _, _ = run_module(EESMM_ALLOCATOR="tcmalloc")
  assert active.startswith("system") and "EESMM_ALLOCATOR='tcmalloc' is not one of" in active


@glibc_only
def test_malloc_library_names_the_file_whose_malloc_runs():
  # Where another allocator wins, describe() names it from here (checked by hand with
  # LD_PRELOAD=libjemalloc.so.2: "malloc of /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ...").
  assert os.path.basename(allocator.malloc_library()).startswith("libc.so")


@glibc_only
def test_importing_the_package_changes_no_allocator_setting():
  """`import eesmm_jax` (and every library module) leaves malloc as glibc ships it: the freed
  block is unmapped, so writing the next one faults its pages in again."""
  code = ("import sys, eesmm_jax, eesmm_jax.main, eesmm_jax.train, eesmm_jax.finetune; "
          "assert 'eesmm_jax.tools.allocator' not in sys.modules, 'imported the allocator'; "
          "from eesmm_jax.tools import allocator; "
          "assert allocator._active is None, allocator._active; "
          "print(*allocator.refault_pages())")
  clean = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "MALLOC_ARENA_MAX")}
  out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  faults, pages = (int(n) for n in out.stdout.split()[-2:])
  assert faults > pages // 4, (faults, pages)
