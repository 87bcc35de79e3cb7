"""EESMM, the paper's main run (Sec. 4.1.1): Swin-B, 224 px, window 7, 800 epochs, n = 2.

Run (the paper's hardware, one host with 4 V100s):
  launch/v100x4.sh --config configs/eesmm_swin_base_224.py --workdir $WORK/eesmm_b224 \
      --config.data.data_dir=$TFDS_DATA_DIR

Sec. 4.1.1: batch 256, AdamW (eps 1e-6, wd 0.05), base lr 2e-4, min lr 1e-5 (both scaled by
batch / 512 as SimMIM does), 100 warm-up epochs, cosine, layer decay 0.9 (the paper states it
for pretraining; SimMIM uses none there). The paper mentions gradient accumulation without the
number of steps; we take 256 images per step and accum_steps = 1 (set --config.optim.accum_steps
to emulate a larger batch on fewer devices).

Result: not run by us. The paper reports 363 h of pretraining and 83.1 top-1 after fine-tuning.
"""

from eesmm_jax.config import pretrain_config


def get_config():
  c = pretrain_config()
  c.img_size = 224
  c.model.name = "swin_base"
  c.model.window_size = 7
  c.objective.num_mix = 2
  c.batch_size = 256
  c.optim.epochs = 800
  c.optim.warmup_epochs = 100
  c.optim.base_lr = 2e-4
  c.optim.min_lr = 1e-5
  c.optim.layer_decay = 0.9
  return c
