"""Swin-L, 192 px, window 12, 800 epochs on ImageNet-1k (SimMIM's Swin-L recipe); arg: the
method, `eesmm` (n = 2, the default) or `simmim` (n = 1, the baseline).

Run (one host, 4 GPUs):
  python -m eesmm_jax.main --config configs/swin_large_192.py:eesmm \
      --workdir $WORK/eesmm_l192 --config.data.data_dir=$TFDS_DATA_DIR
  python -m eesmm_jax.main --config configs/swin_large_192.py:simmim \
      --workdir $WORK/simmim_l192 --config.data.data_dir=$TFDS_DATA_DIR

SimMIM simmim_pretrain__swin_large__img192_window12__800ep: batch 2048, base lr 1e-4, warm-up
lr 5e-7, 10 warm-up epochs, multistep x0.1 at epoch 700, window 12 (the last stage, 6x6, is one
unshifted window). The two variants differ only in the objective's num_mix and AdamW's eps: the
SimMIM baseline keeps SimMIM's 1e-8, EESMM the 1e-6 its paper uses (optim.py). Result: not run
by us (thousands of GPU-hours).

Memory: 512 images per device on 4 GPUs need about 148 GiB per device for EESMM (2.3 GiB params
and AdamW state, 290 MiB of activations per image; on 4 x 32 GB V100s --config.micro_batches=8,
about 21 GiB) and about 255 GiB for SimMIM (503 MiB per image; --config.micro_batches=16, about
19 GiB). (XLA's memory analysis of the float32 step, compiled on CPU at 6 and 12 images per
device and extrapolated linearly; a GPU's buffer assignment differs, and float16 activations
(launch/v100x4.sh) should take about half (not measured). The run's own check, before the first
step, is the number that counts: it stops with the need, the device's memory and the
--config.micro_batches that fits; --config.device_memory_gb=32 asks it for a V100 on any machine.)
"""

from eesmm_jax.config import pretrain_config

METHODS = {"eesmm": 2, "simmim": 1}


def get_config(method="eesmm"):
  if method not in METHODS:
    raise ValueError(f"swin_large_192.py:{method}: the method must be one of {sorted(METHODS)}")
  c = pretrain_config()
  c.img_size = 192
  c.model.name = "swin_large"
  c.model.window_size = 12
  c.objective.num_mix = METHODS[method]
  c.batch_size = 2048
  c.optim.epochs = 800
  c.optim.warmup_epochs = 10
  c.optim.base_lr = 1e-4
  c.optim.warmup_lr = 5e-7
  c.optim.schedule = "multistep"
  c.optim.multistep_milestones = (700,)
  if method == "simmim":
    c.optim.eps = 1e-8
  return c
