"""What is fed: the one place a run asks for its input, TF-free at import.

The 'synthetic' source is numpy (`synthetic`), so a pretraining run on it (and the benchmark, the
FLOPs count, the converter and the model) needs neither TensorFlow nor TFDS: the accelerator
images this project is run on carry JAX, Flax, Optax and Orbax but no TensorFlow. Real images (an
image folder, TFDS) go through tf.data in `tfdata`, imported only when such a source is asked
for. 'shards' (`shards`: a split prepared once by `python -m eesmm_jax.prepare`) is numpy too:
its batches are stored-size images that the train step crops and flips on the device
(`device_augment`), for pretraining; tf.data stays the input of TFDS, folders and fine-tuning.
What every path shares (the data config, `Source`, the rows of a process) is `common`'s.
"""
from __future__ import annotations

from typing import Iterator, Optional

import ml_collections

from eesmm_jax.data.common import (MEAN_RGB, NAMED_DATASETS, STDDEV_RGB, Source,  # noqa: F401
                                   default_data_config, normalize, process_rows)
from eesmm_jax.data.synthetic import synthetic_batches

NUMPY_DATASETS = ("synthetic", "shards")  # read without TensorFlow


def _shards():
  from eesmm_jax.data import shards  # numpy: no TensorFlow
  return shards


def _tf_pipeline():
  from eesmm_jax.data import tfdata  # TensorFlow: only for real images
  return tfdata


def open_source(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Source:
  """Checks the source (an unknown name, a missing data_dir, a folder without a readable image
  raise a ValueError) and sizes it, once."""
  if config.dataset == "synthetic":
    check_data_config(config)
    return Source(int(config.synthetic_examples))
  if config.dataset == "shards":
    return _shards().open_source(config)
  return _tf_pipeline().open_source(config, split)


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any compile, on a dataset that cannot be read (see
  `tfdata.check_data_config`; shards: no index, a shard missing or truncated, img_size above
  the stored size)."""
  if config.dataset == "synthetic":
    if config.synthetic_examples < 1:
      raise ValueError(f"config.data.synthetic_examples must be >= 1, got "
                       f"{config.synthetic_examples}")
    return
  if config.dataset == "shards":
    _shards().open_shards(config)
    return
  _tf_pipeline().check_data_config(config)


def num_examples(config: ml_collections.ConfigDict, split: Optional[str] = None) -> int:
  """Examples in `split` (default config.split) over all processes."""
  if config.dataset == "synthetic":
    return int(config.synthetic_examples)
  if config.dataset == "shards":
    return _shards().open_shards(config).num_examples
  return _tf_pipeline().num_examples(config, split)


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, source: Optional[Source] = None,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """This process's numpy batches {'image': uint8 [b, S, S, 3], ['label']}, batch k of the run
  first when start_step = k; feed each to `jax.make_array_from_process_local_data`. `source`:
  the run's `open_source`, so a folder is not listed again. S is img_size, or for 'shards' the
  stored size (source.image_size), which the train step crops to img_size."""
  if config.dataset == "synthetic":
    return synthetic_batches(config, global_batch, start_step, process_index=process_index,
                             process_count=process_count)
  if config.dataset == "shards":
    return _shards().pretrain_batches(config, global_batch, start_step, source=source,
                                      process_index=process_index, process_count=process_count)
  return _tf_pipeline().create_pretrain_iterator(config, global_batch, start_step, source=source,
                                                 process_index=process_index,
                                                 process_count=process_count)


def create_eval_iterator(config: ml_collections.ConfigDict, global_batch: int,
                         split: Optional[str] = None, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterator[dict]:
  """One ordered pass over `split` for probes and evaluation: centre crops, the last batches
  padded, 'mask' False on padding (`tfdata.create_eval_iterator`)."""
  if config.dataset in NUMPY_DATASETS:
    raise ValueError(f"dataset {config.dataset!r} has no evaluation split: evaluate on the "
                     f"folder or TFDS source (tf.data)")
  return _tf_pipeline().create_eval_iterator(config, global_batch, split,
                                             process_index=process_index,
                                             process_count=process_count)
