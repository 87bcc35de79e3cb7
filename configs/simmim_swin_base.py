"""SimMIM baseline, Swin-B, 100 epochs on ImageNet-1k (SimMIM's own recipe); arg: the image
size, 192 (window 6, the default) or 224 (window 7, the paper's "SimMIM224" column).

Run (one host, 4 GPUs):
  python -m eesmm_jax.main --config configs/simmim_swin_base.py:192 \
      --workdir $WORK/simmim_b192 --config.data.data_dir=$TFDS_DATA_DIR

Recipe (microsoft/SimMIM simmim_pretrain__swin_base__img192_window6__100ep): batch 2048, AdamW
(0.9, 0.999, eps 1e-8), wd 0.05, base lr 2e-4 / warm-up lr 1e-6 / min lr 1e-5 all scaled by
batch / 512, 10 warm-up epochs, cosine, clip 5.0, mask 0.6 in 32 px blocks, L1, no drop path.
This is the n = 1 case of the same objective code as EESMM. At 224 the mask grid is 7x7 blocks.

Memory: 2048 images per step is 512 per V100 on 4 of them, four times SimMIM's own 128 per GPU (16
GPUs). Per device at 512 images: about 128 GiB at 192 (1.0 GiB params and AdamW state, 254 MiB of
activations per image), 196 GiB at 224 (389 MiB per image). On 4 x 32 GB V100s:
--config.micro_batches=8 (about 17 GiB at 192, 26 GiB at 224; the same 2048-image update), or
--config.model.remat=full for fewer activations. (XLA's memory analysis of the float32 step,
compiled on CPU at 6 and 12 images per device and extrapolated linearly; a GPU's buffer assignment
differs, and float16 activations (launch/v100x4.sh) should take about half (not measured). The
run's own check, before the first step, is the number that counts: it stops with the need, the
device's memory and the --config.micro_batches that fits; --config.device_memory_gb=32 asks it for
a V100 on any machine.)

Result: not run by us. The paper's Table 1 puts SimMIM192 Swin-B at 1,609 hours of pretraining;
Sec. 4.2 quotes 2.8 GPU-hours per epoch for SimMIM224. `python -m eesmm_jax.tools.benchmark` measures
ours beside EESMM on the same hardware.
"""

from eesmm_jax.config import pretrain_config

WINDOWS = {192: 6, 224: 7}


def get_config(img_size="192"):
  size = int(img_size)
  if size not in WINDOWS:
    raise ValueError(f"simmim_swin_base.py:{img_size}: the image size must be one of "
                     f"{sorted(WINDOWS)}")
  c = pretrain_config()
  c.img_size = size
  c.model.name = "swin_base"
  c.model.window_size = WINDOWS[size]
  c.objective.num_mix = 1
  c.batch_size = 2048
  c.optim.eps = 1e-8
  c.optim.epochs = 100
  c.optim.warmup_epochs = 10
  return c
