"""IDX datasets (Fashion-MNIST, MNIST) as a TF-free, in-memory numpy source.

The IDX files (gzip or raw) are read once into memory: 28 x 28 grey uint8 images and their
labels, train and test as published. Everything a run needs comes from those arrays, so
pretraining, the frozen evaluations and fine-tuning on these datasets need neither TensorFlow
nor TFDS (the accelerator images carry JAX, Flax, Optax, Orbax and numpy only).

Splits: 'train' and 'test' as published, 'train[:N]' (the first N images, which the publishers
shuffled), and a fixed class-balanced fraction 'train[10%]' or 'train[:6000][1%]': the same
number of images of every class, drawn once with a fixed seed from the labels alone, so every
method and every seed fine-tunes on the very same images.

Images to `img_size`: each 28 x 28 image is scaled by the integer factor img_size // 28
(bilinear; factor 1 at 32 px, so the pixels are untouched) and zero-padded, centred, to
img_size x img_size. Zero is the datasets' background, so padding adds no edge, and no
interpolation blurs the 32 px input. Grey is repeated into 3 channels (the ImageNet
normalisation then differs per channel only by its constants).

Views, each one batched resampling (two small matrix products per image, no per-image Python),
made by a few threads ahead of the step:
* pretraining: SimMIM's RandomResizedCrop (scale config.crop_scale, ratio config.crop_ratio,
  torchvision's 10 tries then the whole image) of the padded image, bilinear, and a horizontal
  flip with p 0.5; uint8, normalised on the device by the train step;
* fine-tuning: the standard Fashion-MNIST recipe, a random crop with config.crop_padding pixels
  of zero padding (default img_size // 8: 4 at 32 px; 0: none) and a horizontal flip; uint8,
  normalised on the device by the fine-tune step;
* evaluation: the padded image itself (config.eval_crop_pct has no meaning for a 28 px image
  that fills its frame), in order, the last batch padded and marked in 'mask'.

The stream is `synthetic`'s and `tfdata`'s folder rule: global position i holds image
perm_e[i % N] of epoch e = i // N (perm_e drawn from (seed, e)), step k's global batch is
positions [k B, (k + 1) B) and process p takes rows [p b, (p + 1) b). Augmentation is drawn per
global batch from (seed, view, k), so a batch is the same on any number of processes and a run
resumes at any step with nothing to skip.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import os
import re
import weakref
from typing import Iterator, Optional

import ml_collections
import numpy as np

from eesmm_jax.data.common import MEAN_RGB, STDDEV_RGB, Source, process_rows

SIDE = 28
NUM_CLASSES = 10
# IDX magic numbers: 0x0000, the element type (0x08 = unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# The published file names (without .gz) of each split.
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# The class-balanced subsets are drawn with this seed, never the run's: one subset for all.
SUBSET_SEED = 20240527
# Stream tags of the augmentation draws (pretraining and fine-tuning draw differently).
_PRETRAIN, _FINETUNE = 1, 2


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  default_dir: Optional[str]
  how_to_get: str


DATASETS = {
    "fashion_mnist": IdxDataset(
        "/usr/share/datasets/fashion-mnist",
        "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (Debian, "
        "Ubuntu), or set config.data.data_dir to a folder of its four IDX files"),
    "mnist": IdxDataset(
        None, "set config.data.data_dir to a folder of MNIST's four IDX files (train-images-"
              "idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)"),
}


# ----------------------------------------------------------------------------- the IDX format


def read_idx(path: str, expected_magic: Optional[int] = None) -> np.ndarray:
  """An IDX file (gzip-compressed or raw, told apart by its first bytes) as a numpy array.

  A file whose magic number is not `expected_magic` (or not IDX at all), a truncated or corrupt
  file raise a ValueError of one line naming the file.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable gzip file ({e})") from None
  if len(raw) < 4:
    raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
  magic = int.from_bytes(raw[:4], "big")
  kind = _IDX_TYPES.get(raw[2])
  if expected_magic is not None and magic != expected_magic:
    raise ValueError(f"{path}: IDX magic number 0x{magic:08X} found, 0x{expected_magic:08X} "
                     f"expected (not the {_magic_name(expected_magic)} file this split needs)")
  if raw[:2] != b"\0\0" or kind is None:
    raise ValueError(f"{path}: magic number 0x{magic:08X} is not IDX (0x0000 then a type of "
                     f"{sorted(f'0x{t:02X}' for t in _IDX_TYPES)} and the dimensions)")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: the header of {ndim} dimensions is cut short")
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(kind)
  needed = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != needed:
    raise ValueError(f"{path}: {len(raw) - header} bytes of data where shape {dims} needs "
                     f"{needed}: the file is truncated or corrupt")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _magic_name(magic: int) -> str:
  return {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(magic, "IDX")


def write_idx(path: str, array: np.ndarray) -> None:
  """`array` (uint8) as an IDX file, gzip-compressed when `path` ends in .gz (the tests' data)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  body = header + array.tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(body, mtime=0) if path.endswith(".gz") else body)


# ----------------------------------------------------------------------------- the published arrays

_CACHE: dict = {}


def _data_dir(config: ml_collections.ConfigDict) -> str:
  if config.dataset not in DATASETS:
    raise ValueError(f"{config.dataset!r} is not an IDX dataset ({sorted(DATASETS)})")
  spec = DATASETS[config.dataset]
  directory = config.data_dir or spec.default_dir
  if not directory:
    raise ValueError(f"dataset {config.dataset!r} needs config.data_dir: {spec.how_to_get}")
  return directory


def _find(directory: str, name: str, dataset: str) -> str:
  for candidate in (name + ".gz", name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise ValueError(f"dataset {dataset!r}: {os.path.join(directory, name)}[.gz] not found; "
                   f"{DATASETS[dataset].how_to_get}")


def published(config: ml_collections.ConfigDict, base: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int32 [N]) of the published split `base` ('train' or
  'test'), read once per process (again only if a file changed on disk)."""
  directory = _data_dir(config)
  paths = [_find(directory, name, config.dataset) for name in FILES[base]]
  key = tuple((os.path.abspath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
  if key not in _CACHE:
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
      raise ValueError(f"{paths[0]}: images of shape {images.shape[1:]}, expected "
                       f"({SIDE}, {SIDE})")
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f"{paths[1]}: {labels.shape} labels for {len(images)} images in "
                       f"{paths[0]}")
    if len(labels) and labels.max() >= NUM_CLASSES:
      raise ValueError(f"{paths[1]}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    _CACHE[key] = (images, labels.astype(np.int32))
  return _CACHE[key]


# ----------------------------------------------------------------------------- splits

_SPLIT = re.compile(r"^(train|test)(?:\[:(\d+)\])?(?:\[(\d+(?:\.\d+)?)%\])?$")


def parse_split(split: str) -> tuple[str, Optional[int], Optional[float]]:
  """'train[:6000][10%]' -> ('train', 6000, 10.0)."""
  m = _SPLIT.match(split or "")
  if not m:
    raise ValueError(f"split {split!r} is not one of 'train', 'test', 'train[:N]' (the first N), "
                     f"'train[P%]' or 'train[:N][P%]' (a fixed class-balanced P%)")
  base, limit, percent = m.groups()
  limit = None if limit is None else int(limit)
  percent = None if percent is None else float(percent)
  if limit is not None and limit < 1:
    raise ValueError(f"split {split!r}: N must be >= 1")
  if percent is not None and not 0 < percent <= 100:
    raise ValueError(f"split {split!r}: P must be in (0, 100]")
  return base, limit, percent


def balanced_subset(labels: np.ndarray, percent: float, seed: int = SUBSET_SEED) -> np.ndarray:
  """Sorted indices of floor(percent / 100 * N / classes) images of every class, drawn from
  (labels, seed) alone."""
  classes = int(labels.max()) + 1 if len(labels) else 0
  per_class = int(percent / 100 * len(labels) / max(classes, 1))
  counts = np.bincount(labels, minlength=classes)
  if per_class < 1 or per_class > counts.min():
    raise ValueError(f"a class-balanced {percent:g}% of {len(labels)} images needs "
                     f"{per_class} per class, between 1 and the rarest class's {counts.min()}")
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(classes)]
  return np.sort(np.concatenate(chosen))


def split_indices(config: ml_collections.ConfigDict, split: Optional[str] = None) -> np.ndarray:
  """Indices into the published split that `split` (default config.split) selects."""
  base, limit, percent = parse_split(split or config.split)
  _, labels = published(config, base)
  if limit is not None and limit > len(labels):
    raise ValueError(f"split {split or config.split!r}: {base} has {len(labels)} images, "
                     f"fewer than {limit}")
  indices = np.arange(len(labels) if limit is None else limit)
  if percent is not None:
    indices = indices[balanced_subset(labels[indices], percent)]
  return indices


def split_arrays(config: ml_collections.ConfigDict, split: Optional[str] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(grey images uint8 [N, 28, 28], labels int32 [N]) of `split`."""
  base, _, _ = parse_split(split or config.split)
  images, labels = published(config, base)
  indices = split_indices(config, split)
  return images[indices], labels[indices]


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """The files are there and well formed, the split and img_size are valid: before any compile."""
  if int(config.img_size) < SIDE:
    raise ValueError(f"config.img_size={config.img_size}: dataset {config.dataset!r} needs >= "
                     f"{SIDE} (its {SIDE} px images are padded, never shrunk)")
  crop_padding(config)
  split_indices(config)


def crop_padding(config: ml_collections.ConfigDict) -> int:
  """Pixels of zero padding of the fine-tuning crop (config.crop_padding; None = img_size // 8)."""
  pad = config.get("crop_padding")
  if pad is None:
    return int(config.img_size) // 8
  if not 0 <= int(pad) <= int(config.img_size) // 2:
    raise ValueError(f"config.data.crop_padding={pad!r}: pixels of padding of the fine-tuning "
                     f"crop, 0..{int(config.img_size) // 2} (0 = no crop), or None for "
                     f"img_size // 8")
  return int(pad)


def open_source(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Source:
  check_data_config(config)
  return Source(num_examples(config, split))


def num_examples(config: ml_collections.ConfigDict, split: Optional[str] = None) -> int:
  return int(len(split_indices(config, split)))


def check_finetune_aug(aug: ml_collections.ConfigDict) -> None:
  """The numpy fine-tuning view is crop-with-padding + flip: refuse what it does not do."""
  for key, off in (("randaug_num_ops", 0), ("reprob", 0.0)):
    if aug[key] != off:
      raise ValueError(f"config.aug.{key}={aug[key]!r}: the IDX datasets' numpy fine-tuning "
                       f"input has no RandAugment or random erasing (its view is a padded random "
                       f"crop and a flip); set config.aug.{key}={off}")


# ----------------------------------------------------------------------------- resampling


def _taps(coords: np.ndarray, size: int) -> np.ndarray:
  """Bilinear weights float32 [b, n, size] sampling a length-`size` signal at `coords` [b, n]
  (pixel centres at integers); taps outside [0, size) weigh nothing (zero padding)."""
  low = np.floor(coords)
  frac = (coords - low).astype(np.float32)
  low = low.astype(np.int64)
  weights = np.zeros(coords.shape + (size,), np.float32)
  b, n = np.indices(coords.shape)
  for tap, weight in ((low, 1.0 - frac), (low + 1, frac)):
    inside = (tap >= 0) & (tap < size)
    weights[b[inside], n[inside], tap[inside]] += weight[inside]
  return weights


def resample(images: np.ndarray, top: np.ndarray, left: np.ndarray, height: np.ndarray,
             width: np.ndarray, flip: np.ndarray, img_size: int) -> np.ndarray:
  """The window (top, left, height, width) of each image's padded canvas (the 28 px image
  scaled by img_size // 28 and centred on img_size x img_size zeros; window coordinates in
  canvas pixels, possibly outside it) resampled bilinearly to img_size x img_size, flipped where
  `flip`. images uint8 [b, 28, 28] -> float32 [b, S, S] in [0, 255]."""
  scale = img_size // SIDE
  offset = (img_size - SIDE * scale) / 2.0
  u = np.arange(img_size) + 0.5

  def source_coords(start, extent):  # output pixel -> canvas -> source pixel coordinate
    canvas = start[:, None] + u[None, :] * (extent[:, None] / img_size)
    return (canvas - offset) / scale - 0.5

  rows = _taps(source_coords(np.asarray(top, np.float64), np.asarray(height, np.float64)), SIDE)
  cols = _taps(source_coords(np.asarray(left, np.float64), np.asarray(width, np.float64)), SIDE)
  cols = np.where(np.asarray(flip)[:, None, None], cols[:, ::-1], cols)
  return np.matmul(np.matmul(rows, images.astype(np.float32)), np.swapaxes(cols, 1, 2))


def _to_uint8_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _normalized_rgb(grey: np.ndarray) -> np.ndarray:
  """Grey pixels (uint8, or floats rounded as uint8 would be) -> ImageNet-normalised float32
  RGB, as `data.normalize` does on the device."""
  grey = np.clip(np.round(grey), 0, 255).astype(np.float32)[..., None] / 255.0
  return (grey - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)


def padded(images: np.ndarray, img_size: int) -> np.ndarray:
  """The evaluation view: uint8 [b, S, S, 3], the image scaled and centred on zeros."""
  n = len(images)
  full = np.full(n, float(img_size))
  zero = np.zeros(n)
  return _to_uint8_rgb(resample(images, zero, zero, full, full, np.zeros(n, bool), img_size))


def random_resized_crop(rng: np.random.Generator, n: int, size: int, scale, ratio,
                        attempts: int = 10) -> tuple[np.ndarray, ...]:
  """(top, left, height, width) of torchvision's RandomResizedCrop.get_params on a size x size
  canvas, for n images at once: the first of 10 tries that fits, else the whole canvas."""
  area = size * size * rng.uniform(scale[0], scale[1], (n, attempts))
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts)))
  w = np.round(np.sqrt(area * aspect))
  h = np.round(np.sqrt(area / aspect))
  ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
  first = np.argmax(ok, axis=1)
  found = ok[np.arange(n), first]
  h = np.where(found, h[np.arange(n), first], size)
  w = np.where(found, w[np.arange(n), first], size)
  uy, ux = rng.uniform(size=(2, n))
  top = np.where(found, np.floor(uy * (size - h + 1)), 0)
  left = np.where(found, np.floor(ux * (size - w + 1)), 0)
  return top, left, h, w


# ----------------------------------------------------------------------------- the streams


def _global_draws(rng, global_batch, config, kind):
  """The random parameters of a whole global batch's views (both views draw in this order)."""
  size = int(config.img_size)
  if kind == _PRETRAIN:
    window = random_resized_crop(rng, global_batch, size, tuple(config.crop_scale),
                                 tuple(config.crop_ratio))
  else:
    pad = crop_padding(config)
    top, left = rng.integers(-pad, pad + 1, (2, global_batch)).astype(np.float64)
    window = (top, left, np.full(global_batch, float(size)), np.full(global_batch, float(size)))
  flip = rng.uniform(size=global_batch) < 0.5
  return window + (flip,)


def _batch(config, images, labels, global_batch, step, kind, first, local) -> dict:
  """Step `step`'s rows [first, first + local) of the global batch: a pure function of
  (config.seed, step)."""
  n, seed, size = len(labels), int(config.seed), int(config.img_size)
  positions = step * global_batch + np.arange(first, first + local)
  epochs, offsets = np.divmod(positions, n)
  chosen = np.empty(local, np.int64)
  for e in np.unique(epochs):
    chosen[epochs == e] = _permutation(seed, int(e), n)[offsets[epochs == e]]
  # The whole global batch's draws, this process's rows of them: a batch does not depend on
  # the number of processes.
  rows = slice(first, first + local)
  top, left, h, w, flip = (a[rows] for a in _global_draws(
      np.random.default_rng([seed, kind, step]), global_batch, config, kind))
  grey = resample(images[chosen], top, left, h, w, flip, size)
  return {"image": _to_uint8_rgb(grey), "label": labels[chosen]}


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _batches(config, global_batch, start_step, kind, process_index, process_count):
  """Batches start_step, start_step + 1, ... made by a few threads ahead of the consumer (numpy
  releases the GIL in its array work), yielded in order."""
  first, local = process_rows(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  images, labels = split_arrays(config)
  if not len(labels):
    raise ValueError(f"split {config.split!r} of {config.dataset!r} is empty")
  workers = max(1, min(4, (os.cpu_count() or 1) - 1))
  make = functools.partial(_batch, config, images, labels, global_batch, kind=kind, first=first,
                           local=local)
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="idx")

  def ordered():
    ahead = collections.deque(pool.submit(make, step=s)
                              for s in range(start_step, start_step + 2 * workers))
    step = start_step + 2 * workers
    while True:
      batch = ahead.popleft().result()
      ahead.append(pool.submit(make, step=step))
      step += 1
      yield batch

  stream = ordered()
  # The threads stop when the consumer drops the iterator (or at exit, before module teardown).
  weakref.finalize(stream, pool.shutdown, wait=False, cancel_futures=True)
  return stream


def create_pretrain_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """{'image': uint8 [b, S, S, 3], 'label': int32 [b]} of this process, step start_step first."""
  return _batches(config, global_batch, start_step, _PRETRAIN, process_index, process_count)


def create_finetune_iterator(config: ml_collections.ConfigDict, global_batch: int,
                             start_step: int = 0, *, process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> Iterator[dict]:
  """{'image': uint8 [b, S, S, 3], 'label': int32 [b]}, step start_step first: the fine-tune
  step normalises uint8 images on the device (`data.normalize`)."""
  return _batches(config, global_batch, start_step, _FINETUNE, process_index, process_count)


def create_eval_iterator(config: ml_collections.ConfigDict, global_batch: int,
                         split: Optional[str] = None, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterator[dict]:
  """One ordered pass over `split`: {'image': float32 normalised, 'label', 'mask'}; process p
  takes the p-th of process_count equal shares, every process the same number of batches, the
  padding zero images with 'mask' False (as `tfdata.create_eval_iterator`)."""
  first, local = process_rows(global_batch, process_index, process_count)
  index, count = first // local, global_batch // local
  images, labels = split_arrays(config, split)
  share = -(-len(labels) // count)
  mine = np.arange(index * share, min((index + 1) * share, len(labels)))
  size = int(config.img_size)
  for start in range(0, max(share, 1), local):
    rows = mine[start:start + local]
    real = len(rows)
    image = np.zeros((local, size, size, 3), np.float32)
    label = np.zeros((local,), np.int32)
    if real:
      image[:real] = _normalized_rgb(padded(images[rows], size)[..., 0])
      label[:real] = labels[rows]
    yield {"image": image, "label": label, "mask": np.arange(local) < real}
