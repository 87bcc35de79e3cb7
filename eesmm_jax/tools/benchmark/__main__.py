"""`python -m eesmm_jax.tools.benchmark`: the allocator set up before JAX, TensorFlow or PyTorch
allocate (tools/allocator.py says why), then the runner."""
from eesmm_jax.tools import allocator

allocator.setup()

from eesmm_jax import cli  # noqa: E402
from eesmm_jax.tools.benchmark import runner  # noqa: E402

raise SystemExit(cli.run_main(runner.main))
