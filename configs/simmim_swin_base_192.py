"""SimMIM baseline: Swin-B, 192 px, window 6, 100 epochs on ImageNet-1k (SimMIM's own recipe).

Run (one host, 4 GPUs):
  python -m eesmm_jax.main --config configs/simmim_swin_base_192.py \
      --workdir $WORK/simmim_b192 --config.data.data_dir=$TFDS_DATA_DIR

Recipe (microsoft/SimMIM simmim_pretrain__swin_base__img192_window6__100ep): batch 2048, AdamW
(0.9, 0.999, eps 1e-8), wd 0.05, base lr 2e-4 / warm-up lr 1e-6 / min lr 1e-5 all scaled by
batch / 512, 10 warm-up epochs, cosine, clip 5.0, mask 0.6 in 32 px blocks, L1, no drop path.
This is the n = 1 case of the same objective code as EESMM.

Result: not run by us (the paper's Table 1 puts SimMIM192 Swin-B at 1,609 hours of pretraining).
"""

from eesmm_jax.config import pretrain_config


def get_config():
  c = pretrain_config()
  c.img_size = 192
  c.model.name = "swin_base"
  c.model.window_size = 6
  c.objective.num_mix = 1
  c.batch_size = 2048
  c.optim.eps = 1e-8
  c.optim.epochs = 100
  c.optim.warmup_epochs = 10
  return c
