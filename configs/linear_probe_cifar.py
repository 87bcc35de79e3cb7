"""Linear probe of a pretrained encoder on CIFAR-10 or CIFAR-100 (arg: cifar10, the default, or
cifar100): frozen features, a linear classifier.

Run after a pretraining (init_from: its workdir, a SimMIM .pth or a convert dir):
  python -m eesmm_jax.main --config configs/linear_probe_cifar.py:cifar10 --workdir $WORK/probe_c10 \
      --config.init_from=$WORK/eesmm_b192

The encoder's pooled features of the 50,000 training and 10,000 test images (centre view, no
augmentation, 192 px / window 6 as pretrained), standardised, then full-batch AdamW on a linear
softmax classifier (eesmm_jax/probe.py); top-1 goes to <workdir>/probe.json. Features are held
in host memory (50,000 x 1,024 floats for Swin-B: 200 MB). A measure of the representation to
track between pretrainings, not the fine-tuned accuracy of Table 2.

Hardware, time, result: not run by us (feature extraction is one forward pass over 60,000
images: minutes on one GPU).
"""

from eesmm_jax.finetune import finetune_config

CLASSES = {"cifar10": 10, "cifar100": 100}


def get_config(dataset="cifar10"):
  if dataset not in CLASSES:
    raise ValueError(f"linear_probe_cifar.py:{dataset}: choose one of {sorted(CLASSES)}")
  c = finetune_config()
  c.mode = "probe"
  c.img_size = 192
  c.model.name = "swin_base"
  c.model.window_size = 6
  c.model.drop_path_rate = 0.0
  c.model.num_classes = CLASSES[dataset]
  c.data.dataset = dataset
  c.data.split, c.data.eval_split = "train", "test"
  c.data.eval_crop_pct = 1.0
  c.eval_batch_size = 256
  c.probe.steps = 1000
  return c
