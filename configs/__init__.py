"""The experiments' configs; installed as the package `eesmm_jax.configs` (see setup.py)."""
