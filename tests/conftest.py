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

# The CPU allocator (eesmm_jax/allocator.py) is set up when eesmm_jax is imported. glibc's
# one-arena setting only binds threads that have not allocated yet, so import it before
# PyTorch, TensorFlow and JAX start theirs.
import eesmm_jax  # noqa: E402,F401

# torchvision (which timm imports) crashes the interpreter when TensorFlow was loaded first, so
# the PyTorch reference is loaded before any test module pulls TensorFlow in.
try:
  import timm  # noqa: F401
except ImportError:  # the parity tests then fail on their own import, loudly
  pass


# The heaviest files first (seconds each on the 2-core VM, 2026-11-27, sixth session): each
# xdist worker takes whole files in collection order, so a heavy file collected last leaves the
# other worker idle at the end of the run. Longest first is the usual remedy; the rest keep
# their order.
HEAVIEST_FIRST = ("test_scale_out.py",    # 453 s
                  "test_reliability.py",  # 323
                  "test_study.py",        # 296 (262 of it its module fixture's quick run)
                  "test_core.py",         # 293
                  "test_finetune.py",     # 270
                  "test_workdir.py",      # 211
                  "test_train.py",        # 170
                  "test_benchmark.py")    # 162


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)
  items.sort(key=rank)  # stable: tests inside a file keep their order
