"""EESMM, the paper's Sec. 4.3 ablation setting: Swin-B, 192 px, window 6, 100 epochs, n = 2.

Run (one host, 4 GPUs):
  python -m eesmm_jax.main --config configs/eesmm_swin_base_192.py \
      --workdir $WORK/eesmm_b192 --config.data.data_dir=$TFDS_DATA_DIR
  # n = 3:  --config.objective.num_mix=3 --config.batch_size=2046

Sec. 4.3: batch 2048 images (1,024 blended samples at n = 2), lr 8e-4 (= 2e-4 x 2048 / 512),
10 warm-up epochs, mask ratio 0.6 in 32 px blocks, L1 loss, independent masks per image,
permutation-invariant assignment of the n decoder outputs (see docs/method.md).

Memory: 512 images (256 blends) per device on 4 GPUs need about 69 GiB per device (1.0 GiB params
and AdamW state, 136 MiB of activations per image: about half of SimMIM's 254); on 4 x 32 GB V100s
--config.micro_batches=4 (about 18 GiB). (XLA's memory analysis of the float32 step, compiled on
CPU at 6 and 12 images per device and extrapolated linearly; a GPU's buffer assignment differs,
and float16 activations (launch/v100x4.sh) should take about half (not measured). The run's own
check, before the first step, is the number that counts: it stops with the need, the device's
memory and the --config.micro_batches that fits; --config.device_memory_gb=32 asks it for a V100
on any machine.)

Result: not run by us. The encoder does half of SimMIM's work per image at n = 2; see
`python -m eesmm_jax.tools.flops` and `python -m eesmm_jax.tools.benchmark` for the measured ratios.
"""

from eesmm_jax.config import pretrain_config


def get_config():
  c = pretrain_config()
  c.img_size = 192
  c.model.name = "swin_base"
  c.model.window_size = 6
  c.objective.num_mix = 2
  c.batch_size = 2048
  c.optim.epochs = 100
  c.optim.warmup_epochs = 10
  return c
