"""EESMM, the paper's main run (Sec. 4.1.1): Swin-B, 224 px, window 7, 800 epochs, n = 2.

Run (the paper's hardware, one host with 4 V100s):
  launch/v100x4.sh --config configs/eesmm_swin_base_224.py --workdir $WORK/eesmm_b224 \
      --config.data.data_dir=$TFDS_DATA_DIR

Sec. 4.1.1: batch 256, AdamW (eps 1e-6, wd 0.05), base lr 2e-4, min lr 1e-5 (both scaled by
batch / 512 as SimMIM does), 100 warm-up epochs, cosine, layer decay 0.9 (the paper states it
for pretraining; SimMIM uses none there). The paper mentions gradient accumulation without the
number of steps; we take 256 images per step and accum_steps = 1 (set --config.optim.accum_steps
to emulate a larger batch on fewer devices).

Memory: 64 images (32 blends) per V100 need about 12 GiB per device (1.0 GiB params and AdamW
state, 176 MiB of activations per image): it fits a 32 GB V100 as it is. (XLA's memory analysis of
the float32 step, compiled on CPU at 6 and 12 images per device and extrapolated linearly; a GPU's
buffer assignment differs, and float16 activations (launch/v100x4.sh) should take about half (not
measured). The run's own check, before the first step, is the number that counts: it stops with
the need, the device's memory and the --config.micro_batches that fits;
--config.device_memory_gb=32 asks it for a V100 on any machine.)

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
