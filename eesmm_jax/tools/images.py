"""Image folders for the demo and the tests, and the throughput of every input path.

`python -m eesmm_jax.tools.images throughput --data_dir DIR [--make_sample N]` measures images/s
on 1 core and on all of them, at each --sizes, of each --paths: tf.data on the folder's JPEGs
('jpeg'), tf.data on a pre-resized copy ('resized'), the shard reader on raw and on JPEG shards
('shards', 'shards_jpeg'), and the raw shard reader followed by the device augmentation, jitted
on this host's CPU ('shards_device'); the copies and shards are made once under --work_dir, and
their bytes per image on disk are printed. `... augment_cost` times a small pretraining step
with and without the device augmentation in front. `... resize --data_dir DIR --out_dir OUT`
writes a pre-resized copy of a folder (docs/scale_out.md). `write_digits_folder` is the demo's
data: scikit-learn's digits as PNGs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import time

import ml_collections
import numpy as np
import tensorflow as tf

from eesmm_jax import data
from eesmm_jax.data import shards, tfdata


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


# ----------------------------------------------------------------------------- throughput


def write_resized_folder(data_dir: str, out_dir: str, split: str = "train",
                         shorter_side: int = 288, quality: int = 90) -> str:
  """A copy of a folder's readable images with the shorter side at most `shorter_side`, as JPEG.

  RandomResizedCrop at scale >= 0.67 never needs more than ~0.7 of the shorter side, so 288 px
  (1.5 x 192) keeps the 192 px views' detail while the decoder reads about a third of ImageNet's
  average pixels. Same layout (out_dir/split/<class>/...), so `data_dir=out_dir` trains on it.
  """
  from PIL import Image
  paths, _, _ = tfdata.list_folder(data_dir, split)
  root = os.path.join(data_dir, split) if tf.io.gfile.isdir(os.path.join(data_dir, split)) \
      else data_dir

  def convert(path):
    dst = os.path.splitext(os.path.join(out_dir, split, os.path.relpath(path, root)))[0] + ".jpg"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with tf.io.gfile.GFile(path, "rb") as f, Image.open(f) as image:
      image.draft("RGB", (shorter_side, shorter_side))  # JPEG: decode at a reduced scale
      image = image.convert("RGB")
      factor = shorter_side / min(image.size)
      if factor < 1:
        image = image.resize((max(1, round(image.width * factor)),
                              max(1, round(image.height * factor))), Image.BICUBIC)
      image.save(dst, "JPEG", quality=quality)

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    list(pool.map(convert, paths))
  return out_dir


def measure_throughput(config: ml_collections.ConfigDict, cores: int, batch: int = 64,
                       seconds: float = 20.0, warmup_batches: int = 3) -> float:
  """Images/s of the pretraining pipeline (read, decode the crop, resize, flip, round) with
  tf.data limited to `cores` threads; run it under `taskset` with as many cores to be exact."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_parallel_calls = cores
  ds = tfdata.make_pretrain_dataset(config, batch, process_index=0, process_count=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  it = iter(ds.with_options(options))
  for _ in range(warmup_batches):
    next(it)
  start, images = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    images += int(next(it)["image"].shape[0])
  return images / (time.perf_counter() - start)


def _write_photo_folder(root: str, count: int) -> None:
  """ImageNet-like JPEGs (500x375, 375x500, 500x333; quality 90) cut from scikit-learn's two
  sample photographs, for measuring decode cost without ImageNet."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = [Image.fromarray(p) for p in load_sample_images().images]
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    photo = photos[i % len(photos)]
    w, h = [(500, 375), (375, 500), (500, 333)][i % 3]
    s = rng.uniform(0.6, 1.0)
    cw, ch = int(photo.width * s), int(photo.height * s)
    x, y = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(
        os.path.join(root, f"{i:05d}.jpg"), "JPEG", quality=90)


PATHS = ("jpeg", "resized", "shards", "shards_jpeg", "shards_device")


@contextlib.contextmanager
def pinned(cores: int):
  """This process (all its threads) on the first `cores` of the CPUs it may use, meanwhile."""
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= cores <= len(allowed):
    raise ValueError(f"--cores {cores}: this process may use {len(allowed)} CPUs")
  os.sched_setaffinity(0, allowed[:cores])
  try:
    yield
  finally:
    os.sched_setaffinity(0, allowed)


def measure_shard_reader(shard_dir: str, img_size: int, cores: int, batch: int = 64,
                         seconds: float = 10.0, device_augment: bool = False,
                         warmup_batches: int = 3) -> float:
  """Images/s of the shard reader with `cores` threads; with `device_augment`, each batch is
  then cropped, resized and flipped by the train step's first stage, jitted on this host's CPU
  device (so the two share the cores, as they would not on an accelerator)."""
  c = data.default_data_config()
  c.update(dataset="shards", data_dir=shard_dir, img_size=img_size, num_parallel_calls=cores)
  it = shards.pretrain_batches(c, batch, process_index=0, process_count=1)
  view = lambda b, k: b["image"]
  if device_augment:
    import jax
    from eesmm_jax.data import device_augment as aug
    crop = jax.jit(lambda key, images: aug.random_resized_crop(
        key, images, img_size, tuple(c.crop_scale), tuple(c.crop_ratio)))
    view = lambda b, k: jax.block_until_ready(crop(jax.random.key(k), b["image"]))
  for k in range(warmup_batches):
    view(next(it), k)
  start, images, k = time.perf_counter(), 0, warmup_batches
  while time.perf_counter() - start < seconds:
    images += int(view(next(it), k).shape[0])
    k += 1
  rate = images / (time.perf_counter() - start)
  it.close()
  return rate


def _mean_file_bytes(root: str) -> float:
  sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
           if f.lower().endswith(tfdata.IMAGE_EXTENSIONS)]
  return sum(sizes) / max(1, len(sizes))


def _shard_bytes(shard_dir: str) -> float:
  s = shards.Shards(shard_dir)
  return sum(x["bytes"] for x in s.index["shards"]) / s.num_examples


def prepared_inputs(data_dir: str, work_dir: str, img_size: int, paths) -> dict:
  """{path name: its data directory}, making a pre-resized copy (shorter side 1.5 x img_size)
  and raw / JPEG shards of `data_dir` under `work_dir` where `paths` need them, once."""
  out = {"jpeg": data_dir}
  if "resized" in paths:
    resized = os.path.join(work_dir, f"resized_{round(1.5 * img_size)}")
    if not os.path.exists(os.path.join(resized, ".complete")):
      write_resized_folder(data_dir, resized, "train", round(1.5 * img_size))
      open(os.path.join(resized, ".complete"), "w").close()
    out["resized"] = resized
  c = data.default_data_config()
  c.update(dataset="folder", data_dir=data_dir)
  for form, names in (("raw", ("shards", "shards_device")), ("jpeg", ("shards_jpeg",))):
    if set(names) & set(paths):
      d = os.path.join(work_dir, f"shards_{img_size}_{form}")
      if not os.path.exists(os.path.join(d, shards.INDEX_FILE)):
        shards.write_shards(tfdata.DecodedImages(c, "train"), d, img_size=img_size, form=form,
                            shard_size=256)
      for name in names:
        out[name] = d
  return out


def throughput(data_dir: str, work_dir: str, sizes, cores_list, paths, seconds: float,
               batch: int = 64) -> list[dict]:
  """Every (path, size, cores) measured, printed as it goes; -> the rows."""
  rows = []
  for size in sizes:
    dirs = prepared_inputs(data_dir, work_dir, size, paths)
    for name in paths:
      d = dirs[name]
      on_disk = _shard_bytes(d) if name.startswith("shards") else _mean_file_bytes(d)
      for cores in cores_list:
        with pinned(cores):
          if name in ("jpeg", "resized"):
            c = data.default_data_config()
            c.update(dataset="folder", data_dir=d, img_size=size)
            rate = measure_throughput(c, cores, batch, seconds)
          else:
            rate = measure_shard_reader(d, size, cores, batch, seconds,
                                        device_augment=name == "shards_device")
        row = dict(path=name, img_size=size, cores=cores, images_per_sec=rate,
                   per_core=rate / cores, bytes_per_image=on_disk)
        rows.append(row)
        print(f"{name:14s} {size:4d} px  {cores:2d} core(s): {rate:9.1f} images/s "
              f"({rate / cores:8.1f} per core)  {on_disk:9,.0f} bytes/image on disk",
              flush=True)
  return rows


def augment_cost(img_size: int = 64, batch: int = 16, steps: int = 5) -> dict:
  """Seconds per pretraining step of a small EESMM Swin at img_size on this host, with uint8
  inputs of img_size (tf.data's, already augmented), and with stored-size inputs (4/3 larger)
  cropped and flipped by the device augmentation first; the difference is its share."""
  import jax
  from eesmm_jax import plan as plan_lib, sharding, step as step_lib
  from eesmm_jax.config import pretrain_config
  from eesmm_jax.data import device_augment

  c = pretrain_config()
  c.img_size, c.batch_size, c.total_steps = img_size, batch, 100
  c.model.name, c.model.patch_size, c.model.window_size = "swin_tiny", 4, img_size // 16
  c.model.embed_dim, c.model.depths, c.model.num_heads = 48, (2, 2), (3, 6)
  c.objective.mask_patch_size = 16
  c.data.dataset, c.optim.warmup_epochs = "synthetic", 0.0
  p = plan_lib.pretraining(c, sharding.make_mesh())
  stored = shards.default_stored_size(img_size)
  augmented = device_augment.augment_then(p.loss_fn, img_size, c.data.crop_scale,
                                          c.data.crop_ratio)
  out = {}
  for name, loss_fn, side in (("plain", p.loss_fn, img_size), ("augmented", augmented, stored)):
    step = step_lib.jit_train_step(p, loss_fn)
    state = jax.jit(p.new_state, out_shardings=p.state_sharding)(jax.random.PRNGKey(0))
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), np.uint8),
        p.data_sharding)
    state, m = step(state, images)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, images)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    out[name] = float(np.median(times))
  crop = jax.jit(lambda k, x: device_augment.random_resized_crop(k, x, img_size))
  x = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, stored, stored, 3),
                                                       np.uint8))
  jax.block_until_ready(crop(jax.random.key(0), x))
  t = time.perf_counter()
  for i in range(steps):
    jax.block_until_ready(crop(jax.random.key(i), x))
  out["augment_alone"] = (time.perf_counter() - t) / steps
  out["share"] = (out["augmented"] - out["plain"]) / out["augmented"]
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Input pipeline tools (docs/scale_out.md).")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("throughput", help="images/s of every input path on 1 and on all cores")
  p.add_argument("--data_dir", required=True, help="an image folder ('folder' dataset)")
  p.add_argument("--make_sample", type=int, default=0,
                 help="first write this many ImageNet-like JPEGs into --data_dir")
  p.add_argument("--sizes", default="192,224", help="comma-separated img_size values")
  p.add_argument("--cores", default="1,all", help="comma-separated core counts ('all')")
  p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {PATHS}")
  p.add_argument("--work_dir", help="where the resized copy and the shards are made once "
                                    "(default: <data_dir>.prepared)")
  p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
  p.add_argument("--batch", type=int, default=64)
  p = sub.add_parser("augment_cost", help="a small step's time with and without the device "
                                          "augmentation in front")
  p.add_argument("--img_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=5)
  p = sub.add_parser("resize", help="write a pre-resized JPEG copy of a folder")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--shorter_side", type=int, default=288)
  args = parser.parse_args(argv)
  if args.command == "resize":
    print(write_resized_folder(args.data_dir, args.out_dir, args.split, args.shorter_side))
  elif args.command == "augment_cost":
    r = augment_cost(args.img_size, args.batch, args.steps)
    print(f"img_size {args.img_size}, batch {args.batch}, {os.cpu_count()} CPUs: step "
          f"{r['plain'] * 1e3:.1f} ms on img_size inputs, {r['augmented'] * 1e3:.1f} ms with the "
          f"device augmentation in front ({r['share']:.1%} of the step); the augmentation "
          f"alone {r['augment_alone'] * 1e3:.1f} ms", flush=True)
  else:
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
      parser.error(f"--paths: unknown {unknown}; choose from {PATHS}")
    if args.make_sample and not tf.io.gfile.exists(args.data_dir):
      _write_photo_folder(args.data_dir, args.make_sample)
    every = len(os.sched_getaffinity(0))
    cores = [every if x == "all" else int(x) for x in args.cores.split(",")]
    throughput(args.data_dir, args.work_dir or args.data_dir.rstrip("/") + ".prepared",
               [int(x) for x in args.sizes.split(",")], list(dict.fromkeys(cores)), paths,
               args.seconds, args.batch)


if __name__ == "__main__":
  main()
