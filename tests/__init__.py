"""Shared by the tests and their subprocesses."""

# LLVM's optimisation level 0 for XLA:CPU's kernels. The suite's time is mostly compiling small
# programs once (a tiny Swin train step: 21 s at the default level, 11.5 s at 0, measured on the
# 2-core VM), not running them. The HLO is the same at every level; float32 results differ by
# rounding only (a tiny EESMM step's loss and gradients: 3.2e-7 relative L2 between -O0 and -O2),
# inside every parity tolerance.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
