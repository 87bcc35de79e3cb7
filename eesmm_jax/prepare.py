"""Command line: a split decoded once into prepared shards (eesmm_jax/data/shards.py).

    python -m eesmm_jax.prepare --dataset folder --data_dir DIR --img_size 192 --out SHARDS
    python -m eesmm_jax.prepare --dataset imagenet2012 --data_dir TFDS_DIR --img_size 192 \\
        --out SHARDS --num_processes 8 --process_index $i      # 8 at once, disjoint shards

then pretrain with --config.data.dataset=shards --config.data.data_dir=SHARDS (no TensorFlow
needed there). It states the shards it will write and the disk space they take before it
starts (and stops, in one line, when the disk lacks it), shows one progress line with an ETA,
and, run again after a kill, writes only the shards that were not finished. Folders and TFDS
are listed, checked and decoded as the trainer's tf.data input does (`tfdata.DecodedImages`),
so this command needs TensorFlow for them; the stored images are the centre square of each,
resized to --stored_size (default 4/3 of --img_size: 256 for 192).
"""
from __future__ import annotations

import argparse
import sys

from eesmm_jax import cli
from eesmm_jax.data import common, shards

cli.quiet_tensorflow()  # before the listing loads TensorFlow


def image_source(dataset: str, data_dir: str, split: str):
  """The decoded images of a dataset, in a fixed order (the interface in shards.py)."""
  if dataset in ("synthetic", "shards"):
    raise ValueError(f"--dataset {dataset!r} has nothing to prepare: give a folder ('folder') "
                     f"or a TFDS dataset")
  from eesmm_jax.data import tfdata  # TensorFlow: listing and decoding, as the trainer does
  config = common.default_data_config()
  config.update(dataset=dataset, data_dir=data_dir, split=split)
  return tfdata.DecodedImages(config, split)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m eesmm_jax.prepare",
      description="Decode a split once into shards of fixed-size uint8 images for "
                  "--config.data.dataset=shards.")
  parser.add_argument("--dataset", required=True,
                      help="'folder' (an image folder) or a TFDS dataset name ('tfds:<name>')")
  parser.add_argument("--data_dir", help="the image folder, or the TFDS data_dir")
  parser.add_argument("--img_size", type=int, required=True,
                      help="the pretraining img_size the shards are for")
  parser.add_argument("--out", required=True, help="the shard directory to write")
  parser.add_argument("--split", default="train")
  parser.add_argument("--stored_size", type=int, default=None,
                      help="side of the stored square images (default: 4/3 of --img_size, to a "
                           "multiple of 8)")
  parser.add_argument("--form", choices=shards.FORMS, default="raw",
                      help="raw uint8 (read at memory speed; 3 x stored_size^2 bytes/image) or "
                           "JPEG (a fraction of the disk, decoded by the reader)")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality (--form jpeg)")
  parser.add_argument("--shard_size", type=int, default=shards.DEFAULT_SHARD_SIZE,
                      help="images per shard")
  parser.add_argument("--num_processes", type=int, default=1,
                      help="processes preparing the same --out at once (disjoint shard ranges)")
  parser.add_argument("--process_index", type=int, default=0)
  parser.add_argument("--threads", type=int, default=None,
                      help="resize / encode threads (default: the CPUs)")
  args = parser.parse_args(argv)
  try:
    shards.process_shards(1, args.num_processes, args.process_index)  # the flags, before a read
    source = image_source(args.dataset, args.data_dir, args.split)
    shards.write_shards(source, args.out, img_size=args.img_size, stored_size=args.stored_size,
                        form=args.form, quality=args.quality, shard_size=args.shard_size,
                        num_processes=args.num_processes, process_index=args.process_index,
                        threads=args.threads)
  except ValueError as e:
    print(f"prepare: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
