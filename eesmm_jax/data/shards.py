"""Prepared shards: a split decoded once into fixed-size square uint8 images, read with numpy.

tf.data decodes an ImageNet-sized JPEG per image and step; at 192 px that is about 150 images/s
per core, while one accelerator steps thousands, and accelerator images carry no TensorFlow. So
a split is decoded once (`python -m eesmm_jax.prepare`, `write_shards`): each image's centre
square (side min(h, w)) resized to `stored_size` px (4/3 of img_size by default: 256 for 192),
stored as raw uint8 (the default) or as a small JPEG. Pretraining then reads batches of stored
images with numpy and reader threads (`pretrain_batches`), and SimMIM's random-resized crop and
flip run on the device inside the train step (`device_augment`).

A shard directory:

  plan.json                       what is being written (source, sizes, shard size): every
                                  process and every resume checks it is writing the same thing
  shard-00003-of-00626.npy        raw form: uint8 [count, S, S, 3], a .npy file (memmap-able)
  shard-00003-of-00626.jpg        jpeg form: the JPEGs one after another
  shard-00003-of-00626.json       a shard's record (count, bytes, labels, JPEG offsets, images
                                  skipped): written last, so a shard is finished exactly when
                                  its record exists and its data file has the recorded size
  index.json                      every record, written once all shards are finished

Shard j holds source examples [j * shard_size, (j + 1) * shard_size), less any that fail to
decode (named in its record, and counted in the trainer's bad_images). Data files and records
are written to a temporary name and renamed, so a killed run leaves no shard that looks
finished; running again writes only the unfinished ones. Several processes write disjoint,
contiguous ranges of shards (`process_shards`) at once; whichever finishes last writes the index.

The reader's stream is the folder stream's rule (`tfdata`) with a numpy shuffle: global
position i holds example perm_e[i % N] of epoch e = i // N, perm_e a permutation drawn from
(seed, e); step k's global batch is positions [k * B, (k + 1) * B), of which process p takes
rows [p * b, (p + 1) * b). So a batch is a pure function of (seed, step), the same on any
number of processes, and a run resumes at any step with nothing to skip. The per-image
augmentation is drawn on the device from the step's key, so it too depends on the step alone.

Sources (`write_shards`' `source`): anything with `num_examples`, `classes` (names, or None when
unlabelled), `bad_images` ([(name, why)] left out before reading), `description` (a dict naming
it, compared on resume) and `read(start, stop)` yielding (index, image, label, problem) for
every index in [start, stop) in order: image uint8 [h, w], [h, w, 1], [h, w, 3] or [h, w, 4]
(alpha dropped), label -1 when unlabelled, problem '' or why the image could not be decoded
(then image is None). `ArraySource` is the numpy one; `tfdata.DecodedImages` reads folders and
TFDS through tf.data's listing, checks and decode.

Imports numpy only (Pillow where images are resized or JPEG-coded): no TensorFlow.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import io
import json
import math
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from eesmm_jax.data.common import Source, process_rows

FORMAT = "eesmm_jax shards v1"
FORMS = ("raw", "jpeg")
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
DEFAULT_SHARD_SIZE = 2048
_EXT = {"raw": "npy", "jpeg": "jpg"}
# plan.json keys that must agree between the processes and resumes writing one directory.
_PLAN_KEYS = ("format", "form", "stored_size", "shard_size", "num_examples", "num_shards",
              "classes", "source", "quality")


def default_stored_size(img_size: int) -> int:
  """4/3 of img_size, to a multiple of 8 (256 for 192, 296 for 224): the random-resized crop
  takes at least 0.67 of the area, about 0.82 of the side, so its views are rarely upsampled."""
  return max(8, int(round(img_size * 4 / 3 / 8)) * 8)


# ----------------------------------------------------------------------------- sources


class ArraySource:
  """Decoded images held in memory (a numpy array [N, h, w(, c)] or a list of arrays of any
  sizes), with labels [N] or None: the interface `write_shards` reads, for in-memory datasets."""

  def __init__(self, images, labels=None, classes: Optional[Sequence[str]] = None,
               name: str = "arrays"):
    if labels is not None and len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if labels is not None and classes is None:
      classes = [str(c) for c in range(int(np.max(labels)) + 1)]
    self.images, self.labels = images, labels
    self.num_examples = len(images)
    self.classes = None if labels is None else list(classes)
    self.bad_images: list = []
    self.description = {"dataset": name, "num_examples": self.num_examples}

  def name(self, index: int) -> str:
    return f"{self.description['dataset']}[{index}]"

  def read(self, start: int, stop: int) -> Iterator[tuple]:
    for i in range(start, stop):
      label = -1 if self.labels is None else int(self.labels[i])
      yield i, np.asarray(self.images[i]), label, ""


def square_view(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the centre square of side min(h, w), resized with Pillow's bilinear
  filter (antialiased when shrinking, as tf.data's resize is). Grey images become RGB."""
  from PIL import Image  # only to write shards; the reader of raw shards never needs it
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
    raise ValueError(f"expected an image [h, w], [h, w, 1], [h, w, 3] or [h, w, 4], got shape "
                     f"{image.shape}")
  h, w = image.shape[:2]
  side = min(h, w)
  box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  picture = Image.fromarray(image).convert("RGB")
  if (h, w) == (size, size):
    return np.asarray(picture)
  return np.asarray(picture.resize((size, size), Image.BILINEAR, box=box))


# ----------------------------------------------------------------------------- writing


class NotEnoughSpace(ValueError):
  """The disk holding the shards has less free space than they will take."""


def shard_bounds(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
  """[(start, stop)] of every shard's source examples."""
  return [(s, min(s + shard_size, num_examples)) for s in range(0, num_examples, shard_size)]


def process_shards(num_shards: int, num_processes: int, process_index: int) -> range:
  """The contiguous, disjoint range of shards process `process_index` of `num_processes`
  writes; together the ranges cover every shard."""
  if num_processes < 1 or not 0 <= process_index < num_processes:
    raise ValueError(f"--process_index {process_index} must lie in [0, --num_processes="
                     f"{num_processes})")
  return range(num_shards * process_index // num_processes,
               num_shards * (process_index + 1) // num_processes)


def shard_name(j: int, num_shards: int, form: str) -> str:
  return f"shard-{j:05d}-of-{num_shards:05d}.{_EXT[form]}"


def _record_path(out: str, name: str) -> str:
  return os.path.join(out, os.path.splitext(name)[0] + ".json")


def _write_json(path: str, value) -> None:
  """Written under a temporary name, synced and renamed: a reader sees all of it or nothing."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_record(out: str, name: str) -> Optional[dict]:
  """A finished shard's record; None when the shard is not finished (no record, or a data file
  missing or of another size than recorded: a copy cut short, a file replaced)."""
  try:
    with open(_record_path(out, name)) as f:
      record = json.load(f)
    if os.path.getsize(os.path.join(out, name)) == record["bytes"]:
      return record
  except (OSError, ValueError, KeyError):
    pass
  return None


def _gb(n: float) -> str:
  """Bytes in the unit that shows them best (decimal units, as disks are sold)."""
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:,.2f} {unit}"
  return f"{n:,.0f} bytes"


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """One line: done / total, rate, ETA; rewritten in place on a terminal, else a line now and
  then (a log file should not get one per image)."""

  def __init__(self, total: int, what: str, stream=None, every_s: float = 30.0):
    self.total, self.what, self.done = total, what, 0
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = self.last = time.perf_counter()
    self.every_s = 0.5 if self.tty else every_s

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      self.show(now)

  def show(self, now: float) -> None:
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate > 0 else float("inf")
    line = (f"{self.what}: {self.done:,}/{self.total:,} images "
            f"({self.done / max(self.total, 1):.0%}), {rate:,.0f} images/s, ETA {_clock(left)}")
    end = "" if self.tty and self.done < self.total else "\n"
    print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


@dataclasses.dataclass
class WriteSummary:
  shards: range             # this process's range
  written: list[int]        # shards written now
  finished_before: list[int]  # shards found finished (not rewritten)
  index_written: bool       # every shard is finished and index.json is written


def write_shards(source, out: str, *, img_size: int, stored_size: Optional[int] = None,
                 form: str = "raw", quality: int = 90, shard_size: int = DEFAULT_SHARD_SIZE,
                 num_processes: int = 1, process_index: int = 0, threads: Optional[int] = None,
                 stream=None, _after_shard: Optional[Callable[[int], None]] = None
                 ) -> WriteSummary:
  """Writes this process's range of shards of `source` into `out` (see the module docstring),
  the unfinished ones only; says first how many and how much disk they take, and raises
  NotEnoughSpace (one line) when the disk lacks it. `threads` resize (and JPEG-code) images in
  parallel (default: the CPUs)."""
  if form not in FORMS:
    raise ValueError(f"--form {form!r} is unknown; choose one of {FORMS}")
  stored_size = int(stored_size or default_stored_size(img_size))
  if stored_size < img_size:
    raise ValueError(f"--stored_size {stored_size} is below --img_size {img_size}: every view "
                     f"would be upsampled")
  if shard_size < 1:
    raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
  if not 1 <= quality <= 100:
    raise ValueError(f"--quality must lie in [1, 100], got {quality}")
  n = int(source.num_examples)
  if n < 1:
    raise ValueError(f"the source {source.description} has no images")
  bounds = shard_bounds(n, shard_size)
  mine = process_shards(len(bounds), num_processes, process_index)
  stream = stream or sys.stdout
  os.makedirs(out, exist_ok=True)
  plan = dict(format=FORMAT, form=form, stored_size=stored_size, img_size=int(img_size),
              shard_size=int(shard_size), num_examples=n, num_shards=len(bounds),
              classes=source.classes, source=source.description,
              quality=int(quality) if form == "jpeg" else None,
              bad_images=[list(b) for b in source.bad_images])
  _check_plan(out, plan)

  names = [shard_name(j, len(bounds), form) for j in range(len(bounds))]
  done = [j for j in mine if _read_record(out, names[j]) is not None]
  todo = sorted(set(mine) - set(done))
  images_todo = sum(bounds[j][1] - bounds[j][0] for j in todo)
  threads = threads or os.cpu_count() or 1
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  try:
    if todo:
      per_image = _bytes_per_image(source, bounds[todo[0]], plan, pool)
      needed = images_todo * per_image
      free = shutil.disk_usage(out).free
      what = (f"raw uint8 {stored_size} px" if form == "raw" else
              f"JPEG q{quality} at {stored_size} px, estimated from a sample")
      print(f"prepare: process {process_index} of {num_processes} writes {len(todo)} of its "
            f"{len(mine)} shards ({len(done)} finished before; {len(bounds)} in all): "
            f"{images_todo:,} images, about {_gb(needed)} ({per_image:,.0f} bytes/image, "
            f"{what}); {_gb(free)} free in {out}", file=stream, flush=True)
      if needed > free:
        raise NotEnoughSpace(f"not enough disk space in {out}: the shards need about "
                             f"{_gb(needed)}, {_gb(free)} is free")
    else:
      print(f"prepare: the {len(mine)} shards of process {process_index} of {num_processes} "
            f"are finished already", file=stream, flush=True)
    progress = Progress(images_todo, f"prepare {out}", stream)
    for j in todo:
      _write_shard(source, out, names[j], bounds[j], plan, pool, progress)
      if _after_shard is not None:
        _after_shard(j)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  index_written = _write_index_if_complete(out, plan, names)
  if index_written:
    print(f"prepare: all {len(bounds)} shards of {out} are finished; {INDEX_FILE} written",
          file=stream, flush=True)
  return WriteSummary(mine, todo, done, index_written)


def _check_plan(out: str, plan: dict) -> None:
  path = os.path.join(out, PLAN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    differ = [k for k in _PLAN_KEYS if before.get(k) != plan.get(k)]
    if differ:
      raise ValueError(f"{out} holds shards of another preparation ({PLAN_FILE} differs in "
                       + ", ".join(f"{k}: {before.get(k)!r} there, {plan.get(k)!r} now"
                                   for k in differ)
                       + "): give another --out, or the same flags as before")
    return
  _write_json(path, plan)


def _encode(image: np.ndarray, plan: dict) -> bytes | np.ndarray:
  view = square_view(image, plan["stored_size"])
  if plan["form"] == "raw":
    return view
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(view).save(buffer, "JPEG", quality=plan["quality"])
  return buffer.getvalue()


def _bytes_per_image(source, bounds: tuple[int, int], plan: dict, pool) -> float:
  """Raw: exact. JPEG: the mean of up to 32 of the first shard's images, plus a tenth."""
  if plan["form"] == "raw":
    return 3.0 * plan["stored_size"] ** 2
  start, stop = bounds
  sample = [ex[1] for ex in source.read(start, min(stop, start + 32)) if not ex[3]]
  if not sample:
    return 3.0 * plan["stored_size"] ** 2
  sizes = list(pool.map(lambda im: len(_encode(im, plan)), sample))
  return 1.1 * float(np.mean(sizes))


def _write_shard(source, out: str, name: str, bounds: tuple[int, int], plan: dict, pool,
                 progress: Progress) -> None:
  """One shard: data file, then record, each written to a temporary name and renamed."""
  path = os.path.join(out, name)
  for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(
      glob.escape(_record_path(out, name)) + ".tmp-*"):
    os.remove(stale)  # left by a killed run: this process owns the shard now
  start, stop = bounds
  size = plan["stored_size"]
  tmp = f"{path}.tmp-{os.getpid()}"
  labels, skipped, offsets = [], [], [0]
  chunk = 64  # decoded images waiting for the pool: bounded, full-size images are large

  def encoded():
    pending = []
    for ex in source.read(start, stop):
      pending.append(ex)
      if len(pending) == chunk:
        yield from zip(pending, pool.map(lambda e: None if e[3] else _encode(e[1], plan),
                                         pending))
        pending = []
    yield from zip(pending, pool.map(lambda e: None if e[3] else _encode(e[1], plan), pending))

  expected = start
  if plan["form"] == "raw":
    # At most stop - start rows; the file is cut to the rows kept when some fail to decode.
    array = np.lib.format.open_memmap(tmp, "w+", np.uint8, (stop - start, size, size, 3))
    data_sink = None
  else:
    array, data_sink = None, open(tmp, "wb")
  try:
    for (index, _, label, problem), view in encoded():
      if index != expected:
        raise RuntimeError(f"the source yielded index {index}, expected {expected}")
      expected += 1
      progress.update(1)
      if problem:
        skipped.append([source.name(index), problem])
        continue
      if array is not None:
        array[len(labels)] = view
      else:
        data_sink.write(view)
        offsets.append(offsets[-1] + len(view))
      labels.append(int(label))
    if expected != stop:
      raise RuntimeError(f"the source yielded {expected - start} of the {stop - start} images "
                         f"[{start}, {stop}) of {name}")
    if array is not None:
      array.flush()
      del array
      if len(labels) < stop - start:
        _shrink_npy(tmp, len(labels), size)
    else:
      data_sink.flush()
      os.fsync(data_sink.fileno())
      data_sink.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if data_sink is not None:
      data_sink.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  record = dict(name=name, start=start, stop=stop, count=len(labels),
                bytes=os.path.getsize(path), labels=labels, skipped=skipped)
  if plan["form"] == "jpeg":
    record["offsets"] = offsets
  _write_json(_record_path(out, name), record)


def _shrink_npy(path: str, rows: int, size: int) -> None:
  """Keeps a raw shard's first `rows` rows (the images that decoded), in a .npy of that shape."""
  kept = f"{path}.kept"
  old = np.load(path, mmap_mode="r")
  new = np.lib.format.open_memmap(kept, "w+", np.uint8, (rows, size, size, 3))
  new[:] = old[:rows]
  new.flush()
  del new, old
  os.replace(kept, path)


def _write_index_if_complete(out: str, plan: dict, names: list[str]) -> bool:
  records = [_read_record(out, name) for name in names]
  if any(r is None for r in records):
    return False
  bad = [list(b) for b in plan["bad_images"]] + [s for r in records for s in r["skipped"]]
  index = {k: plan[k] for k in ("format", "form", "stored_size", "img_size", "shard_size",
                                "classes", "source", "quality")}
  index.update(num_examples=sum(r["count"] for r in records), bad_images=bad,
               shards=[{k: r[k] for k in ("name", "count", "bytes", "labels", "offsets")
                        if k in r} for r in records])
  _write_json(os.path.join(out, INDEX_FILE), index)
  return True


# ----------------------------------------------------------------------------- reading


class ShardError(ValueError):
  """A shard directory that cannot be read: no index, a shard missing or cut short."""


class Shards:
  """A finished shard directory, opened and checked: every shard named by the index exists
  with the size it was written with (a missing or truncated shard is named, in one line)."""

  def __init__(self, path: str):
    self.path = path
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.isdir(path):
      raise ShardError(f"config.data_dir {path!r} is not a directory (dataset 'shards' reads a "
                       f"directory written by `python -m eesmm_jax.prepare`)")
    if not os.path.exists(index_path):
      finished = len(glob.glob(os.path.join(glob.escape(path), "shard-*.json")))
      raise ShardError(
          f"no {INDEX_FILE} in {path}: the shards are not finished ({finished} shard records "
          f"there); run `python -m eesmm_jax.prepare` again with the same flags to finish them")
    try:
      with open(index_path) as f:
        index = json.load(f)
    except (OSError, ValueError) as e:
      raise ShardError(f"cannot read {index_path}: {e}") from None
    if index.get("format") != FORMAT:
      raise ShardError(f"{index_path} is not a shard index of this version (format "
                       f"{index.get('format')!r}, expected {FORMAT!r})")
    self.index = index
    self.form, self.size = index["form"], int(index["stored_size"])
    self.img_size = int(index["img_size"])
    self.classes = index["classes"]
    self.bad_images = [tuple(b) for b in index["bad_images"]]
    shards = index["shards"]
    problems = []
    for s in shards:
      file = os.path.join(path, s["name"])
      try:
        size = os.path.getsize(file)
      except OSError:
        problems.append(f"{s['name']} is missing")
        continue
      if size != s["bytes"]:
        problems.append(f"{s['name']} is truncated or changed ({size:,} bytes, the index says "
                        f"{s['bytes']:,})")
    if problems:
      raise ShardError(f"shards in {path}: " + "; ".join(problems) + " (run `python -m "
                       "eesmm_jax.prepare` again with the same flags to rewrite them)")
    self.names = [s["name"] for s in shards]
    counts = np.array([s["count"] for s in shards], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(counts)])
    self.num_examples = int(self.starts[-1])
    if self.num_examples != index["num_examples"] or self.num_examples < 1:
      raise ShardError(f"{index_path} is inconsistent: {self.num_examples} images in its "
                       f"shards, num_examples {index['num_examples']}")
    self.labels = (None if self.classes is None else
                   np.concatenate([np.asarray(s["labels"], np.int32) for s in shards]))
    self.offsets = ([np.asarray(s["offsets"], np.int64) for s in shards]
                    if self.form == "jpeg" else None)
    self._maps: list = [None] * len(shards)
    self._lock = threading.Lock()

  def _map(self, j: int):
    if self._maps[j] is None:
      with self._lock:
        if self._maps[j] is None:
          file = os.path.join(self.path, self.names[j])
          if self.form == "raw":
            m = np.load(file, mmap_mode="r")
            if m.shape != (self.starts[j + 1] - self.starts[j], self.size, self.size, 3):
              raise ShardError(f"{file} holds an array of shape {m.shape}, the index says "
                               f"{self.starts[j + 1] - self.starts[j]} images of {self.size} px")
          else:
            m = np.memmap(file, np.uint8, "r")
          self._maps[j] = m
    return self._maps[j]

  def locate(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Example numbers -> (shard, row in shard)."""
    j = np.searchsorted(self.starts, examples, side="right") - 1
    return j, examples - self.starts[j]

  def read_into(self, examples: np.ndarray, out: np.ndarray) -> None:
    """out[r] = the stored image of examples[r] (uint8 [S, S, 3])."""
    shard, row = self.locate(np.asarray(examples, np.int64))
    for r, (j, k) in enumerate(zip(shard.tolist(), row.tolist())):
      m = self._map(j)
      if self.form == "raw":
        out[r] = m[k]
      else:
        out[r] = _decode_jpeg(m[self.offsets[j][k]:self.offsets[j][k + 1]], self.size)


def _decode_jpeg(data: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(data.tobytes())) as image:
    pixels = np.asarray(image.convert("RGB"))
  if pixels.shape != (size, size, 3):
    raise ShardError(f"a stored JPEG decoded to shape {pixels.shape}, expected "
                     f"{(size, size, 3)}")
  return pixels


def open_shards(config) -> Shards:
  """The shard directory config.data_dir, checked, with img_size no larger than its images."""
  if not config.data_dir:
    raise ValueError("dataset 'shards' needs config.data_dir: a directory written by "
                     "`python -m eesmm_jax.prepare --out DIR`")
  shards = Shards(config.data_dir)
  if int(config.img_size) > shards.size:
    raise ValueError(f"config.img_size={config.img_size} is larger than the {shards.size} px "
                     f"images of the shards in {config.data_dir}: prepare them with --img_size "
                     f"{config.img_size}")
  return shards


def open_source(config) -> Source:
  shards = open_shards(config)
  return Source(shards.num_examples, list(shards.bad_images), shards, image_size=shards.size)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """Epoch `epoch`'s order of the n examples: a numpy permutation drawn from (seed, epoch)."""
  return np.random.default_rng([int(seed) % 2 ** 63, 1, int(epoch)]).permutation(n)


class _Order:
  """Global stream position -> example number, the last two epochs' permutations kept."""

  def __init__(self, seed: int, n: int):
    self.seed, self.n, self.perms = seed, n, {}

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs = positions // self.n
    out = np.empty_like(positions)
    for e in np.unique(epochs).tolist():
      if e not in self.perms:
        if len(self.perms) >= 2:
          del self.perms[min(self.perms)]
        self.perms[e] = epoch_permutation(self.seed, e, self.n)
      sel = epochs == e
      out[sel] = self.perms[e][positions[sel] % self.n]
    return out


def reader_threads(config) -> int:
  """config.num_parallel_calls reader threads; -1 = the CPUs this process may use."""
  n = int(config.num_parallel_calls)
  if n == -1:
    try:
      return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
      return os.cpu_count() or 1
  if n < 1:
    raise ValueError(f"config.num_parallel_calls must be -1 (every CPU) or >= 1, got {n}")
  return n


def pretrain_batches(config, global_batch: int, start_step: int = 0, *,
                     source: Optional[Source] = None, process_index: Optional[int] = None,
                     process_count: Optional[int] = None, threads: Optional[int] = None
                     ) -> Iterator[dict]:
  """This process's batches {'image': uint8 [b, S, S, 3] stored size, ['label'] int32 [b]}
  from `start_step` on (the module docstring's order). Reader threads fill the next
  config.prefetch batches (-1 = 2) while the current one is used."""
  first, local = process_rows(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  shards = source.listing if source is not None and isinstance(source.listing, Shards) \
      else open_shards(config)
  threads = threads or reader_threads(config)
  ahead = 2 if int(config.prefetch) == -1 else max(0, int(config.prefetch))
  order = _Order(int(config.seed), shards.num_examples)
  size = shards.size
  # Each batch is cut into pieces of about 16 rows so that every thread has some to fill.
  pieces = max(1, min(local, 4 * threads, -(-local // 16)))
  bounds = np.linspace(0, local, pieces + 1).astype(int)

  def submit(pool, step):
    positions = step * global_batch + first + np.arange(local, dtype=np.int64)
    examples = order(positions)
    batch = {"image": np.empty((local, size, size, 3), np.uint8)}
    if shards.labels is not None:
      batch["label"] = shards.labels[examples]
    futures = [pool.submit(shards.read_into, examples[a:b], batch["image"][a:b])
               for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return batch, futures

  pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="shard-reader")
  try:
    queue, step = [], start_step
    while True:
      while len(queue) <= ahead:
        queue.append(submit(pool, step))
        step += 1
      batch, futures = queue.pop(0)
      for f in futures:
        f.result()
      yield batch
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
