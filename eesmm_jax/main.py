"""Command line: `python -m eesmm_jax.main --config configs/<file>.py[:arg] --workdir DIR
[--config.<key>=<value> ...]`. The config is locked, so a misspelt key is an error.
`config.mode` picks the run: pretraining (no `mode` key, or 'pretrain'), or 'finetune', 'eval'
or 'probe' (eesmm_jax/finetune.py).

Several processes (SLURM, a TPU pod, or `launch/local_multiprocess.sh`) are detected from the
environment and joined with `jax.distributed.initialize()` before JAX touches a device.
"""

import logging as std_logging
import os

from eesmm_jax import cli

cli.quiet_tensorflow()  # before anything loads TensorFlow

if __name__ == "__main__":  # before JAX and TensorFlow allocate (tools/allocator.py says why)
  from eesmm_jax.tools import allocator
  allocator.setup()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and pictures go here; a run resumes "
                    "from it when it holds a checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

def launched_as_several_processes() -> bool:
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or
              "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed() -> None:
  """jax.distributed.initialize(), given process ids by our launcher or found by JAX itself."""
  import jax
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU processes (tests, the local launcher) all-reduce through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if "JAX_NUM_PROCESSES" in os.environ:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def quiet_libraries() -> None:
  """The console is the progress line and our one-line errors: library INFO logs (Orbax's) come
  with --verbosity=0. Orbax's and asyncio's error logs, dozens of lines per failed checkpoint
  write, are left out too: every failed save or restore is reported as one CheckpointError."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(
      lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)


def main(argv):
  del argv
  import jax
  if not FLAGS["verbosity"].present:
    quiet_libraries()
  if launched_as_several_processes():
    initialize_distributed()
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} devices "
          f"({jax.devices()[0].device_kind})", flush=True)
  mode = FLAGS.config.get("mode", "pretrain")
  if mode == "pretrain":
    from eesmm_jax import train
    train.pretrain(FLAGS.config, FLAGS.workdir)
  else:  # 'finetune', 'eval', 'probe' (configs/finetune_*.py, configs/linear_probe_*.py)
    from eesmm_jax import finetune
    finetune.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  # An expected error (a bad config value, a checkpoint that cannot be written) is one line.
  app.run(lambda argv: cli.run_main(main, argv))
