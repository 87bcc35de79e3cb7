"""Test-wide setup. XLA flags must be set before JAX starts, so they live here."""
import os

# Eight simulated CPU devices, so sharding code is exercised without accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
