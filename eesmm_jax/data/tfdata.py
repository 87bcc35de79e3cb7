"""tf.data input for SimMIM / EESMM pretraining: per-process numpy batches, resumable exactly.

The flax `examples/imagenet` recipe (TFDS with `SkipDecoding`, fused `decode_and_crop_jpeg`,
per-process splits), reshaped so that the stream is a pure function of (seed, step):

* Folders (and the numpy 'synthetic' source, `synthetic`) are random access: the run's examples form
  one global stream, epoch after epoch, and global position i holds example
  `index_shuffle(i % N, seed(e))` of epoch e = i // N, augmented with stateless random ops seeded by (seed, i). Step k's global batch is
  positions [k * B, (k + 1) * B) and process p takes rows [p * b, (p + 1) * b) of it, b = B / P.
  So the global batch of every step is the same on 1 process x 4 devices and on 2 x 2 (the
  processes read disjoint parts of every epoch), and resuming at step k starts at position k * B
  with nothing to skip.
* TFDS is read as its record files allow: `split_for_jax_process` gives each process a disjoint
  shard; epoch e of it is shuffled with a seed derived from (seed, process, e), every example's
  augmentation is seeded by (seed, process, e, index in epoch), and batches are cut from the
  concatenated stream. Resuming at step k: position p = k * local_batch, start at epoch
  p // n_local and `skip(p % n_local)`; the skip runs on the encoded records, before any decode,
  so it costs at most part of one epoch of reading. Files are shuffled once with `seed` (the same
  order every epoch, since a re-shuffle per iteration could not be replayed from e alone); the
  shuffle buffer and TFDS's own shuffling at preparation time mix across files. The order depends
  on the number of processes.
  We did not use a checkpointable iterator (tf.train.Checkpoint): it stores the shuffle buffer in
  every checkpoint, once per process, and ties checkpoints to the tf.data graph.
* Order is made deterministic (`options.deterministic`), so parallel decoding never reorders.

Folders are checked once when listed (`list_folder`): zero-byte, truncated, corrupt and non-image
files are logged by name and left out (`bad_images` returns them; the trainer writes their count
to its metrics); the verdicts are kept in a manifest keyed by path, mtime, size, mode, inode and
ctime, so a folder is read in full once. Symbolic links are followed, each real directory
once. Grayscale, palette, CMYK, 16-bit and alpha images decode as RGB (`channels=3`).

Augmentation (SimMIM `data_simmim.py`): RandomResizedCrop(img_size, scale (0.67, 1), ratio (3/4,
4/3)) with torchvision's sampling (10 tries, then a centre crop clamped to the ratio range),
bilinear antialiased resize, horizontal flip with p 0.5; uint8 NHWC, rounded as PIL's resize
rounds. The ImageNet mean/std normalisation is the train step's first op (`data.normalize`), so
batches cross to the device at a quarter of float32's bytes.

`create_eval_iterator` is the probe / evaluation input: one ordered pass, centre crops, padded
batches with a 'mask', the same number of batches on every process.

The input's throughput and a pre-resized copy of a folder: `python -m eesmm_jax.tools.images`.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import io
import math
import os
import re
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from eesmm_jax.data.common import (MEAN_RGB, NAMED_DATASETS, STDDEV_RGB, Source,  # noqa: F401
                                   default_data_config, process_rows)

# What tf.io.decode_image decodes (a GIF's first frame); files named as other image formats are
# named once as skipped, so a folder of .webp files does not shrink without a word.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
OTHER_IMAGE_EXTENSIONS = (".webp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".ppm")
# A position whose image cannot be read when its batch is built takes the image at the next
# stream position instead (same epoch, same augmentation seed), up to this many tries.
STAND_IN_TRIES = 16
_FOREVER = 2 ** 62  # the end of Dataset.range for unbounded streams


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
  """SimMIM's pretraining view of one encoded image: uint8 [img_size, img_size, 3] (rounded, as
  PIL's resize is); the train step normalises it on the device (`data.normalize`)."""
  s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = decode_and_random_crop(raw, s_crop, scale, ratio)
  image = tf.image.resize(image, [img_size, img_size], method="bilinear", antialias=True)
  image = tf.where(tf.random.stateless_uniform([], s_flip) < 0.5, image[:, ::-1], image)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


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


class DecodedImages:
  """A folder or TFDS split decoded in order, as `shards.write_shards` reads a source: listed
  and checked as the trainer lists it (a folder's unreadable files left out and named in
  `bad_images`), decoded as the trainer decodes (tf.io.decode_image, channels=3). An image
  that still fails to decode is yielded with its problem, not its pixels."""

  def __init__(self, config: ml_collections.ConfigDict, split: Optional[str] = None):
    self.config, self.split = config, split or config.split
    self.bad_images: list = []
    if config.dataset == "folder":
      paths, labels, classes, self.bad_images = _list_and_check_folder(config.data_dir,
                                                                       self.split)
      self.paths, self.labels = paths, labels
      self.classes = None if labels is None else list(classes)
      self.num_examples = len(paths)
      self.description = {"dataset": "folder", "data_dir": os.path.abspath(config.data_dir),
                          "split": self.split}
      return
    source = _tfds_source(config, 0, 1, self.split, train=False)  # the checks, the size
    builder = _tfds_builder(config)
    features = builder.info.features
    self.builder = builder
    self.image_key = next(k for k in (["image"] + list(features.keys()))
                          if k in features and isinstance(features[k], tfds.features.Image))
    label = features["label"] if "label" in features else None
    self.classes = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    self.num_examples = source.num_local
    self.description = {"dataset": _tfds_name(config.dataset), "data_dir": builder.data_dir,
                        "split": self.split, "version": str(builder.version)}

  def name(self, index: int) -> str:
    if self.config.dataset == "folder":
      return self.paths[index]
    return f"{self.description['dataset']}/{self.split}[{index}]"

  def read(self, start: int, stop: int) -> Iterator[tuple]:
    """(index, uint8 [h, w, 3] or None, label or -1, problem) for index in [start, stop)."""
    _hide_accelerators_from_tf()
    if self.config.dataset == "folder":
      labels = self.labels[start:stop] if self.labels is not None else [-1] * (stop - start)
      ds = tf.data.Dataset.from_tensor_slices(
          (tf.range(start, stop, dtype=tf.int64), self.paths[start:stop],
           tf.constant(labels, tf.int64)))
      ds = ds.map(lambda i, path, label: (i, tf.io.read_file(path), label))
    else:
      records = self.builder.as_dataset(
          split=f"{self.split}[{start}:{stop}]", shuffle_files=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
      ds = tf.data.Dataset.zip((tf.data.Dataset.range(start, stop), records)).map(
          lambda i, ex: (i, ex[self.image_key],
                         tf.cast(ex["label"], tf.int64) if self.classes is not None
                         else tf.constant(-1, tf.int64)))
    ds = ds.map(lambda i, raw, label: (i, tf.io.decode_image(raw, channels=3,
                                                             expand_animations=False), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()  # a failed decode drops its element; the gap names it below
    expected = start
    for i, image, label in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      for missing in range(expected, int(i)):
        yield missing, None, -1, "tf.io.decode_image cannot decode it"
      yield int(i), image, int(label), ""
      expected = int(i) + 1
    for missing in range(expected, stop):
      yield missing, None, -1, "tf.io.decode_image cannot decode it"


def open_source(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Source:
  """A folder or TFDS split, checked and sized once for a run (see `eesmm_jax.data.open_source`)."""
  split = split or config.split
  if config.dataset == "folder":
    paths, labels, classes, bad = _list_and_check_folder(config.data_dir, split)
    return Source(len(paths), bad, (paths, labels, classes))
  return Source(_tfds_source(config, 0, 1, split, train=False).num_local)


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any compile, on a dataset that cannot be read: an unknown name, a
  missing data_dir, a folder without a readable image. Lists files; a folder's images are
  decoded once, on its first listing (then their verdicts are read from its manifest)."""
  if config.dataset == "folder":
    list_folder(config.data_dir, config.split)
    return
  _tfds_builder(config)


def list_folder(data_dir: str, split: str, classes: Optional[list[str]] = None
                ) -> tuple[list[str], Optional[list[int]], list[str]]:
  """(sorted readable image paths, labels or None, class names) of a 'folder' dataset.

  The root is data_dir/split when that directory exists, else data_dir. A root with
  sub-directories is the ImageFolder layout: one class per sub-directory (sorted names, label =
  index), images found recursively below each. A root without them is a plain folder of images,
  unlabelled. Files that do not decode are left out (see `bad_images`). Symbolic links are
  followed, each real directory once (so a link to a parent is no loop), and an image reached
  by several paths is listed once; a link that leads nowhere is a bad image. Hidden
  directories (.ipynb_checkpoints, .git) are not classes and are not descended into.

  `classes`: the training split's class names, for an evaluation split: labels are then their
  indices, and a class the training split lacks is refused by name.
  """
  paths, labels, classes, _ = _list_and_check_folder(data_dir, split, classes)
  return paths, labels, classes


def bad_images(config: ml_collections.ConfigDict, split: Optional[str] = None
               ) -> list[tuple[str, str]]:
  """[(path, why)] of the files of a 'folder' dataset that are skipped; [] for other sources."""
  if config.dataset != "folder":
    return []
  return _list_and_check_folder(config.data_dir, split or config.split)[3]


def _is_local(path: str) -> bool:
  """False for the URLs tf.io.gfile reads (gs://, s3://, ram://): no symlinks there, and the
  os module cannot read them."""
  return "://" not in path


def _warn_once(key: str, message: str, *args) -> None:
  """The folder is listed several times per run (config check, bad_images, the input): one
  line per process for each thing found."""
  if key not in _reported:
    _reported.add(key)
    logging.warning(message, *args)


def _local_images(top: str, seen_dirs: set[str]) -> list[tuple[str, str]]:
  """[(path, real path)] of the image files below `top`, recursively, sorted by path.

  Directory links are followed once per real directory (`seen_dirs`, shared by the caller across
  classes): os.walk/tf.io.gfile.walk follow a link to a parent until the path is too long (74
  images once became 3,034 paths). Image-named links that lead nowhere (dangling, or a loop) are
  kept, with real path None: check_images reports them as bad images, one line each.
  """
  found, queue = [], [(top, os.path.realpath(top))]
  while queue:  # breadth first over sorted names: the same paths on every listing
    d, real_d = queue.pop(0)
    try:
      with os.scandir(d) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      if d == top:
        raise ValueError(f"cannot list {d!r}: {e.strerror}") from e
      _warn_once(d, "cannot list %s (%s): the images below it are left out", d, e.strerror)
      continue
    for e in entries:
      path = os.path.join(d, e.name)
      link = e.is_symlink()
      real = os.path.realpath(path) if link else os.path.join(real_d, e.name)
      try:
        is_dir = e.is_dir()  # follows links
      except OSError:  # a link loop (ELOOP): no directory
        is_dir = False
      if is_dir:
        if e.name.startswith("."):  # .ipynb_checkpoints, .git, .Trash: never data
          continue
        if real in seen_dirs:
          _warn_once(path, "not following %s: it leads to %s, which is listed already (a "
                     "symbolic link loop, or a second link to it)", path, real)
        else:
          seen_dirs.add(real)
          queue.append((path, real))
        continue
      if link and not os.path.exists(path):
        if e.name.lower().endswith(IMAGE_EXTENSIONS):
          found.append((path, None))  # check_images says why
        else:  # not an image by name, but it may have been meant as a directory of them
          _warn_once(path, "ignoring %s: %s", path, _link_problem(path))
        continue
      if e.name.lower().endswith(IMAGE_EXTENSIONS):
        found.append((path, real))
      elif e.name.lower().endswith(OTHER_IMAGE_EXTENSIONS):
        _note_other_format(top, path)
  return sorted(found)


def _note_other_format(top: str, path: str) -> None:
  _warn_once(f"other-format:{top}", "skipping the %s files below %s (first: %s): tf.data decodes "
             "JPEG, PNG, GIF and BMP; convert them to be read", os.path.splitext(path)[1], top,
             path)


def _link_problem(path: str) -> str:
  """Why a path that os.stat cannot follow is not an image."""
  try:
    target = os.readlink(path)
  except OSError as e:  # not a link: it vanished, or its directory is not searchable
    return f"{_UNREADABLE} ({e.strerror})"
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return f"symbolic link loop (-> {target})"
    return f"dangling symbolic link (-> {target}: {e.strerror})"
  return f"symbolic link (-> {target})"


def _is_local_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # a link loop
    return False


def folder_root(data_dir: str, split: str) -> str:
  """data_dir/split when that directory exists, else data_dir."""
  if not data_dir:
    raise ValueError("dataset 'folder' needs config.data_dir: a folder of JPEG/PNG images, or "
                     "one in ImageFolder layout data_dir/<split>/<class>/<image>")
  if not tf.io.gfile.isdir(data_dir):
    raise ValueError(f"config.data_dir {data_dir!r} is not a directory")
  root = os.path.join(data_dir, split)
  return root if tf.io.gfile.isdir(root) else data_dir


def _list_and_check_folder(data_dir, split, classes=None):
  root = folder_root(data_dir, split)

  if _is_local(root):
    # Classes are the directories of the root (links to directories included). They and the
    # root are marked seen first, so a link from one class into another (or up to the root)
    # does not move the other's images into it.
    try:
      with os.scandir(root) as it:
        entries = list(it)
    except OSError as e:
      raise ValueError(f"cannot list {root!r}: {e.strerror}") from e
    found_classes = sorted(e.name for e in entries
                           if not e.name.startswith(".") and _is_local_dir(e))
    classes = _class_list(root, found_classes, classes)
    label_of = {c: i for i, c in enumerate(classes)}
    seen_dirs = {os.path.realpath(root)}
    seen_dirs |= {os.path.realpath(os.path.join(root, c)) for c in found_classes}
    if classes:
      for e in entries:  # _local_images says this of the links in the classes
        if e.is_symlink() and not os.path.exists(e.path):  # perhaps meant as a class
          _warn_once(e.path, "ignoring %s: %s", e.path, _link_problem(e.path))
      found = [(label_of[c], p, real) for c in found_classes
               for p, real in _local_images(os.path.join(root, c), seen_dirs)]
    else:  # a plain folder (no directories in it: nothing to descend into)
      found = [(None, p, real) for p, real in _local_images(root, seen_dirs)]
    # An image reached by several paths (links) is listed once, by the first path in listing
    # order, so it is not seen more often than the others in every epoch.
    seen_files, unique = set(), []
    for i, p, real in found:
      if real is None or real not in seen_files:
        seen_files.add(real)
        unique.append((i, p))
    if len(unique) < len(found):
      _warn_once(f"duplicates:{root}", "%d files in %s are reached by more than one path "
                 "(symbolic links): each is listed once", len(found) - len(unique), root)
    paths = [p for _, p in unique]
    labels = [i for i, _ in unique] if classes else None
  else:  # gs:// and other tf.io.gfile file systems: no links to follow
    def images_below(d):
      found = []
      for dirpath, _, files in tf.io.gfile.walk(d):
        if any(part.startswith(".") for part in os.path.relpath(dirpath, d).split("/")
               if part != "."):
          continue
        found += [os.path.join(dirpath, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
      return sorted(found)

    found_classes = sorted(e.rstrip("/") for e in tf.io.gfile.listdir(root)
                           if not e.startswith(".") and tf.io.gfile.isdir(os.path.join(root, e)))
    classes = _class_list(root, found_classes, classes)
    if classes:
      paths, labels = [], []
      for c in found_classes:
        found = images_below(os.path.join(root, c))
        paths += found
        labels += [classes.index(c)] * len(found)  # once per class
    else:
      paths = sorted(os.path.join(root, f) for f in tf.io.gfile.listdir(root)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      labels = None
  if not paths:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root!r}")
  problems = check_images(root, paths)
  bad = [(p, problems[p]) for p in paths if problems[p]]
  if len(bad) == len(paths):
    listing = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in bad[:5])
    raise ValueError(f"no readable image in {root!r}: all {len(paths)} files fail to decode "
                     f"({listing}{' ...' if len(bad) > 5 else ''})")
  if labels is not None:
    labels = [label for p, label in zip(paths, labels) if not problems[p]]
  paths = [p for p in paths if not problems[p]]
  return paths, labels, classes, bad


def _class_list(root: str, found: list[str], training: Optional[list[str]]) -> list[str]:
  """The classes whose indices are the labels: the folder's own, or training's when given (an
  evaluation split), which must then hold every class the folder has. A split missing some of
  training's classes is evaluated on those it has, with training's indices."""
  if training is None or not found:
    return found
  extra = sorted(set(found) - set(training))
  if extra:
    raise ValueError(f"{root!r} has classes the training split does not: "
                     f"{', '.join(map(repr, extra[:10]))}{' ...' if len(extra) > 10 else ''} "
                     f"(training's {len(training)}: {', '.join(map(repr, training[:10]))}"
                     f"{' ...' if len(training) > 10 else ''}); evaluate on a split of the "
                     f"same classes")
  return list(training)


# A folder's verdicts: a header naming the format, then one line per file: mtime_ns, size,
# st_mode, inode, ctime_ns, problem ('' = readable), relative path.
IMAGE_CHECK_FILE = ".eesmm_image_check.tsv"
_MANIFEST_HEADER = "# eesmm_jax image check v2: mtime_ns size mode inode ctime_ns problem path"
_UNREADABLE = "cannot read the file"  # verdicts about access, not content: never reused
_manifests: dict[str, dict[str, tuple]] = {}  # read once per process
_reported: set[str] = set()


def image_problem(path: str) -> str:
  """'' when tf.data can decode `path`, else why not (zero bytes, not an image, truncated, ...).

  Reads the whole file: PNGs are CRC-checked (`verify`), JPEGs decoded at 1/8 scale (libjpeg's
  DCT scaling, a fraction of a full decode), which still runs through all the entropy-coded data
  and so finds truncation, as TF's decoder would.
  """
  from PIL import Image  # pillow is a dependency; imported where used, like the demo data
  # tf.data decodes any size its memory allows (a JPEG's crop window only, in training), and
  # the check below decodes a JPEG at 1/8 scale: pillow's decompression-bomb guard (179 M
  # pixels) would refuse images the trainer reads.
  Image.MAX_IMAGE_PIXELS = None
  try:
    if _is_local(path):
      with open(path, "rb") as f:
        data = f.read()
    else:
      with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
  except OSError as e:
    return f"{_UNREADABLE} ({e.strerror or e})"
  except tf.errors.OpError as e:
    return f"{_UNREADABLE} ({e.message})"
  if not data:
    return "empty file (0 bytes)"
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in ("JPEG", "MPO", "PNG", "GIF", "BMP"):
        return f"a {image.format} image: tf.data decodes JPEG, PNG, GIF and BMP"
      image.verify()
    with Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (1, 1))
      image.load()
  except Exception as e:  # pylint: disable=broad-except -- PIL raises many types for bad data
    return f"not a readable image ({type(e).__name__}: {e})"
  return ""


def _manifest_paths(root: str) -> list[str]:
  """The manifest beside the images, or in the user's cache when the folder is read-only."""
  digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                       "eesmm_jax", "image_check", f"{digest}.tsv")
  return [os.path.join(root, IMAGE_CHECK_FILE), cache]


def _read_manifest(path: str) -> dict[str, tuple]:
  """{relative path: (mtime_ns, size, mode, inode, ctime_ns, problem)}; {} for a manifest of
  another format (an older one is keyed by mtime and size only: its files are checked again)."""
  if path not in _manifests:
    entries = {}
    try:
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "r") as f:
          lines = f.read().split("\n")
        if lines[0] == _MANIFEST_HEADER:
          for line in lines[1:]:
            fields = line.split("\t", 6)
            if len(fields) == 7:  # a torn or hand-edited line only costs its file a check
              *key, problem, rel = fields
              try:
                entries[rel] = tuple(map(int, key)) + (problem,)
              except ValueError:
                pass
    except (OSError, tf.errors.OpError, UnicodeDecodeError) as e:
      logging.warning("cannot read the image check manifest %s (%s): checking again", path, e)
    _manifests[path] = entries
  return _manifests[path]


def _freshest_manifest(candidates: list[str]) -> dict[str, tuple]:
  """The entries of the most recently written readable manifest: a stale one left in a folder
  made read-only since must not win over the one kept in the cache after it."""
  found = []
  for path in candidates:
    entries = _read_manifest(path)
    if entries:
      try:  # tf.io.gfile's local mtime is in whole seconds
        mtime = (os.stat(path).st_mtime_ns if _is_local(path)
                 else tf.io.gfile.stat(path).mtime_nsec)
      except (OSError, tf.errors.OpError):
        continue
      found.append((mtime, entries))
  return max(found, key=lambda f: f[0])[1] if found else {}


def _write_manifest(candidates: list[str], entries: dict) -> None:
  text = _MANIFEST_HEADER + "\n" + "".join(
      "\t".join(map(str, entry)) + f"\t{rel}\n" for rel, entry in sorted(entries.items()))
  for path in candidates:
    tmp = f"{path}.tmp.{os.getpid()}"  # several processes may write the same verdicts at once
    try:
      tf.io.gfile.makedirs(os.path.dirname(path))
      with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
      tf.io.gfile.rename(tmp, path, overwrite=True)
      _manifests[path] = entries
      return
    except (OSError, tf.errors.OpError):
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
  logging.warning("could not write the image check manifest to any of %s: the folder will be "
                  "checked again next time", candidates)


def _readable(path: str) -> bool:
  """Whether this process may open `path` now: permissions, ACLs and group membership change
  without touching the file's contents, so a cached 'readable' is confirmed on every listing
  (an open, no read). os.access would ask with the real uid, not the effective one."""
  try:
    with open(path, "rb"):
      return True
  except OSError:
    return False


def check_images(root: str, paths: list[str]) -> dict[str, str]:
  """{path: problem ('' = readable)} for images below `root`; each file is decoded once, its
  verdict kept in the manifest and reused while the file is unchanged. Every unreadable file is
  logged once per process, by name.

  A verdict is keyed by the file's mtime and size (its content), and by its mode bits, inode
  and ctime (chmod, chown and ACL changes move the ctime; a replaced file has a new inode), so
  a change of permissions is judged again. A cached 'readable' of a local file is confirmed by
  opening it, and a failure to read is never reused: both can change with nothing on the file
  changing (group membership, a remounted share). Links that lead nowhere are bad images too;
  their verdicts are not kept (nothing to key them by)."""
  candidates = _manifest_paths(root)
  known = _freshest_manifest(candidates)
  local = _is_local(root)

  def verdict(path):
    rel = os.path.relpath(path, root)
    if local:
      try:
        st = os.stat(path)
      except OSError:  # a dangling link or a link loop (or the file went)
        return rel, None, _link_problem(path)
      key = (st.st_mtime_ns, st.st_size, st.st_mode, st.st_ino, st.st_ctime_ns)
    else:  # no mode, inode or ctime in tf.io.gfile's stat
      st = tf.io.gfile.stat(path)
      key = (int(st.mtime_nsec), int(st.length), 0, 0, 0)
    cached = known.get(rel)
    if cached is not None and cached[:5] == key and not cached[5].startswith(_UNREADABLE):
      if cached[5] or not local or _readable(path):
        return rel, cached, cached[5]
    problem = image_problem(path) if key[1] else "empty file (0 bytes)"
    problem = re.sub(r"\s+", " ", problem)
    return rel, key + (problem,), problem

  with concurrent.futures.ThreadPoolExecutor(min(32, 2 * (os.cpu_count() or 1))) as pool:
    results = list(pool.map(verdict, paths))
  entries = {rel: entry for rel, entry, _ in results if entry is not None}
  if entries != known:
    _write_manifest(candidates, entries)
  problems = {p: problem for p, (_, _, problem) in zip(paths, results)}
  bad = [p for p in paths if problems[p]]
  new_bad = [p for p in bad if p not in _reported]
  for p in new_bad:
    _reported.add(p)
    logging.warning("skipping unreadable image %s: %s", p, problems[p])
  if new_bad:
    logging.warning("%d of %d files in %s are unreadable and skipped", len(bad), len(paths), root)
  return problems


def training_classes(config: ml_collections.ConfigDict) -> Optional[list[str]]:
  """The class names of a folder's training split (config.split), whose indices every other
  split's labels take; None when it has no classes."""
  _, labels, classes = list_folder(config.data_dir, config.split)
  return None if labels is None else classes


def _folder_source(config, process_index, process_count, split=None) -> _Source:
  """Evaluation: strided shards, so each process sees every class; every image is kept.
  Labels are the training split's class indices (an evaluation split may lack classes, not
  add them), so a probe or an evaluation never scores against another numbering."""
  split = split or config.split
  classes = None if split == config.split else training_classes(config)
  paths, labels, _ = list_folder(config.data_dir, split, classes)
  sl = slice(process_index, None, process_count)
  elements = {"path": paths[sl]}
  if labels is not None:
    elements["label"] = np.asarray(labels[sl], np.int32)
  return _Source(tf.data.Dataset.from_tensor_slices(elements), len(paths[sl]), 0)


# ----------------------------------------------------------------------------- pipeline


def _hide_accelerators_from_tf():
  """TF must not take accelerator memory that JAX needs (no-op for tensorflow-cpu)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass


def _autotune(n: int) -> int:
  return tf.data.AUTOTUNE if n == -1 else int(n)


def make_pretrain_dataset(config: ml_collections.ConfigDict, global_batch: int,
                          start_step: int = 0, *, process_index: Optional[int] = None,
                          process_count: Optional[int] = None, view=None,
                          source: Optional[Source] = None) -> tf.data.Dataset:
  """The infinite per-process dataset of batches from `start_step` on (see the module docstring).

  Elements: {'image': uint8 [global_batch // process_count, img_size, img_size, 3] (the `view`'s
  dtype: fine-tuning's is normalised float32),
  'label': int32 [b] when the source has labels}. `view(raw_bytes, seed) -> image` replaces
  SimMIM's augmentation (fine-tuning passes its own); the stream and its seeds are the same.
  `source`: the run's `open_source(config)`, whose folder listing is then used as it is.
  """
  first, local_batch = process_rows(global_batch, process_index, process_count)
  process_index, process_count = first // local_batch, global_batch // local_batch
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if config.dataset == "synthetic":
    raise ValueError("the 'synthetic' source is numpy: use eesmm_jax.data.create_pretrain_iterator")
  _hide_accelerators_from_tf()
  options = tf.data.Options()
  options.deterministic = True

  size = int(config.img_size)
  if view is None:
    scale, ratio = tuple(config.crop_scale), tuple(config.crop_ratio)
    view = lambda raw, example_seed: augment(raw, example_seed, size, scale, ratio)
  parallel = _autotune(config.num_parallel_calls)
  if config.dataset == "folder":
    # This process's rows of each global batch, as positions in the global stream.
    positions = tf.data.Dataset.range(start_step, _FOREVER).flat_map(
        lambda k: tf.data.Dataset.range(k * global_batch + first,
                                        k * global_batch + first + local_batch))
    listing = source.listing if source else list_folder(config.data_dir, config.split)
    ds = positions.interleave(_folder_examples(config, view, listing), cycle_length=parallel,
                              block_length=1, num_parallel_calls=parallel, deterministic=True)
  else:
    ds = _tfds_stream(config, process_index, process_count, start_step * local_batch, view,
                      parallel)
  ds = ds.batch(local_batch, drop_remainder=True)
  if config.prefetch:
    ds = ds.prefetch(_autotune(config.prefetch))
  return ds.with_options(options)


def _folder_examples(config, view, listing):
  """Global stream position -> a dataset of one augmented example of a folder (the module
  docstring's order). An image that cannot be read or decoded now (it went, or was truncated
  or overwritten after the folder was checked) is replaced by the image at the next position,
  under the same augmentation seed, so the batch keeps its size and every process still agrees
  on its rows; 'wanted' and 'tries' tell `_named_stand_ins` which file failed. After
  STAND_IN_TRIES failures the element is a zero marker with tries = STAND_IN_TRIES."""
  paths, labels, _ = listing
  n = len(paths)
  table = tf.constant(paths)
  if config.cache:  # every file read once, in parallel; the bytes stay in memory
    table = tf.data.Dataset.from_tensor_slices(table).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE).batch(n).get_single_element()
  label_table = None if labels is None else tf.constant(labels, tf.int32)
  shuffle_base = tf.random.experimental.stateless_fold_in([int(config.seed), 1], 0)
  augment_base = tf.random.experimental.stateless_fold_in([int(config.seed), 1], 1)

  def index_at(j):
    epoch_seed = tf.random.experimental.stateless_fold_in(shuffle_base, j // n)
    return tf.random.experimental.index_shuffle(j % n, epoch_seed, tf.constant(n - 1, tf.int64))

  def attempt(i, r):
    k = index_at(i + r)
    raw = table[k] if config.cache else tf.io.read_file(table[k])
    seed = tf.random.experimental.stateless_fold_in(augment_base, i)
    out = {"image": view(raw, seed), "wanted": index_at(i), "tries": r}
    if label_table is not None:
      out["label"] = label_table[k]
    return out

  def example(i):
    tries = tf.data.Dataset.range(STAND_IN_TRIES).map(lambda r: attempt(i, r)).ignore_errors()
    marker = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                   tries.element_spec)
    marker = {**marker, "wanted": index_at(i), "tries": tf.constant(STAND_IN_TRIES, tf.int64)}
    return tries.concatenate(tf.data.Dataset.from_tensors(marker)).take(1)

  return example


def _named_stand_ins(batches, listing, bad_images: list):
  """Numpy batches without the stand-in bookkeeping; an image replaced because it could not be
  read is logged by name once and appended to `bad_images` (the run's count)."""
  paths = listing[0]
  root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  named = {p for p, _ in bad_images}
  for batch in batches:
    tries, wanted = batch.pop("tries"), batch.pop("wanted")
    if tries.any():
      if (tries >= STAND_IN_TRIES).any():
        raise ValueError(f"no readable image in {root!r}: {STAND_IN_TRIES} images in a row "
                         f"failed to read or decode while a batch was built (the folder "
                         f"changed since it was listed?)")
      for k in wanted[tries > 0].tolist():
        path = paths[k]
        if path not in named:
          named.add(path)
          why = "it could not be read or decoded when its batch was built"
          bad_images.append((path, why))
          logging.warning("skipping unreadable image %s: %s (another image of the epoch takes "
                          "its place)", path, why)
    yield batch


def _tfds_stream(config, process_index, process_count, position, view, parallel):
  """This process's augmented examples of a TFDS dataset, from local stream `position` on."""
  source = _tfds_source(config, process_index, process_count)
  records = source.records.cache() if config.cache else source.records
  base = tf.random.experimental.stateless_fold_in([int(config.seed), 1], process_index)

  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(base, e)
    shuffle_seed = tf.random.stateless_uniform([], epoch_seed, None, None, tf.int64)
    shuffled = records.shuffle(source.shuffle_buffer, seed=shuffle_seed,
                               reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (
        tf.random.experimental.stateless_fold_in(epoch_seed, i), ex))

  def load(example_seed, ex):
    out = {"image": view(ex["raw"], example_seed)}
    if "label" in ex:
      out["label"] = ex["label"]
    return out

  ds = tf.data.Dataset.range(position // source.num_local, _FOREVER).flat_map(epoch)
  ds = ds.skip(position % source.num_local)
  return ds.map(load, num_parallel_calls=parallel)


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, source: Optional[Source] = None,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """Numpy batches of this process, batch k of the run first when start_step = k.

  Feed each to `jax.make_array_from_process_local_data(sharding, batch['image'])`. A run that
  saved its step k resumes with the batches it would have seen: pass start_step=k.
  process_index / process_count default to JAX's (pass them to simulate other processes).
  """
  ds = make_pretrain_dataset(config, global_batch, start_step, process_index=process_index,
                             process_count=process_count, source=source)
  return numpy_batches(ds, config, source)


def numpy_batches(ds: tf.data.Dataset, config, source: Optional[Source] = None) -> Iterator[dict]:
  """`make_pretrain_dataset`'s batches as numpy; a folder's replaced images named and counted
  in `source.bad_images` (or a list of their own)."""
  batches = ds.as_numpy_iterator()
  if config.dataset != "folder":
    return batches
  listing = source.listing if source else list_folder(config.data_dir, config.split)
  return _named_stand_ins(batches, listing, source.bad_images if source else [])


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
  first, local_batch = process_rows(global_batch, process_index, process_count)
  process_index, process_count = first // local_batch, global_batch // local_batch
  if config.dataset == "synthetic":
    raise ValueError("dataset 'synthetic' has no evaluation split")
  _hide_accelerators_from_tf()
  split = split or config.split
  if config.dataset == "folder":
    source = _folder_source(config, process_index, process_count, split)
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
  if config.dataset == "folder":
    return len(list_folder(config.data_dir, split or config.split)[0])
  return _tfds_source(config, 0, 1, split, train=False).num_local
