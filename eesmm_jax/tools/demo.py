"""The embedded demo: EESMM pretraining on real images, then a linear probe, on a laptop CPU.

  python -m eesmm_jax.tools.demo --workdir /tmp/eesmm_demo [--config.total_steps=...]

1. Writes scikit-learn's 1,797 digit images once as PNGs in the image-folder layout.
2. Pretrains configs/demo.py on them through the normal trainer (checkpoints, metrics.jsonl,
   TensorBoard, reconstruction PNGs in the workdir; a second run resumes).
3. Linear-probes the pretrained encoder and the same encoder at random initialisation on the
   digits' fixed train/test split, and prints both accuracies.
"""

import importlib.resources
import os
import time

if __name__ == "__main__":  # before JAX and TensorFlow allocate (tools/allocator.py says why)
  from eesmm_jax.tools import allocator
  allocator.setup()

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from eesmm_jax import cli, data, probe as probe_lib, step as step_lib, train
from eesmm_jax.tools import images

# configs/ is installed as the package eesmm_jax.configs (setup.py), so the demo finds its
# config from any install, editable or not.
DEMO_CONFIG = str(importlib.resources.files("eesmm_jax.configs") / "demo.py")
config_flags.DEFINE_config_file("config", DEMO_CONFIG, "Demo config file.", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/eesmm_demo", "Where the run and its data go.")
FLAGS = flags.FLAGS


def probe(config, encoder_params, seed: int) -> dict:
  """Linear-probe accuracies on the digits test split: pretrained vs random-init encoder."""
  encoder = step_lib.create_encoder(config, num_classes=0, use_mask_token=True)
  x = np.zeros((1, config.img_size, config.img_size, 3), np.float32)
  random_params = encoder.init(jax.random.PRNGKey(seed + 1), x)["params"]

  def features(params, split):
    batches = data.create_eval_iterator(config.data, 256, split=split)
    return probe_lib.extract_features(encoder, params, batches)

  num_classes = 10
  out = {}
  for name, params in (("pretrained", encoder_params), ("random_init", random_params)):
    out[name] = probe_lib.linear_probe_accuracy(features(params, "train"),
                                                features(params, "test"), num_classes)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the demo shows its progress line, not library logs
  config = FLAGS.config
  workdir = os.path.abspath(FLAGS.workdir)
  data_dir = images.write_digits_folder(os.path.join(workdir, "digits"))
  with config.unlocked():
    config.data.data_dir = data_dir
  start = time.time()
  state = train.pretrain(config, workdir)
  trained = time.time() - start
  accuracy = probe(config, state.params["encoder"], config.seed)
  print(f"\npretraining: {int(state.step)} steps in {trained:.0f} s; outputs in {workdir} "
        f"(metrics.jsonl, tensorboard/, pictures/, checkpoints/)")
  print(f"linear probe on the digits test split (360 images):\n"
        f"  EESMM-pretrained encoder: {accuracy['pretrained']:.1%}\n"
        f"  same encoder, random init: {accuracy['random_init']:.1%}")


if __name__ == "__main__":
  app.run(lambda argv: cli.run_main(main, argv))
