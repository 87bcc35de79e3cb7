"""The CPU memory allocator of the project's processes: glibc, told to keep freed memory.

XLA:CPU takes each execution's scratch buffer (about 940 MiB for the cpu-small SimMIM step) from
malloc. glibc serves a block that large with a fresh `mmap` and gives it back with `munmap`, so
every step faults every page in again: about 250,000 minor page faults and 0.9 CPU-seconds in the
kernel per step on the 2-core development VM (docs/performance.md).

The entry points that run heavy CPU work call `setup()` first, before JAX, TensorFlow or
PyTorch allocate (`python -m eesmm_jax.main`, the demo, the benchmark, the kernel bench, the
study; pytest's tests/conftest.py): importing the package changes nothing. It tunes glibc's
malloc through `mallopt`, which acts at once (the MALLOC_* environment variables are only read
at process start, so they would need a re-exec):

  M_MMAP_MAX = 0          large blocks come from the heap, not from an mmap of their own
  M_TRIM_THRESHOLD = -1   the heap is never trimmed: a freed block's pages stay mapped for the
                          next step's block
  M_ARENA_MAX = 1         one arena for all threads. glibc's per-thread arenas mmap any block
                          larger than their 64 MiB heaps whatever M_MMAP_MAX says, and XLA
                          allocates on its worker threads. It binds the threads that have not
                          allocated yet, which is why it is set before JAX, TensorFlow or
                          PyTorch start theirs.

The price: the process's resident memory stays at its peak until it exits, and as large blocks
now share one heap with small ones, a fragmented heap can raise that peak (docs/performance.md).

`EESMM_ALLOCATOR=system` leaves the allocator as it comes (`auto`, the default, and `glibc`
tune it). Where the C library is not glibc (macOS, musl) or malloc is not glibc's (an allocator
preloaded with LD_PRELOAD, or linked in), nothing is changed and `describe()` says why and names
the library whose malloc runs. `describe()` is
recorded in every cell of the benchmark; `python -m eesmm_jax.tools.allocator` prints it and the page
faults of writing a 256 MiB block after an equal one was freed (0 when freed memory is kept,
65,536 when it is mapped afresh).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

ENV = "EESMM_ALLOCATOR"
CHOICES = ("auto", "glibc", "system")  # auto and glibc: the same tuning

# glibc's mallopt parameter numbers (<malloc.h>) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_MMAP_MAX, 0, "M_MMAP_MAX=0"), (M_TRIM_THRESHOLD, -1, "M_TRIM_THRESHOLD=-1"),
            (M_ARENA_MAX, 1, "M_ARENA_MAX=1"))

_active: Optional[str] = None


def _symbol(library: Optional[str], name: str):
  try:
    return getattr(ctypes.CDLL(library), name)
  except Exception:  # no such library or symbol (or no dlopen: Windows)
    return None


def glibc_version() -> Optional[str]:
  """glibc's version where it is this process's C library, else None."""
  get = _symbol(None, "gnu_get_libc_version")
  if get is None:
    return None
  get.restype = ctypes.c_char_p
  return get().decode()


def malloc_is_glibc() -> bool:
  """Does `malloc` resolve to glibc's own (not to a preloaded jemalloc, mimalloc, tcmalloc)?"""
  ours, libc = _symbol(None, "malloc"), _symbol("libc.so.6", "malloc")
  address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
  return ours is not None and libc is not None and address(ours) == address(libc)


class _DlInfo(ctypes.Structure):
  _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
              ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> Optional[str]:
  """The file of the shared object whose `malloc` this process calls (dladdr), else None. It is
  not always a preload: an allocator linked into the interpreter or into a library it loads at
  start-up wins the same way (an NVIDIA image's Python did, with LD_PRELOAD unset)."""
  ours, dladdr = _symbol(None, "malloc"), _symbol(None, "dladdr")
  if ours is None or dladdr is None:
    return None
  dladdr.argtypes, dladdr.restype = (ctypes.c_void_p, ctypes.POINTER(_DlInfo)), ctypes.c_int
  info = _DlInfo()
  if not dladdr(ctypes.cast(ours, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
    return None
  return info.dli_fname.decode(errors="replace")


def describe() -> str:
  """The allocator this process runs under, and why, e.g. 'glibc 2.36 (mallopt ...)'."""
  return _active if _active is not None else setup()


def setup() -> str:
  """Tune glibc's malloc once per process (see the module's doc); returns `describe()`'s text."""
  global _active
  if _active is not None:
    return _active
  choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
  version = glibc_version()
  system = f"system{' glibc ' + version if version else ''}"
  if choice not in CHOICES:
    _active = f"{system} ({ENV}={choice!r} is not one of {', '.join(CHOICES)})"
  elif choice == "system":
    _active = f"{system} ({ENV}=system)"
  elif version is None:
    _active = f"system (the C library is not glibc: {sys.platform})"
  elif not malloc_is_glibc():
    _active = f"malloc of {malloc_library() or 'another library'} (not glibc's: left as it is)"
  else:
    mallopt = _symbol(None, "mallopt")
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [text for param, value, text in SETTINGS if mallopt(param, value) != 1]
    _active = (f"glibc {version} (mallopt {' '.join(text for _, _, text in SETTINGS)})"
               if not refused else f"{system} (mallopt refused {' '.join(refused)})")
  return _active


def refault_pages(mib: int = 256) -> tuple[int, int]:
  """Page faults taken to write a `mib` MiB malloc block in a new thread after this thread freed
  an equal one, and the block's page count: 0 when freed memory is kept, about the page count
  when it is unmapped and mapped afresh (glibc's default for blocks this large)."""
  import resource
  import threading
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
  libc.free.argtypes = (ctypes.c_void_p,)
  size = mib << 20
  first = libc.malloc(size)
  ctypes.memset(first, 1, size)
  libc.free(first)
  faults = []

  def again():  # in another thread, as XLA's next step may run on another worker
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(size)
    ctypes.memset(second, 2, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(second)

  thread = threading.Thread(target=again)
  thread.start()
  thread.join()
  return faults[0], size // os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
  print(setup())
  faults, pages = refault_pages()
  print(f"a 256 MiB block written after an equal one was freed: {faults} page faults "
        f"({pages} pages)")
