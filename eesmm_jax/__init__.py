"""eesmm_jax: EESMM (superposition-masked SimMIM) pretraining of Swin Transformers in JAX/Flax."""

import sys as _sys

# First, before JAX, TensorFlow or PyTorch allocate anything: the CPU allocator that keeps freed
# memory (allocator.py). Every `python -m eesmm_jax.<module>` imports this file before its module,
# so this one call covers main, the demo, the benchmark, the study and any later entry point.
# (`python -m eesmm_jax.allocator` sets itself up, as __main__.)
if "eesmm_jax.allocator" not in getattr(_sys, "orig_argv", ()):
  from eesmm_jax import allocator as _allocator

  _allocator.setup()
