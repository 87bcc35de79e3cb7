"""eesmm_jax: EESMM (superposition-masked SimMIM) pretraining of Swin Transformers in JAX/Flax.

Importing it changes nothing in the process: the entry points that want the CPU allocator
(`tools/allocator.py`) set it up themselves.
"""
