"""The IDX source (`eesmm_jax.data.idx`) against planted bytes: the reader's shapes and labels,
gzip and raw files, a wrong magic number refused in one line naming the file, the missing
files' install hint, the splits and their class-balanced subsets, the padded evaluation view,
and the streams' resume and process invariance, all without TensorFlow."""
import gzip
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from eesmm_jax import data
from eesmm_jax.data import idx


def plant(root: str, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> str:
  """A Fashion-MNIST-shaped IDX folder of separable classes: class c's images hold a bright 8 x 5
  block at a place of their own over dim noise. Images gzip-compressed, labels raw (the reader
  takes both)."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % idx.NUM_CLASSES
    rng.shuffle(labels)
    images = rng.integers(0, 40, (n, idx.SIDE, idx.SIDE)).astype(np.uint8)
    for i, c in enumerate(labels):
      r, q = divmod(int(c), 5)
      images[i, 4 + 10 * r: 12 + 10 * r, 1 + 5 * q: 6 + 5 * q] = 220
    image_name, label_name = idx.FILES[split]
    idx.write_idx(os.path.join(root, image_name + ".gz"), images)
    idx.write_idx(os.path.join(root, label_name), labels.astype(np.uint8))
  return root


def data_config(root, split="train", img_size=32) -> ml_collections.ConfigDict:
  c = data.default_data_config()
  c.update(dict(dataset="fashion_mnist", data_dir=str(root), split=split, img_size=img_size,
                crop_scale=(0.67, 1.0)))
  return c


def test_reader_reads_planted_bytes_gzip_and_raw(tmp_path):
  images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
  header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
  (tmp_path / "raw").write_bytes(header + images.tobytes())
  (tmp_path / "z.gz").write_bytes(gzip.compress(header + images.tobytes()))
  labels = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 0, 9])
  (tmp_path / "labels").write_bytes(labels)
  for name in ("raw", "z.gz"):
    got = idx.read_idx(str(tmp_path / name), idx.IMAGES_MAGIC)
    assert got.shape == (3, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "labels"), idx.LABELS_MAGIC),
                                [7, 0, 9])


def test_wrong_magic_is_refused_in_one_line_naming_the_file(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte"
  labels = bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([1, 2])
  path.write_bytes(labels)  # a labels file where the images should be
  with pytest.raises(ValueError) as e:
    idx.read_idx(str(path), idx.IMAGES_MAGIC)
  message = str(e.value)
  assert "\n" not in message and str(path) in message
  assert "0x00000801 found" in message and "0x00000803 expected" in message
  (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx at all")
  with pytest.raises(ValueError, match="is not IDX"):
    idx.read_idx(str(tmp_path / "junk"))
  (tmp_path / "short").write_bytes(labels[:-1])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    idx.read_idx(str(tmp_path / "short"), idx.LABELS_MAGIC)


def test_missing_files_name_the_install_command(tmp_path):
  with pytest.raises(ValueError) as e:
    data.check_data_config(data_config(tmp_path))
  assert "\n" not in str(e.value)
  assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
  assert "train-images-idx3-ubyte" in str(e.value)


def test_planted_folder_through_the_facade(tmp_path):
  root = plant(str(tmp_path / "fm"))
  c = data_config(root)
  assert data.num_examples(c) == 1000 and data.num_examples(c, "test") == 200
  assert data.num_examples(c, "train[:300]") == 300
  assert data.num_classes(c) == 10
  images, labels = idx.split_arrays(c, "test")
  assert images.shape == (200, 28, 28) and labels.shape == (200,)
  batches = list(data.create_eval_iterator(c, 64, "test", process_index=0, process_count=1))
  assert len(batches) == 4 and int(sum(b["mask"].sum() for b in batches)) == 200
  first = batches[0]
  assert first["image"].shape == (64, 32, 32, 3) and first["image"].dtype == np.float32
  np.testing.assert_array_equal(first["label"], labels[:64])
  # The evaluation view is the image zero-padded by 2 px: exact pixels, no interpolation.
  view = idx.padded(images[:4], 32)
  np.testing.assert_array_equal(view[:, 2:30, 2:30, 0], images[:4])
  assert view[:, :2].max() == 0 and view[:, :, 30:].max() == 0
  assert (view[..., 0] == view[..., 2]).all()
  with pytest.raises(ValueError, match="img_size=24"):
    data.check_data_config(data_config(root, img_size=24))
  with pytest.raises(ValueError, match="is not one of 'train'"):
    data.num_examples(c, "validation")


def test_balanced_subsets_are_class_balanced_and_fixed(tmp_path):
  root = plant(str(tmp_path / "fm"))
  c = data_config(root)
  _, labels = idx.split_arrays(c)
  for split, per_class in (("train[10%]", 10), ("train[:500][10%]", 5), ("train[1%]", 1)):
    chosen = idx.split_indices(c, split)
    assert (np.bincount(labels[chosen], minlength=10) == per_class).all(), split
    # Drawn from the labels alone: another run seed (or another call) picks the same images.
    other = data_config(root)
    other.seed = 7
    np.testing.assert_array_equal(idx.split_indices(other, split), chosen)
  assert set(idx.split_indices(c, "train[:500][10%]")) <= set(range(500))
  with pytest.raises(ValueError, match="per class"):
    idx.split_indices(c, "train[:500][1%]")  # half an image per class


def test_streams_resume_exactly_and_ignore_the_process_count(tmp_path):
  root = plant(str(tmp_path / "fm"))
  c = data_config(root)
  for make in (data.create_pretrain_iterator,
               lambda *a, **k: data.create_finetune_iterator(c, None, *a[1:], **k)):
    whole = make(c, 96, 0, process_index=0, process_count=1)
    steps = [next(whole) for _ in range(12)]  # 1,152 positions: into the second epoch
    assert steps[0]["image"].dtype == np.uint8 and steps[0]["image"].shape == (96, 32, 32, 3)
    resumed = next(make(c, 96, 11, process_index=0, process_count=1))
    halves = [next(make(c, 96, 11, process_index=p, process_count=2)) for p in (0, 1)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(resumed[key], steps[11][key])
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), steps[11][key])
  # An epoch shows every image once.
  stream = data.create_pretrain_iterator(c, 100, 0, process_index=0, process_count=1)
  seen = np.concatenate([next(stream)["label"] for _ in range(10)])
  np.testing.assert_array_equal(np.bincount(seen), np.bincount(idx.split_arrays(c)[1]))


def test_no_tensorflow_is_imported(tmp_path):
  """A pretraining batch, the evaluation pass and a fine-tuning batch where TensorFlow, TFDS and
  scikit-learn cannot be imported (the accelerator images have none of them)."""
  root = plant(str(tmp_path / "fm"), 200, 50)
  script = f"""
import sys
for name in ("tensorflow", "tensorflow_datasets", "sklearn", "clu"):
  sys.modules[name] = None
from eesmm_jax import data, finetune, probe, train
from tests.data.test_idx import data_config
c = data_config({root!r})
next(data.create_pretrain_iterator(c, 8, 0, process_index=0, process_count=1))
next(data.create_finetune_iterator(c, None, 8, 0, process_index=0, process_count=1))
list(data.create_eval_iterator(c, 16, "test", process_index=0, process_count=1))
print("tf-free")
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__)))))
  assert done.returncode == 0 and "tf-free" in done.stdout, done.stderr[-2000:]


def test_crop_padding_zero_is_the_flip_only(tmp_path):
  root = plant(str(tmp_path / "fm"))
  c = data_config(root)
  c.crop_padding = 0
  batch = next(data.create_finetune_iterator(c, None, 64, 0, process_index=0, process_count=1))
  images, _ = idx.split_arrays(c)
  # Each view is an image's evaluation view or its mirror, nothing shifted.
  views = idx.padded(images, 32)
  for view in batch["image"]:
    assert any((view == v).all() or (view == v[:, ::-1]).all() for v in views)
  c.crop_padding = None
  shifted = next(data.create_finetune_iterator(c, None, 64, 0, process_index=0, process_count=1))
  assert not all(any((view == v).all() or (view == v[:, ::-1]).all() for v in views)
                 for view in shifted["image"])
  c.crop_padding = 17
  with pytest.raises(ValueError, match=r"crop_padding=17: .* 0\.\.16"):
    data.check_data_config(c)
  # Elsewhere nothing reads it: refused, not silently ignored.
  c.update(dict(dataset="synthetic", crop_padding=0))
  with pytest.raises(ValueError, match=r"crop_padding=0: only the IDX datasets'"):
    data.check_data_config(c)
