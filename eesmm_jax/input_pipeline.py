"""tf.data input for SimMIM / EESMM pretraining: per-process numpy batches, resumable exactly.

The flax `examples/imagenet` recipe (TFDS with `SkipDecoding`, fused `decode_and_crop_jpeg`,
per-process splits), reshaped so that the stream is a pure function of (seed, step):

* The per-process stream is epoch after epoch of the process's examples. Epoch e is shuffled with
  a seed derived from (seed, e), every example's augmentation is drawn from stateless random ops
  seeded by (seed, process, e, index in epoch), and batches are cut from the concatenated stream.
* Resuming at step k therefore only needs k: position p = k * local_batch, start at epoch
  p // n_local and `skip(p % n_local)`. The skip runs on the undecoded records (file paths for
  folders, encoded bytes for TFDS), before any decode or augmentation, so it costs at most part
  of one epoch of reading and no image work; the checkpoint stores just the step.
  We did not use a checkpointable iterator (tf.train.Checkpoint): it stores the shuffle buffer in
  every checkpoint, once per process, and ties checkpoints to the tf.data graph.
* TFDS file order: files are shuffled once with `seed` (the same order every epoch, since a
  re-shuffle per iteration could not be replayed from e alone); the per-epoch shuffle buffer and
  TFDS's own shuffling at preparation time mix across files. Folders get a full permutation of
  their file list each epoch (paths are cheap to buffer).
* Order is made deterministic (`options.deterministic`), so parallel decoding never reorders.

Augmentation (SimMIM `data_simmim.py`): RandomResizedCrop(img_size, scale (0.67, 1), ratio (3/4,
4/3)) with torchvision's sampling (10 tries, then a centre crop clamped to the ratio range),
bilinear antialiased resize, horizontal flip with p 0.5, ImageNet mean/std normalisation;
float32 NHWC.

`create_eval_iterator` is the probe / evaluation input: one ordered pass, centre crops, padded
batches with a 'mask', the same number of batches on every process.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NAMED_DATASETS = ("imagenet2012", "cifar10", "cifar100", "folder", "synthetic")
_FOREVER = 2 ** 62  # the end of Dataset.range for unbounded streams


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
  c.cache = False               # keep the encoded examples in memory after the first epoch
  c.prefetch = -1               # batches; -1 = AUTOTUNE, 0 = none
  c.synthetic_examples = 1_281_167  # the 'epoch' of 'synthetic' (ImageNet-1k train size)
  c.eval_crop_pct = 0.875       # evaluation: resize to img_size / crop_pct, centre crop
  return c


# ----------------------------------------------------------------------------- augmentation


def random_resized_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale=(0.67, 1.0),
                               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
  """[y, x, h, w] of torchvision's RandomResizedCrop.get_params, with stateless randomness.

  The 10 tries are drawn at once and the first valid one taken; if none fits, the centre crop of
  the whole image clamped to the ratio range, as torchvision does.
  """
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  s_area, s_ratio, s_offset = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  area = height * width * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                              math.log(ratio[1])))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))

  in_ratio = width / height
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  found = tf.reduce_any(ok)
  h = tf.where(found, h[first], fallback_h)
  w = tf.where(found, w[first], fallback_w)
  u = tf.random.stateless_uniform([2], s_offset)
  y = tf.where(found, tf.floor(u[0] * (height - h + 1)), tf.floor((height - h) / 2))
  x = tf.where(found, tf.floor(u[1] * (width - w + 1)), tf.floor((width - w) / 2))
  return tf.cast(tf.stack([y, x, h, w]), tf.int32)


def decode_and_random_crop(raw: tf.Tensor, seed: tf.Tensor, scale, ratio) -> tf.Tensor:
  """uint8 [h, w, 3] random crop of an encoded image; JPEGs decode only the crop."""
  def jpeg():
    window = random_resized_crop_window(tf.image.extract_jpeg_shape(raw), seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(raw, window, channels=3)

  def other():  # PNG, BMP, GIF: decode whole, then slice the same window
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    y, x, h, w = tf.unstack(random_resized_crop_window(tf.shape(image), seed, scale, ratio))
    return image[y:y + h, x:x + w]

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(raw), jpeg, other), [None, None, 3])


def augment(raw: tf.Tensor, seed: tf.Tensor, img_size: int, scale, ratio) -> tf.Tensor:
  """SimMIM's pretraining view of one encoded image: float32 [img_size, img_size, 3], normalised."""
  s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = decode_and_random_crop(raw, s_crop, scale, ratio)
  image = tf.image.resize(image, [img_size, img_size], method="bilinear", antialias=True)
  image = tf.where(tf.random.stateless_uniform([], s_flip) < 0.5, image[:, ::-1], image)
  return normalize(image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> ImageNet mean/std normalised float32, as torchvision ToTensor + Normalize."""
  return (tf.cast(image, tf.float32) / 255.0 - MEAN_RGB) / STDDEV_RGB


# ----------------------------------------------------------------------------- sources


class _Source:
  """The undecoded examples of one process: `records` yields {'raw' | 'path', ['label']}."""

  def __init__(self, records: tf.data.Dataset, num_local: int, shuffle_buffer: int):
    self.records, self.num_local, self.shuffle_buffer = records, num_local, shuffle_buffer


def _tfds_name(dataset: str) -> str:
  return dataset[len("tfds:"):] if dataset.startswith("tfds:") else dataset


def _tfds_builder(config):
  name = _tfds_name(config.dataset)
  if name == "imagenet2012" and not config.data_dir:
    raise ValueError(
        "dataset 'imagenet2012' needs config.data_dir: TFDS cannot download ImageNet. Put "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and "
        "run `tfds build imagenet2012 --data_dir=<data_dir>` once.")
  try:
    return tfds.builder(name, data_dir=config.data_dir or None)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f"unknown dataset {config.dataset!r}: expected one of {NAMED_DATASETS}, or the name of a "
        "TFDS image dataset, optionally as 'tfds:<name>'") from None


def _tfds_source(config, process_index, process_count, split=None, train=True) -> _Source:
  builder = _tfds_builder(config)
  features = builder.info.features
  image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if not image_keys:
    raise ValueError(f"TFDS dataset {builder.name!r} has no image feature (features: "
                     f"{list(features.keys())})")
  image_key = "image" if "image" in image_keys else image_keys[0]
  has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
  split = tfds.split_for_jax_process(split or config.split, process_index=process_index,
                                     process_count=process_count)
  try:
    ds = builder.as_dataset(
        split=split, shuffle_files=train,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=int(config.seed),
                                    shuffle_reshuffle_each_iteration=False))
  except AssertionError as e:  # TFDS's "could not find data" when not prepared
    raise ValueError(f"TFDS dataset {builder.name!r} is not prepared in data_dir "
                     f"{builder.data_dir!r}: run `tfds build {builder.name} --data_dir="
                     f"<data_dir>` or builder.download_and_prepare() once ({e})") from None
  n = int(ds.cardinality())
  if n < 0:
    n = builder.info.splits[split].num_examples
  ds = ds.map(lambda ex: {"raw": ex[image_key],
                          **({"label": tf.cast(ex["label"], tf.int32)} if has_label else {})})
  return _Source(ds, n, int(config.shuffle_buffer))


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any compile, on a dataset that cannot be read: an unknown name, a
  missing data_dir, an empty folder. Cheap: lists files, reads no image."""
  if config.dataset == "synthetic":
    return
  if config.dataset == "folder":
    list_folder(config.data_dir, config.split)
    return
  _tfds_builder(config)


def list_folder(data_dir: str, split: str) -> tuple[list[str], Optional[list[int]], list[str]]:
  """(sorted image paths, labels or None, class names) of a 'folder' dataset.

  The root is data_dir/split when that directory exists, else data_dir. A root with
  sub-directories is the ImageFolder layout: one class per sub-directory (sorted names, label =
  index), images found recursively below each. A root without them is a plain folder of images,
  unlabelled.
  """
  if not data_dir:
    raise ValueError("dataset 'folder' needs config.data_dir: a folder of JPEG/PNG images, or "
                     "one in ImageFolder layout data_dir/<split>/<class>/<image>")
  if not tf.io.gfile.isdir(data_dir):
    raise ValueError(f"config.data_dir {data_dir!r} is not a directory")
  root = os.path.join(data_dir, split)
  if not tf.io.gfile.isdir(root):
    root = data_dir

  def images_below(d):
    found = []
    for dirpath, _, files in tf.io.gfile.walk(d):
      found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)

  classes = sorted(e.rstrip("/") for e in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, e)))
  if classes:
    paths, labels = [], []
    for i, c in enumerate(classes):
      found = images_below(os.path.join(root, c))
      paths += found
      labels += [i] * len(found)
  else:
    paths = sorted(os.path.join(root, f) for f in tf.io.gfile.listdir(root)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    labels = None
  if not paths:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root!r}")
  return paths, labels, classes


def _folder_source(config, process_index, process_count, split=None, train=True) -> _Source:
  paths, labels, _ = list_folder(config.data_dir, split or config.split)
  # Strided shards: each process sees every class. Training drops the remainder so every
  # process has the same epoch; evaluation keeps every image.
  n_local = len(paths) // process_count
  if n_local == 0:
    raise ValueError(f"{len(paths)} images in {config.data_dir!r} cannot be split over "
                     f"{process_count} processes")
  stop = process_index + n_local * process_count if train else None
  sl = slice(process_index, stop, process_count)
  n_local = len(paths[sl])
  elements = {"path": paths[sl]}
  if labels is not None:
    elements["label"] = np.asarray(labels[sl], np.int32)
  ds = tf.data.Dataset.from_tensor_slices(elements)
  buffer = n_local  # a full permutation: paths are cheap to hold
  if config.cache:  # read the bytes once, then buffer bytes instead of paths
    ds = ds.map(lambda ex: {"raw": tf.io.read_file(ex["path"]),
                            **{k: v for k, v in ex.items() if k != "path"}})
    buffer = min(int(config.shuffle_buffer), n_local)  # same order as uncached if >= n_local
  return _Source(ds, n_local, buffer)


# ----------------------------------------------------------------------------- pipeline


def _hide_accelerators_from_tf():
  """TF must not take accelerator memory that JAX needs (no-op for tensorflow-cpu)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # only here: the tf.data graph itself does not need JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def _autotune(n: int) -> int:
  return tf.data.AUTOTUNE if n == -1 else int(n)


def make_pretrain_dataset(config: ml_collections.ConfigDict, global_batch: int,
                          start_step: int = 0, *, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> tf.data.Dataset:
  """The infinite per-process dataset of batches from `start_step` on (see the module docstring).

  Elements: {'image': float32 [global_batch // process_count, img_size, img_size, 3],
  'label': int32 [b] when the source has labels}.
  """
  process_index, process_count = _process(process_index, process_count)
  if global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} is not divisible by process_count "
                     f"{process_count}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch = global_batch // process_count
  _hide_accelerators_from_tf()
  options = tf.data.Options()
  options.deterministic = True

  size, seed = int(config.img_size), int(config.seed)
  if config.dataset == "synthetic":
    # One batch per step, drawn from (seed, process, step): random access, so resuming is free.
    base = tf.random.experimental.stateless_fold_in([seed, 0], process_index)

    def synthetic(step):
      s_img, s_lab = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(base, step), 2))
      return {"image": tf.random.stateless_normal([local_batch, size, size, 3], s_img),
              "label": tf.random.stateless_uniform([local_batch], s_lab, 0, 1000, tf.int32)}

    ds = tf.data.Dataset.range(start_step, _FOREVER).map(synthetic)
    if config.prefetch:
      ds = ds.prefetch(_autotune(config.prefetch))
    return ds.with_options(options)

  if config.dataset == "folder":
    source = _folder_source(config, process_index, process_count)
  else:
    source = _tfds_source(config, process_index, process_count)
  records = source.records.cache() if config.cache else source.records
  base = tf.random.experimental.stateless_fold_in([seed, 1], process_index)
  scale, ratio = tuple(config.crop_scale), tuple(config.crop_ratio)

  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(base, e)
    shuffle_seed = tf.random.stateless_uniform([], epoch_seed, None, None, tf.int64)
    shuffled = records.shuffle(source.shuffle_buffer, seed=shuffle_seed,
                               reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (
        tf.random.experimental.stateless_fold_in(epoch_seed, i), ex))

  def load(example_seed, ex):
    raw = tf.io.read_file(ex["path"]) if "path" in ex else ex["raw"]
    out = {"image": augment(raw, example_seed, size, scale, ratio)}
    if "label" in ex:
      out["label"] = ex["label"]
    return out

  position = start_step * local_batch
  ds = tf.data.Dataset.range(position // source.num_local, _FOREVER).flat_map(epoch)
  ds = ds.skip(position % source.num_local)
  ds = ds.map(load, num_parallel_calls=_autotune(config.num_parallel_calls))
  ds = ds.batch(local_batch, drop_remainder=True)
  if config.prefetch:
    ds = ds.prefetch(_autotune(config.prefetch))
  return ds.with_options(options)


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """Numpy batches of this process, batch k of the run first when start_step = k.

  Feed each to `jax.make_array_from_process_local_data(sharding, batch['image'])`. A run that
  saved its step k resumes with the batches it would have seen: pass start_step=k.
  process_index / process_count default to JAX's (pass them to simulate other processes).
  """
  ds = make_pretrain_dataset(config, global_batch, start_step, process_index=process_index,
                             process_count=process_count)
  return ds.as_numpy_iterator()


def center_crop(raw: tf.Tensor, img_size: int, crop_pct: float) -> tf.Tensor:
  """The evaluation view: shorter side resized to img_size / crop_pct, centre img_size crop."""
  image = tf.io.decode_image(raw, channels=3, expand_animations=False)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  resized = tf.cast(tf.round(hw * (img_size / crop_pct) / tf.reduce_min(hw)), tf.int32)
  resized = tf.maximum(resized, img_size)
  image = tf.image.resize(image, resized, method="bilinear", antialias=True)
  top, left = (resized[0] - img_size) // 2, (resized[1] - img_size) // 2
  return tf.ensure_shape(normalize(image[top:top + img_size, left:left + img_size]),
                         [img_size, img_size, 3])


def create_eval_iterator(config: ml_collections.ConfigDict, global_batch: int,
                         split: Optional[str] = None, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterator[dict]:
  """One ordered pass over `split` (default config.split) for probes and evaluation.

  Images are centre crops (`center_crop`, config.eval_crop_pct), not augmented, not shuffled.
  Every process yields the same number of batches of global_batch // process_count; the last
  ones are padded with zero images, and 'mask' (bool [b]) is False on padding, so every real
  example is counted once. Elements: {'image', 'mask', 'label' when the source has labels}.
  """
  process_index, process_count = _process(process_index, process_count)
  if global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} is not divisible by process_count "
                     f"{process_count}")
  if config.dataset == "synthetic":
    raise ValueError("dataset 'synthetic' has no evaluation split")
  local_batch = global_batch // process_count
  _hide_accelerators_from_tf()
  split = split or config.split
  if config.dataset == "folder":
    source = _folder_source(config, process_index, process_count, split, train=False)
  else:
    source = _tfds_source(config, process_index, process_count, split, train=False)
  # The largest process's share sets the number of batches of all.
  per_process = -(-num_examples(config, split) // process_count)
  num_batches = -(-per_process // local_batch)
  size, crop_pct = int(config.img_size), float(config.eval_crop_pct)

  def load(ex):
    raw = tf.io.read_file(ex["path"]) if "path" in ex else ex["raw"]
    out = {"image": center_crop(raw, size, crop_pct), "mask": tf.constant(True)}
    if "label" in ex:
      out["label"] = ex["label"]
    return out

  ds = source.records.map(load, num_parallel_calls=_autotune(config.num_parallel_calls))
  padding = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  if config.prefetch:
    ds = ds.prefetch(_autotune(config.prefetch))
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).as_numpy_iterator()


def num_examples(config: ml_collections.ConfigDict, split: Optional[str] = None) -> int:
  """Examples in `split` (default config.split) over all processes.

  Steps per epoch = this // global_batch.
  """
  if config.dataset == "synthetic":
    return int(config.synthetic_examples)
  if config.dataset == "folder":
    return len(list_folder(config.data_dir, split or config.split)[0])
  return _tfds_source(config, 0, 1, split, train=False).num_local


# ----------------------------------------------------------------------------- demo data


def write_digits_folder(root: str, size: int = 32) -> str:
  """scikit-learn's 1,797 real 8x8 digits as size x size RGB PNGs, ImageFolder layout, once.

  root/train/<digit>/<i>.png and root/test/<digit>/<i>.png, every fifth image (i % 5 == 0) in
  test: a fixed split, so probes are comparable between runs. Skipped when root/.complete exists;
  written in a temporary folder and renamed, so an interrupted write is never mistaken for data.
  Read it back with dataset='folder', data_dir=root.
  """
  marker = os.path.join(root, ".complete")
  if os.path.exists(marker):
    return root
  from PIL import Image  # demo-only dependencies, imported where used
  from sklearn.datasets import load_digits

  if os.path.isdir(root) and os.listdir(root):
    raise ValueError(f"{root!r} exists without the {marker!r} marker of a finished write: not "
                     "overwriting it; remove it or pass another root")
  digits = load_digits()
  tmp = root.rstrip("/") + ".tmp"
  if os.path.isdir(tmp):  # ours, from an interrupted earlier call
    shutil.rmtree(tmp)
  for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    split = "test" if i % 5 == 0 else "train"
    d = os.path.join(tmp, split, str(label))
    os.makedirs(d, exist_ok=True)
    pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(
        os.path.join(d, f"{i}.png"))
  open(os.path.join(tmp, ".complete"), "w").close()
  if os.path.isdir(root):  # empty, checked above
    os.rmdir(root)
  os.rename(tmp, root)
  return root
