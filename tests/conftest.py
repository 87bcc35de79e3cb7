"""Test-wide setup. XLA flags must be set before JAX starts, so they live here."""
import os

# Eight simulated CPU devices, so sharding code is exercised without accelerators; kernels
# compiled at LLVM -O0 (tests/__init__.py says why). Subprocesses inherit these.
from tests import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Tests compile the same small programs many times (every resumed run recompiles its step):
# a persistent compilation cache turns the repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# pytest-xdist's workers are started by this process, and their I/O threads allocate before
# a worker imports eesmm_jax: glibc's one-arena setting reaches them only as a variable read at
# process start (the rest of the tuning, mallopt at import, applies whenever it runs).
os.environ.setdefault("MALLOC_ARENA_MAX", "1")

# The CPU allocator (eesmm_jax/tools/allocator.py), as the entry points set it up: glibc's
# one-arena setting only binds threads that have not allocated yet, so before PyTorch,
# TensorFlow and JAX start theirs.
from eesmm_jax.tools import allocator  # noqa: E402

allocator.setup()

# torchvision (which timm imports) crashes the interpreter when TensorFlow was loaded first, so
# the PyTorch reference is loaded before any test module pulls TensorFlow in.
try:
  import timm  # noqa: F401
except ImportError:  # the parity tests then fail on their own import, loudly
  pass


# Longest files first: each xdist worker takes whole files in collection order, so a heavy file
# collected last leaves the other worker idle at the end of the run. How long each file took is
# read from pytest's own cache (written at the end of every run); a file the cache does not know
# yet goes first if it is marked slow.
DURATIONS_KEY = "eesmm/seconds_per_file"


def pytest_collection_modifyitems(config, items):
  seconds = config.cache.get(DURATIONS_KEY, {}) if config.cache else {}
  unknown_slow = max(seconds.values(), default=0.0) + 1.0

  def rank(item):
    path = item.nodeid.split("::")[0]
    if path in seconds:
      return -seconds[path]
    return -unknown_slow if item.get_closest_marker("slow") else 0.0
  items.sort(key=rank)  # stable: tests inside a file keep their order


_config = None  # this process's pytest config: the report hook receives none


def pytest_configure(config):
  global _config
  _config, config._eesmm_seconds = config, {}


def pytest_runtest_logreport(report):
  # On the controlling process (xdist forwards its workers' reports) and in a plain run alike.
  seconds = _config._eesmm_seconds
  path = report.nodeid.split("::")[0]
  seconds[path] = seconds.get(path, 0.0) + report.duration


def pytest_unconfigure(config):
  if hasattr(config, "workerinput") or not config.cache or not config._eesmm_seconds:
    return
  merged = {**config.cache.get(DURATIONS_KEY, {}), **config._eesmm_seconds}
  config.cache.set(DURATIONS_KEY, {k: round(v, 1) for k, v in merged.items()})
