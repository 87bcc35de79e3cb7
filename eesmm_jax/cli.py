"""What every command line does with an error it expects: one line, an exit status, no traceback.

    if __name__ == "__main__":
      cli.run_main(main)                       # argparse: main(argv=None)
      app.run(lambda argv: cli.run_main(main, argv))   # absl

An expected error is one a person can act on from its message: a ValueError about a config value
or a path (ConversionError is one), an OSError, or one of the run errors below (a checkpoint that
cannot be written or read, a non-finite loss, an output the disk refused, a workdir in use or
with a corrupt record).
It prints `error: <message>` on stderr and exits 2 for a ValueError (a usage or config error),
else 1; Ctrl-C outside the trainer's own handling exits 130 with `interrupted (Ctrl-C)`. The
traceback comes too under `--verbosity=1` (absl's `-v 1`) or `EESMM_TRACEBACK=1`: anything else
is a bug and keeps Python's usual report.

Imports nothing of the trainer: the run errors are told apart by the modules that define them,
where those were loaded at all (an error of a module never imported cannot have been raised).
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Callable

# module -> the names of its error classes that end a run with a one-line message (exit 1).
RUN_ERRORS = {
    "eesmm_jax.checkpoints": ("CheckpointError",),
    "eesmm_jax.step": ("NonFiniteError",),
    "eesmm_jax.metrics": ("OutputError",),
    "eesmm_jax.workdir": ("WorkdirInUse", "CorruptRecord"),
}
USAGE, FAILED, INTERRUPTED = 2, 1, 130


def _run_error_classes() -> tuple[type, ...]:
  classes = []
  for module, names in RUN_ERRORS.items():
    loaded = sys.modules.get(module)
    classes.extend(getattr(loaded, n) for n in names if loaded is not None and hasattr(loaded, n))
  return tuple(classes)


def exit_status(e: BaseException) -> int | None:
  """2 for a usage or config error, 1 for another expected error, None for anything else."""
  if isinstance(e, ValueError):
    return USAGE
  if isinstance(e, (OSError, MemoryError) + _run_error_classes()):
    return FAILED
  return None


def wants_traceback() -> bool:
  """EESMM_TRACEBACK=1, or absl's --verbosity=1 (-v 1) on a command line that parsed it."""
  if os.environ.get("EESMM_TRACEBACK", "").strip() not in ("", "0"):
    return True
  try:
    from absl import flags
    f = flags.FLAGS
    return f.is_parsed() and f["verbosity"].present and f.verbosity >= 1
  except Exception:  # noqa: BLE001 - no absl, or no such flag: not asked for
    return False


def one_line(e: BaseException) -> str:
  """The message's first line; a longer one says where the rest is."""
  text = str(e).strip() or type(e).__name__
  first, _, rest = text.partition("\n")
  return first + (" (more with EESMM_TRACEBACK=1)" if rest.strip() else "")


def _leave(status: int, message: str, hard: bool) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  if hard:
    # A failed checkpoint write leaves Orbax coroutines behind, which print their own
    # tracebacks at interpreter shutdown: out without one.
    os._exit(status)
  raise SystemExit(status)


@contextlib.contextmanager
def one_line_errors():
  """Expected errors inside -> `error: <message>` and the exit status (see the module)."""
  try:
    yield
  except KeyboardInterrupt:
    if wants_traceback():
      traceback.print_exc()
    _leave(INTERRUPTED, "interrupted (Ctrl-C)", hard=False)
  except Exception as e:  # noqa: BLE001 - sorted just below; the rest is re-raised untouched
    status = exit_status(e)
    if status is None:
      raise
    if wants_traceback():
      traceback.print_exc()
    checkpoints = sys.modules.get("eesmm_jax.checkpoints")
    hard = checkpoints is not None and isinstance(e, checkpoints.CheckpointError)
    _leave(status, f"error: {one_line(e)}", hard)


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ start-up lines off the console; call before TensorFlow loads.

  TF_CPP_MIN_LOG_LEVEL alone does not: the 'oneDNN custom operations are on' line is logged
  before TensorFlow reads it. Turning those operations off removes the line, and costs nothing
  here: TensorFlow only decodes and augments the input (and clu's TensorBoard writer imports
  it), none of it a oneDNN matmul or convolution. Either variable set by the user is kept."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def run_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)` inside `one_line_errors`, TensorFlow quiet (`quiet_tensorflow`); its
  result (an exit status) returned."""
  quiet_tensorflow()
  with one_line_errors():
    return fn(*args, **kwargs)
