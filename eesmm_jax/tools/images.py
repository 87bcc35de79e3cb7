"""Image folders for the demo and the tests, and the tf.data input's throughput.

`python -m eesmm_jax.tools.images throughput --data_dir DIR [--make_sample N]` measures images/s per
CPU core; `... resize --data_dir DIR --out_dir OUT` writes a pre-resized copy of a folder
(docs/scale_out.md). `write_digits_folder` is the demo's data: scikit-learn's digits as PNGs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import time

import ml_collections
import numpy as np
import tensorflow as tf

from eesmm_jax import data
from eesmm_jax.data import tfdata


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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Input pipeline tools (docs/scale_out.md).")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("throughput", help="images/s of the pretraining pipeline on N cores")
  p.add_argument("--data_dir", required=True, help="an image folder ('folder' dataset)")
  p.add_argument("--make_sample", type=int, default=0,
                 help="first write this many ImageNet-like JPEGs into --data_dir")
  p.add_argument("--img_size", type=int, default=192)
  p.add_argument("--cores", default="1", help="comma-separated thread counts to measure")
  p.add_argument("--seconds", type=float, default=20.0)
  p.add_argument("--cache", action="store_true", help="hold the encoded files in memory")
  p = sub.add_parser("resize", help="write a pre-resized JPEG copy of a folder")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--shorter_side", type=int, default=288)
  args = parser.parse_args(argv)
  if args.command == "resize":
    print(write_resized_folder(args.data_dir, args.out_dir, args.split, args.shorter_side))
  else:
    if args.make_sample and not tf.io.gfile.exists(args.data_dir):
      _write_photo_folder(args.data_dir, args.make_sample)
    c = data.default_data_config()
    c.update(dataset="folder", data_dir=args.data_dir, img_size=args.img_size, cache=args.cache)
    for n in map(int, args.cores.split(",")):
      rate = measure_throughput(c, n, seconds=args.seconds)
      print(f"{n} core(s): {rate:8.1f} images/s  ({rate / n:7.1f} per core)  img_size "
            f"{args.img_size}, {args.data_dir}", flush=True)


if __name__ == "__main__":
  main()
