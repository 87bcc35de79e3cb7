"""What is fed: the one place a run asks for its input, TF-free at import.

The 'synthetic' source (`synthetic`), the IDX datasets 'fashion_mnist' and 'mnist' (`idx`, read
into memory) and 'shards' (`shards`: a split prepared once by `python -m eesmm_jax.prepare`,
cropped and flipped on the device by `device_augment`, pretraining only) are numpy, so a run on
them needs neither TensorFlow nor TFDS: the accelerator images this project is run on carry JAX,
Flax, Optax and Orbax but no TensorFlow. Other real images (an image folder, TFDS) go through
tf.data in `tfdata` and `finetune_input`, imported only when such a source is asked for. What
every path shares (the data config, `Source`, the rows of a process) is `common`'s.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import ml_collections

from eesmm_jax.data.common import (IDX_DATASETS, MEAN_RGB, NAMED_DATASETS,  # noqa: F401
                                   STDDEV_RGB, Source, default_data_config,
                                   finetune_data_config, normalize, process_rows)
from eesmm_jax.data.synthetic import device_batches, synthetic_batches

NUMPY_DATASETS = ("synthetic", "shards")  # read without TensorFlow


def _shards():
  from eesmm_jax.data import shards  # numpy: no TensorFlow
  return shards


def _tf_pipeline():
  from eesmm_jax.data import tfdata  # TensorFlow: only for real images
  return tfdata


def _idx(config):
  """The numpy IDX module when `config` names an IDX dataset, else None."""
  if config.dataset in IDX_DATASETS:
    from eesmm_jax.data import idx
    return idx
  return None


def open_source(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Source:
  """Checks the source (an unknown name, a missing data_dir, a folder without a readable image
  raise a ValueError) and sizes it, once."""
  if config.dataset == "synthetic":
    check_data_config(config)
    return Source(int(config.synthetic_examples))
  if config.dataset == "shards":
    return _shards().open_source(config)
  if _idx(config):
    return _idx(config).open_source(config, split)
  return _tf_pipeline().open_source(config, split)


def describe(config: ml_collections.ConfigDict, source: Source) -> tuple[dict, Optional[list]]:
  """What a run's data is, to tell on resume whether it is still the data the run started on:
  ({'what', 'num_examples', 'digest', ['classes']}, the names of its examples or None).

  A folder's digest covers its listing (relative paths, so a moved copy is the same data) and
  the names are that listing, so a change can be told as images added and removed; prepared
  shards are their index; TFDS its name, version and split; the IDX sets and synthetic data
  their split and size (their content is fixed)."""
  import hashlib
  import json
  names, classes = None, None
  if config.dataset == "folder":
    root = _tf_pipeline().folder_root(config.data_dir, config.split)
    paths, labels, folder_classes = source.listing
    prefix = root.rstrip("/") + "/"
    names = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root)
             for p in paths]
    classes = None if labels is None else list(folder_classes)
    what, content = f"folder {os.path.abspath(root)}", "\n".join(names)
  elif config.dataset == "shards":
    shards = source.listing
    classes = shards.classes
    what, content = f"shards {os.path.abspath(shards.path)}", json.dumps(shards.index,
                                                                          sort_keys=True)
  elif config.dataset == "synthetic":
    what, content = "synthetic", f"{config.synthetic_examples} {config.img_size}"
  elif _idx(config):
    what, content = f"{config.dataset} {config.split}", config.split
  else:
    builder = _tf_pipeline()._tfds_builder(config)
    what = f"tfds {builder.name} {builder.version} {config.split}"
    content = what
  digest = hashlib.sha256(
      f"{config.dataset}|{source.num_examples}|{content}".encode()).hexdigest()
  record = {"what": what, "num_examples": int(source.num_examples), "digest": digest}
  if classes is not None:
    record["classes"] = list(classes)
  return record, names


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any compile, on a dataset that cannot be read (see
  `tfdata.check_data_config`, `idx.check_data_config`; shards: no index, a shard missing or
  truncated, img_size above the stored size)."""
  if config.get("crop_padding") is not None and not _idx(config):
    raise ValueError(f"config.data.crop_padding={config.crop_padding!r}: only the IDX datasets' "
                     f"fine-tuning crop reads it ('fashion_mnist', 'mnist'), not "
                     f"{config.dataset!r}; leave it None")
  if config.dataset == "synthetic":
    if config.synthetic_examples < 1:
      raise ValueError(f"config.data.synthetic_examples must be >= 1, got "
                       f"{config.synthetic_examples}")
    return
  if config.dataset == "shards":
    _shards().open_shards(config)
    return
  if _idx(config):
    return _idx(config).check_data_config(config)
  _tf_pipeline().check_data_config(config)


def num_examples(config: ml_collections.ConfigDict, split: Optional[str] = None) -> int:
  """Examples in `split` (default config.split) over all processes."""
  if config.dataset == "synthetic":
    return int(config.synthetic_examples)
  if config.dataset == "shards":
    return _shards().open_shards(config).num_examples
  if _idx(config):
    return _idx(config).num_examples(config, split)
  return _tf_pipeline().num_examples(config, split)


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, source: Optional[Source] = None,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None,
                             sharding=None) -> Iterator[dict]:
  """This process's numpy batches {'image': uint8 [b, S, S, 3], ['label']}, batch k of the run
  first when start_step = k; feed each to `jax.make_array_from_process_local_data`. `source`:
  the run's `open_source`, so a folder is not listed again. S is img_size, or for 'shards' the
  stored size (source.image_size), which the train step crops to img_size. With `sharding`
  (the trainer's batch sharding), 'synthetic' draws each global batch on the mesh instead
  (`synthetic.device_batches`: the same values, no host work)."""
  if config.dataset == "synthetic":
    if sharding is not None:
      return device_batches(config, global_batch, start_step, sharding)
    return synthetic_batches(config, global_batch, start_step, process_index=process_index,
                             process_count=process_count)
  if config.dataset == "shards":
    return _shards().pretrain_batches(config, global_batch, start_step, source=source,
                                      process_index=process_index, process_count=process_count)
  if _idx(config):
    return _idx(config).create_pretrain_iterator(config, global_batch, start_step,
                                                 process_index=process_index,
                                                 process_count=process_count)
  return _tf_pipeline().create_pretrain_iterator(config, global_batch, start_step, source=source,
                                                 process_index=process_index,
                                                 process_count=process_count)


def create_eval_iterator(config: ml_collections.ConfigDict, global_batch: int,
                         split: Optional[str] = None, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterator[dict]:
  """One ordered pass over `split` for probes and evaluation: centre crops, the last batches
  padded, 'mask' False on padding (`tfdata.create_eval_iterator`)."""
  if _idx(config):
    return _idx(config).create_eval_iterator(config, global_batch, split,
                                             process_index=process_index,
                                             process_count=process_count)
  if config.dataset in NUMPY_DATASETS:
    raise ValueError(f"dataset {config.dataset!r} has no evaluation split: evaluate on the "
                     f"folder or TFDS source (tf.data)")
  return _tf_pipeline().create_eval_iterator(config, global_batch, split,
                                             process_index=process_index,
                                             process_count=process_count)


# ----------------------------------------------------------------------------------------------
# Fine-tuning's input: labelled, augmented batches (tf.data's `finetune_input`, or numpy).


def num_classes(config: ml_collections.ConfigDict) -> int:
  """Classes of the labelled dataset `config` names."""
  if _idx(config):
    return _idx(config).NUM_CLASSES
  from eesmm_jax.data import finetune_input  # TensorFlow
  return finetune_input.num_classes(config)


def class_names(config: ml_collections.ConfigDict) -> Optional[list]:
  """A folder's training classes (config.split's sub-directories), whose indices are the labels
  of every split; None for the other sources (their labels are their published numbering)."""
  if config.dataset != "folder":
    return None
  return _tf_pipeline().training_classes(config)


def check_finetune_input(config: ml_collections.ConfigDict, aug: ml_collections.ConfigDict
                         ) -> None:
  """Refuses augmentation the source's fine-tuning input does not do, before any compile."""
  if _idx(config):
    _idx(config).check_finetune_aug(aug)


def finetune_image_dtype(config: ml_collections.ConfigDict) -> str:
  """What the fine-tuning input's images are: 'uint8' (numpy sources) or 'float32'."""
  return "uint8" if _idx(config) else "float32"


def create_finetune_iterator(config: ml_collections.ConfigDict, aug: ml_collections.ConfigDict,
                             global_batch: int, start_step: int = 0, *,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """This process's {'image': [b, S, S, 3], 'label': int32 [b]}, batch k of the run first when
  start_step = k; images float32 normalised (tf.data), or uint8 (`finetune_image_dtype`) that
  the step normalises on the device."""
  if _idx(config):
    return _idx(config).create_finetune_iterator(config, global_batch, start_step,
                                                 process_index=process_index,
                                                 process_count=process_count)
  from eesmm_jax.data import finetune_input  # TensorFlow
  return finetune_input.create_finetune_iterator(config, aug, global_batch, start_step,
                                                 process_index=process_index,
                                                 process_count=process_count)
