"""SimMIM baseline at 224 px, window 7 (the paper's "SimMIM224" column), Swin-B, 100 epochs.

Run:
  python -m eesmm_jax.main --config configs/simmim_swin_base_224.py \
      --workdir $WORK/simmim_b224 --config.data.data_dir=$TFDS_DATA_DIR

Same recipe as simmim_swin_base_192.py at 224/window 7 (7x7 mask blocks of 32 px).
Result: not run by us. The paper quotes 2.8 GPU-hours per epoch for SimMIM224 (Sec. 4.2);
`python -m eesmm_jax.benchmark` measures ours beside EESMM on the same hardware.
"""

from eesmm_jax.config import pretrain_config


def get_config():
  c = pretrain_config()
  c.img_size = 224
  c.model.name = "swin_base"
  c.model.window_size = 7
  c.objective.num_mix = 1
  c.batch_size = 2048
  c.optim.eps = 1e-8
  c.optim.epochs = 100
  c.optim.warmup_epochs = 10
  return c
