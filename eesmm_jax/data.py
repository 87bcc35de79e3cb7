"""What is fed: the data config, its checks and sizes, and the pretraining batches, TF-free.

Every run asks this module for its input. The 'synthetic' source is numpy, so a pretraining run
on it (and the benchmark, the FLOPs count, the converter and the model) needs neither TensorFlow
nor TFDS: the accelerator images this project is run on carry JAX, Flax, Optax and Orbax but no
TensorFlow. Real images (an image folder, TFDS) go through tf.data in `input_pipeline`, which is
imported only when such a source is asked for.

The synthetic stream follows the folder stream's rule (see `input_pipeline`): global position i
is an image drawn from (seed, i), and step k's global batch is positions [k * B, (k + 1) * B), of
which process p takes rows [p * b, (p + 1) * b). So it is a pure function of (seed, step), the
same on any number of processes, and resumes at any step with nothing to skip.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import ml_collections
import numpy as np

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
NAMED_DATASETS = ("imagenet2012", "cifar10", "cifar100", "folder", "synthetic")


def default_data_config() -> ml_collections.ConfigDict:
  """SimMIM's pretraining input at 192 px."""
  c = ml_collections.ConfigDict()
  # 'imagenet2012' | 'cifar10' | 'cifar100' | 'folder' | 'synthetic' | any TFDS image dataset by
  # name, optionally written 'tfds:<name>' (e.g. 'tfds:oxford_flowers102').
  c.dataset = "imagenet2012"
  # TFDS data_dir (imagenet2012 needs it: manual download), or the image folder for 'folder':
  # data_dir/split/<class>/<image> (ImageFolder layout, labelled) or a folder of images.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.split = "train"
  c.img_size = 192
  c.crop_scale = (0.67, 1.0)
  c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.shuffle_buffer = 10_000     # encoded examples per process (TFDS); folders shuffle fully
  c.seed = 0
  c.num_parallel_calls = -1     # -1 = tf.data.AUTOTUNE
  c.cache = False               # keep the encoded examples in memory (TFDS: after the first epoch;
                                # folders: every file read once at the start, so small ones only)
  c.prefetch = -1               # batches; -1 = AUTOTUNE, 0 = none
  c.synthetic_examples = 1_281_167  # the 'epoch' of 'synthetic' (ImageNet-1k train size)
  c.eval_crop_pct = 0.875       # evaluation: resize to img_size / crop_pct, centre crop
  return c


def _tf_pipeline():
  from eesmm_jax import input_pipeline  # TensorFlow: only for real images
  return input_pipeline


@dataclasses.dataclass(frozen=True)
class Source:
  """A split opened once for a run: its size over all processes, the files a folder leaves out
  [(path, why)], and a folder's listing (paths, labels or None, class names), which the input
  then reads instead of listing the folder again."""
  num_examples: int
  bad_images: list = dataclasses.field(default_factory=list)
  listing: Optional[tuple] = None


def open_source(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Source:
  """Checks the source (an unknown name, a missing data_dir, a folder without a readable image
  raise a ValueError) and sizes it, once."""
  if config.dataset == "synthetic":
    check_data_config(config)
    return Source(int(config.synthetic_examples))
  return _tf_pipeline().open_source(config, split)


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any compile, on a dataset that cannot be read (see
  `input_pipeline.check_data_config`)."""
  if config.dataset == "synthetic":
    if config.synthetic_examples < 1:
      raise ValueError(f"config.data.synthetic_examples must be >= 1, got "
                       f"{config.synthetic_examples}")
    return
  _tf_pipeline().check_data_config(config)


def num_examples(config: ml_collections.ConfigDict, split: Optional[str] = None) -> int:
  """Examples in `split` (default config.split) over all processes."""
  if config.dataset == "synthetic":
    return int(config.synthetic_examples)
  return _tf_pipeline().num_examples(config, split)


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


def synthetic_batches(config: ml_collections.ConfigDict, global_batch: int, start_step: int = 0,
                      *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[dict]:
  """Uniformly random uint8 pixels and labels in [0, 1000)."""
  first, local = process_rows(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  size, seed = int(config.img_size), int(config.seed)
  step = start_step
  while True:
    images = np.empty((local, size, size, 3), np.uint8)
    labels = np.empty((local,), np.int32)
    for row in range(local):
      rng = np.random.default_rng([seed, step * global_batch + first + row])
      images[row] = rng.integers(0, 256, (size, size, 3), np.uint8)
      labels[row] = rng.integers(0, 1000)
    yield {"image": images, "label": labels}
    step += 1


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, source: Optional[Source] = None,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """This process's numpy batches {'image': uint8 [b, S, S, 3], ['label']}, batch k of the run
  first when start_step = k; feed each to `jax.make_array_from_process_local_data`. `source`:
  the run's `open_source`, so a folder is not listed again."""
  if config.dataset == "synthetic":
    return synthetic_batches(config, global_batch, start_step, process_index=process_index,
                             process_count=process_count)
  return _tf_pipeline().create_pretrain_iterator(config, global_batch, start_step, source=source,
                                                 process_index=process_index,
                                                 process_count=process_count)
