"""The embedded demo: EESMM (n = 2) pretraining of a small Swin on scikit-learn's digits.

Run (what the README's demo command does):
  python -m eesmm_jax.tools.demo --workdir /tmp/eesmm_demo

The 1,797 real 8x8 digit images are written once as 32x32 PNGs in the image-folder layout and
read through the same tf.data 'folder' path as every other source. A 2-stage Swin (patch 2,
window 4, widths 48/96) learns to recover two blended, 60%-masked digits; the run ends with a
linear probe of its features against the same encoder at random initialisation.

Hardware and result: see the README's demo section (2 CPU cores).
"""

from eesmm_jax.config import pretrain_config


def get_config():
  c = pretrain_config()
  c.img_size = 32
  c.model.name = "swin_tiny"
  c.model.patch_size = 2
  c.model.window_size = 4
  c.model.embed_dim = 48
  c.model.depths = (2, 2)
  c.model.num_heads = (3, 6)
  c.objective.num_mix = 2
  c.objective.mask_patch_size = 8
  c.batch_size = 128
  c.data.dataset = "folder"
  c.data.split = "train"
  c.data.crop_scale = (0.67, 1.0)
  c.data.shuffle_buffer = 2048
  c.optim.base_lr = 1e-3 * 512 / 128     # 1e-3 after SimMIM's batch / 512 scaling
  c.optim.warmup_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 5
  c.optim.epochs = 50
  c.log_every = 50
  c.picture_every = 500
  c.checkpoint_every = 500
  return c
