"""Fine-tune a pretrained Swin on ImageNet-1k at 224 px / window 7 (SimMIM's recipe, Sec. 4.1.2).

Run (one host, 4 GPUs; init_from: our pretraining workdir, a SimMIM .pth or a convert dir):
  python -m eesmm_jax.main --config configs/finetune_swin_base_224.py:base_800ep \
      --workdir $WORK/ft_b224 --config.data.data_dir=$TFDS_DATA_DIR \
      --config.init_from=$WORK/eesmm_b192
  # then: --config.mode=eval --config.init_from=$WORK/ft_b224 for top-1 / top-5 alone

Variants (`:arg`):
  base_100ep   Swin-B, drop path 0.1, layer decay 0.9: microsoft/SimMIM
               simmim_finetune__swin_base__img224_window7__100ep (the default)
  base_800ep   Swin-B, drop path 0.2, layer decay 0.8: an 800-epoch pretrained model (the paper's
               EESMM Swin-B, Sec. 4.1.2)
  large_800ep  Swin-L, window 14, drop path 0.3, layer decay 0.8

Recipe: 100 epochs, 20 warm-up, cosine; AdamW (0.9, 0.999, eps 1e-8), wd 0.05, clip 5; base lr
1.25e-3, warm-up / min lr 2.5e-7, all scaled by batch / 512; batch 2048; RandAugment m9 mstd 0.5,
random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1. Pretraining at 192 px / window 6
moves to 224 / 7 with bicubically resized bias tables.

Hardware, time, result: not run by us. The paper reports 83.1% top-1 for EESMM Swin-B (Table 1).
"""

from eesmm_jax.finetune import finetune_config

VARIANTS = {
    "base_100ep": dict(name="swin_base", window_size=7, drop_path_rate=0.1, layer_decay=0.9),
    "base_800ep": dict(name="swin_base", window_size=7, drop_path_rate=0.2, layer_decay=0.8),
    "large_800ep": dict(name="swin_large", window_size=14, drop_path_rate=0.3, layer_decay=0.8),
}


def get_config(arg: str = "base_100ep"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(VARIANTS)}")
  v = VARIANTS[arg]
  c = finetune_config()
  c.img_size = 224
  c.model.name = v["name"]
  c.model.window_size = v["window_size"]
  c.model.drop_path_rate = v["drop_path_rate"]
  c.model.num_classes = 1000
  c.data.dataset = "imagenet2012"
  c.data.split, c.data.eval_split = "train", "validation"
  c.optim.layer_decay = v["layer_decay"]
  c.batch_size = 2048
  c.eval_every = 5 * 625      # every 5 epochs at batch 2048
  c.checkpoint_every = 625
  return c
