"""eesmm_jax.data.tfdata: sources, augmentation, determinism, exact resume, per-process splits.

TFDS's default mock builds its examples with `from_generator` (a Python callback); deleting such an
iterator while a prefetch or parallel-map thread waits in the callback can hang the interpreter,
so the mock tests run without background threads (prefetch 0, num_parallel_calls 1). Real TFDS
and folder pipelines have no Python callback.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from eesmm_jax import data
from eesmm_jax.data import tfdata as ip
from eesmm_jax.tools import images

MEAN, STD = np.array(ip.MEAN_RGB), np.array(ip.STDDEV_RGB)


def cfg(**kw):
  c = ip.default_data_config()
  c.update({**dict(img_size=16, shuffle_buffer=64), **kw})
  return c


def take(config, global_batch, n, start_step=0, process_index=0, process_count=1):
  it = data.create_pretrain_iterator(config, global_batch, start_step, process_index=process_index,
                                     process_count=process_count)
  out = [next(it) for _ in range(n)]
  del it
  return out


def assert_pixels(image):
  """A pretraining batch: uint8 pixels, normalised later by the step (data.normalize)."""
  assert image.dtype == np.uint8


def assert_normalised(image):
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert image.dtype == np.float32 and np.isfinite(image).all()
  assert (image >= lo - 1e-5).all() and (image <= hi + 1e-5).all()


def write_image(path, color, size, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """ImageFolder layout: 12 solid-colour images, one class each, mixed JPEG/PNG and sizes, so
  every label names one example and the normalised colour is known."""
  root = tmp_path_factory.mktemp("imagefolder")
  for i in range(12):
    fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
    write_image(str(root / "train" / f"c{i:02d}" / f"img.{ext}"), (20 * i, 255 - 20 * i, 128),
                (24 + 3 * i, 20 + i), fmt)
  return str(root)


def colour(i):
  return np.array([20 * i, 255 - 20 * i, 128])


def normalised_colour(i):
  return (colour(i) / 255.0 - MEAN) / STD


def test_the_steps_normalisation_equals_the_pipelines():
  """data.normalize (jnp, on the device) is the pipeline's float normalisation of the pixels."""
  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), np.uint8)
  np.testing.assert_allclose(np.asarray(data.normalize(jnp.asarray(pixels))),
                             ip.normalize(tf.constant(pixels)).numpy(), rtol=1e-6, atol=1e-6)
  floats = np.ones((1, 2, 2, 3), np.float32)
  assert data.normalize(floats) is floats  # already normalised: passed through


# ----------------------------------------------------------------------------- TFDS
@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_tfds_mock_batches(name, tmp_path):
  c = cfg(dataset=name, data_dir=str(tmp_path), prefetch=0, num_parallel_calls=1)
  with tfds.testing.mock_data(num_examples=6):
    batches = take(c, 4, 3)  # 12 examples from 6: crosses an epoch boundary
    resumed = take(c, 4, 1, start_step=2)[0]
    assert ip.num_examples(c) == 6
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3)
    assert_pixels(b["image"])
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  # Each epoch is a permutation of the 6 examples.
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels[:6]) == sorted(labels[6:])


def test_tfds_split_per_process_is_disjoint(tmp_path):
  """Fake TFDS data whose labels are example indices, sliced as TFDS's even split would."""
  n = 12

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kw):
    per = n // split.count
    ids = np.arange(split.index * per, (split.index + 1) * per)
    png = [tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(i, tf.uint8))).numpy() for i in ids]
    return tf.data.Dataset.from_tensor_slices(
        {"image": png, "label": ids.astype(np.int64), "id": [str(i) for i in ids]})

  c = cfg(dataset="tfds:cifar10", data_dir=str(tmp_path))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    seen = [np.concatenate([b["label"] for b in take(c, 6, 2, process_index=p, process_count=3)])
            for p in range(3)]
  # 2 steps of 2 examples per process = one local epoch: each process sees exactly its third.
  assert [sorted(s) for s in seen] == [list(range(4 * p, 4 * p + 4)) for p in range(3)]


def test_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match="imagenet2012.*data_dir"):
    ip.create_pretrain_iterator(cfg(dataset="imagenet2012"), 4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
    ip.create_pretrain_iterator(cfg(dataset="no_such_dataset"), 4, process_index=0,
                                process_count=1)
  with pytest.raises(ValueError, match="not prepared.*tfds build cifar10"):
    ip.create_pretrain_iterator(cfg(dataset="cifar10", data_dir=str(tmp_path)), 4,
                                process_index=0, process_count=1)


# ----------------------------------------------------------------------------- folders
def test_image_folder_batches_labels_and_colours(image_folder):
  batches = take(cfg(dataset="folder", data_dir=image_folder), 4, 3)
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels) == list(range(12))  # one epoch: every example once
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3)
    assert_pixels(b["image"])
    for image, label in zip(b["image"], b["label"]):
      # A solid colour survives crop, resize and flip exactly; JPEG is within a few levels.
      tol = 6 if label % 2 else 0
      np.testing.assert_allclose(image, np.broadcast_to(colour(label), image.shape), atol=tol)


def test_plain_folder_has_no_labels(tmp_path):
  for i in range(5):
    fmt, ext = ("JPEG", "jpeg") if i % 2 else ("PNG", "PNG")
    write_image(str(tmp_path / f"{i}.{ext}"), (i, i, i), (20, 30), fmt)
  (tmp_path / "notes.txt").write_text("not an image")
  paths, labels, _ = ip.list_folder(str(tmp_path), "train")
  assert len(paths) == 5 and labels is None
  (b,) = take(cfg(dataset="folder", data_dir=str(tmp_path)), 2, 1)
  assert set(b) == {"image"} and b["image"].shape == (2, 16, 16, 3)


def test_same_seed_same_batches_other_seed_other_batches(image_folder):
  a = take(cfg(dataset="folder", data_dir=image_folder), 4, 2)
  b = take(cfg(dataset="folder", data_dir=image_folder), 4, 2)
  c = take(cfg(dataset="folder", data_dir=image_folder, seed=1), 4, 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))


def test_resume_at_step_k_equals_kth_batch(image_folder):
  """Batches of 5 over epochs of 12 cross epoch boundaries mid-batch; cache must not matter."""
  c = cfg(dataset="folder", data_dir=image_folder)
  full = take(c, 5, 7)
  for k in (1, 2, 5):
    (got,) = take(c, 5, 1, start_step=k)
    np.testing.assert_array_equal(got["image"], full[k]["image"])
    np.testing.assert_array_equal(got["label"], full[k]["label"])
  cached = take(cfg(dataset="folder", data_dir=image_folder, cache=True), 5, 7)
  for x, y in zip(full, cached):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_folder_split_per_process_is_disjoint(image_folder):
  c = cfg(dataset="folder", data_dir=image_folder)
  seen = [np.concatenate([b["label"] for b in take(c, 4, 3, process_index=p, process_count=2)])
          for p in range(2)]  # 2 per process per step, 3 steps = one local epoch of 6
  assert all(len(set(s)) == 6 for s in seen)
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(12))


@pytest.mark.parametrize("dataset", ["folder", "synthetic"])
def test_global_batch_does_not_depend_on_process_count(dataset, image_folder):
  """Process p's rows are rows [p*b, (p+1)*b) of the 1-process batch, at every step and on
  resume: 2 processes x 2 devices train on what 1 x 4 does."""
  c = cfg(dataset=dataset, data_dir=image_folder)
  one = take(c, 8, 3)  # 24 positions over 12 images: crosses epoch boundaries
  for count in (2, 4):
    per = [take(c, 8, 3, process_index=p, process_count=count) for p in range(count)]
    for k in range(3):
      for key in one[k]:
        np.testing.assert_array_equal(np.concatenate([b[k][key] for b in per]), one[k][key])
  (resumed,) = take(c, 8, 1, start_step=2, process_index=1, process_count=2)
  np.testing.assert_array_equal(resumed["image"], one[2]["image"][4:])


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="needs config.data_dir"):
    take(cfg(dataset="folder"), 2, 1)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    take(cfg(dataset="folder", data_dir=str(tmp_path / "empty")), 2, 1)
  with pytest.raises(ValueError, match="not divisible"):
    take(cfg(dataset="synthetic"), 6, 1, process_count=4)


# ----------------------------------------------------------------------------- evaluation
def test_eval_iterator_covers_every_example_once(image_folder):
  c = cfg(dataset="folder", data_dir=image_folder)
  (single,) = [list(ip.create_eval_iterator(c, 5, process_index=0, process_count=1))]
  assert len(single) == 3
  mask = np.concatenate([b["mask"] for b in single])
  labels = np.concatenate([b["label"] for b in single])
  np.testing.assert_array_equal(labels[mask], np.arange(12))  # in order, not shuffled
  assert mask.sum() == 12 and not single[-1]["image"][~single[-1]["mask"]].any()
  for image, label in zip(single[0]["image"], single[0]["label"]):
    if label % 2 == 0:  # PNG: the centre crop keeps the solid colour exactly
      np.testing.assert_allclose(image, np.broadcast_to(normalised_colour(label), image.shape),
                                 atol=1e-4)
  # 12 images over 5 processes (3, 3, 2, 2, 2): same number of batches everywhere, none lost.
  per = [list(ip.create_eval_iterator(c, 10, process_index=p, process_count=5)) for p in range(5)]
  assert {len(b) for b in per} == {2}
  seen = np.concatenate([b["label"][b["mask"]] for batches in per for b in batches])
  assert sorted(seen) == list(range(12))


def test_eval_iterator_tfds_mock(tmp_path):
  c = cfg(dataset="cifar10", data_dir=str(tmp_path), prefetch=0, num_parallel_calls=1)
  with tfds.testing.mock_data(num_examples=6):
    batches = list(ip.create_eval_iterator(c, 4, split="test", process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [4, 2]
  assert batches[0]["image"].shape == (4, 16, 16, 3)
  assert_normalised(batches[0]["image"])


# ----------------------------------------------------------------------------- synthetic, crop
def test_synthetic_is_deterministic_and_resumable():
  c = cfg(dataset="synthetic")
  full = take(c, 8, 3, process_index=1, process_count=2)
  assert full[0]["image"].shape == (4, 16, 16, 3) and full[0]["image"].dtype == np.uint8
  np.testing.assert_array_equal(take(c, 8, 1, start_step=2, process_index=1,
                                     process_count=2)[0]["image"], full[2]["image"])
  other = take(c, 8, 1, process_index=0, process_count=2)[0]
  assert not np.array_equal(other["image"], full[0]["image"])


def test_random_resized_crop_window():
  """SimMIM's ranges on a square image; torchvision's centre fallback on a 10 x 100 strip."""
  for s in range(50):
    y, x, h, w = ip.random_resized_crop_window(tf.constant([100, 100]), tf.constant([s, 7]),
                                               (0.67, 1.0), (3 / 4, 4 / 3)).numpy()
    assert 0.67 * 1e4 - 200 <= h * w <= 1e4 and 0.7 <= w / h <= 1.4
    assert 0 <= y <= 100 - h and 0 <= x <= 100 - w
  window = ip.random_resized_crop_window(tf.constant([10, 100]), tf.constant([0, 0]),
                                         (0.67, 1.0), (3 / 4, 4 / 3)).numpy()
  np.testing.assert_array_equal(window, [0, 43, 10, 13])


# ----------------------------------------------------------------------------- demo data
def test_write_digits_folder(tmp_path):
  root = str(tmp_path / "digits")
  assert images.write_digits_folder(root) == root
  train, train_labels, classes = ip.list_folder(root, "train")
  test, _, _ = ip.list_folder(root, "test")
  assert (len(train), len(test)) == (1437, 360) and classes == [str(d) for d in range(10)]
  assert Image.open(train[0]).size == (32, 32) and Image.open(train[0]).mode == "RGB"
  stamp = os.path.getmtime(train[0])
  images.write_digits_folder(root)  # present: untouched
  assert os.path.getmtime(train[0]) == stamp
  (b,) = take(cfg(dataset="folder", data_dir=root, split="test", img_size=32), 8, 1)
  assert b["image"].shape == (8, 32, 32, 3) and set(b["label"]) <= set(range(10))
