"""What every input path shares, TF-free: the data config, the ImageNet statistics, a split's
`Source` record, the rows a process takes of each global batch, and the on-device normalisation."""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
NAMED_DATASETS = ("imagenet2012", "cifar10", "cifar100", "folder", "synthetic", "shards",
                  "fashion_mnist", "mnist")
# Read from IDX files into memory by numpy (`idx`): no TensorFlow.
IDX_DATASETS = ("fashion_mnist", "mnist")


def default_data_config() -> ml_collections.ConfigDict:
  """SimMIM's pretraining input at 192 px."""
  c = ml_collections.ConfigDict()
  # 'imagenet2012' | 'cifar10' | 'cifar100' | 'folder' | 'synthetic' | 'shards' | 'fashion_mnist' |
  # 'mnist' (IDX files, numpy) | any TFDS image dataset by name, optionally written 'tfds:<name>'
  # (e.g. 'tfds:oxford_flowers102'). 'shards': a split prepared once by `python -m
  # eesmm_jax.prepare` (data/shards.py), read without TensorFlow, cropped and flipped on the
  # device (pretraining only).
  c.dataset = "imagenet2012"
  # TFDS data_dir (imagenet2012 needs it: manual download), the image folder for 'folder':
  # data_dir/split/<class>/<image> (ImageFolder layout, labelled) or a folder of images, the
  # shard directory for 'shards' (one split: config.split is not read), or the folder of the IDX
  # files ('fashion_mnist': default the Debian package's).
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.split = "train"
  c.img_size = 192
  c.crop_scale = (0.67, 1.0)
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.shuffle_buffer = 10_000     # encoded examples per process (TFDS); folders shuffle fully
  c.seed = 0
  c.num_parallel_calls = -1     # -1 = tf.data.AUTOTUNE; 'shards': reader threads, -1 = the CPUs
  c.cache = False               # keep the encoded examples in memory (TFDS: after the first epoch;
                                # folders: every file read once at the start, so small ones only)
  c.prefetch = -1               # batches; -1 = AUTOTUNE ('shards': 2), 0 = none
  c.synthetic_examples = 1_281_167  # the 'epoch' of 'synthetic' (ImageNet-1k train size)
  c.eval_crop_pct = 0.875       # evaluation: resize to img_size / crop_pct, centre crop
  return c


def finetune_data_config() -> ml_collections.ConfigDict:
  """The pretraining data config with the fine-tuning crop and an evaluation split."""
  c = default_data_config()
  c.img_size = 224
  c.crop_scale = (0.08, 1.0)
  c.eval_split = "validation"
  # The IDX datasets' fine-tuning view: pixels of zero padding around its random crop (None =
  # img_size // 8, the usual 4 at 32 px; 0 = no crop, the flip only).
  c.crop_padding = ml_collections.config_dict.placeholder(int)
  return c


@dataclasses.dataclass(frozen=True)
class Source:
  """A split opened once for a run: its size over all processes, the files a folder leaves out
  [(path, why)], and a folder's listing (paths, labels or None, class names) or the opened
  shards (`shards.Shards`), which the input then reads instead of listing the folder again.
  `image_size`: the side of prepared shards' stored images, which the train step crops and
  resizes to img_size (`device_augment`); None where the input delivers img_size already."""
  num_examples: int
  bad_images: list = dataclasses.field(default_factory=list)
  listing: Optional[object] = None
  image_size: Optional[int] = None


def process_rows(global_batch: int, process_index: Optional[int],
                 process_count: Optional[int]) -> tuple[int, int]:
  """-> (first row, rows) of this process in every global batch; JAX's process by default."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} is not divisible by process_count "
                     f"{process_count}")
  local = global_batch // process_count
  return process_index * local, local


def normalize(images):
  """uint8 pixels -> ImageNet mean/std normalised float32 (torchvision's ToTensor + Normalize),
  as the first op of the step: pretraining batches cross to the device as uint8, a quarter of
  float32's bytes. Floating-point images are taken as normalised already and returned as they
  are (the benchmark's device-made batches, the tests' arrays)."""
  import jax.numpy as jnp
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) / 255.0 - jnp.asarray(MEAN_RGB)) / jnp.asarray(STDDEV_RGB)
