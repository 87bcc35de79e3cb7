"""Prepared shards (eesmm_jax.data.shards, eesmm_jax.prepare) and the device augmentation
(eesmm_jax.data.device_augment): round trip, processes, resume of a killed prepare, the reader's
order and resume, broken shards, the crop's statistics against tf.data's rule, and a pretraining
run on shards where TensorFlow cannot be imported."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from eesmm_jax import data, prepare
from eesmm_jax.data import device_augment, shards, tfdata

NUM_IMAGES, SHARD_SIZE, STORED, IMG = 23, 5, 24, 16  # 5 shards: 5, 5, 5, 5, 3 images
QUIET = open(os.devnull, "w")  # prepare's own lines, where a test does not read them


def write_folder(root, n=NUM_IMAGES):
  """ImageFolder layout, 3 classes, noise images of many sizes and aspect ratios (some smaller
  than the stored size, one grey, one with alpha), PNG so the pixels are exact."""
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = int(rng.integers(12, 60)), int(rng.integers(12, 60))
    if i == 3:
      pixels = rng.integers(0, 256, (h, w), np.uint8)
    elif i == 4:
      pixels = rng.integers(0, 256, (h, w, 4), np.uint8)
    else:
      pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
    d = os.path.join(root, "train", f"class{i % 3}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(d, f"{i:02d}.png"))
  return str(root)


def folder_source(root):
  c = data.default_data_config()
  c.update(dataset="folder", data_dir=root, split="train")
  return tfdata.DecodedImages(c)


def write(source, out, **kw):
  kw = {**dict(img_size=IMG, stored_size=STORED, shard_size=SHARD_SIZE, threads=2), **kw}
  return shards.write_shards(source, str(out), stream=QUIET, **kw)


def expected_views(root):
  """{stored pixels' bytes: (path, label)} of every image, computed from the files with PIL."""
  source = folder_source(root)
  out = {}
  for path, label in zip(source.paths, source.labels):
    with Image.open(path) as im:
      view = shards.square_view(np.asarray(im.convert("RGB")), STORED)
    out[view.tobytes()] = (path, label)
  assert len(out) == NUM_IMAGES  # every image is told apart by its pixels
  return out


def shard_config(path, **kw):
  c = data.default_data_config()
  c.update({**dict(dataset="shards", data_dir=None if path is None else str(path),
                   img_size=IMG), **kw})
  return c


def take(config, global_batch, n, start_step=0, process_index=0, process_count=1):
  it = data.create_pretrain_iterator(config, global_batch, start_step,
                                     process_index=process_index, process_count=process_count)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  out = tmp_path_factory.mktemp("shards")
  summary = write(folder_source(folder), out)
  assert summary.index_written and summary.written == list(range(5))
  return str(out)


def files(path):
  return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))
          if name.startswith("shard-") or name == shards.INDEX_FILE}


# ----------------------------------------------------------------------------- round trip


def test_round_trip_same_pixels_same_labels_every_image_once_per_epoch(folder, prepared):
  views = expected_views(folder)
  batches = take(shard_config(prepared), 5, 10)  # 50 positions: epochs 0, 1 and 4 of epoch 2
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.shape == (50, STORED, STORED, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  seen = []
  for image, label in zip(images, labels):
    path, expected_label = views[image.tobytes()]  # KeyError: pixels not as written
    assert label == expected_label
    seen.append(path)
  epoch0, epoch1 = seen[:NUM_IMAGES], seen[NUM_IMAGES:2 * NUM_IMAGES]
  assert sorted(epoch0) == sorted(epoch1) == sorted(p for p, _ in views.values())
  assert epoch0 != epoch1  # each epoch has its own order
  index = json.load(open(os.path.join(prepared, shards.INDEX_FILE)))
  assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 3]
  assert index["classes"] == ["class0", "class1", "class2"] and index["bad_images"] == []
  source = data.open_source(shard_config(prepared))
  assert (source.num_examples, source.image_size) == (NUM_IMAGES, STORED)


def test_processes_write_disjoint_shards_that_cover_all(folder, prepared, tmp_path):
  for count in range(1, 8):
    for m in range(1, 12):
      ranges = [shards.process_shards(m, count, p) for p in range(count)]
      assert [j for r in ranges for j in r] == list(range(m))  # disjoint, covering, in order
  out = tmp_path / "three"
  source = folder_source(folder)
  summaries = [write(source, out, num_processes=3, process_index=p) for p in range(3)]
  assert [list(s.written) for s in summaries] == [[0], [1, 2], [3, 4]]
  assert [s.index_written for s in summaries] == [False, False, True]
  assert files(str(out)) == files(prepared)  # the same bytes as one process writes
  with pytest.raises(ValueError, match=r"--process_index 3 must lie in \[0, --num_processes=3\)"):
    write(source, out, num_processes=3, process_index=3)


def test_reader_processes_take_their_rows_of_the_global_batch(prepared):
  c = shard_config(prepared)
  one = take(c, 6, 5)  # 30 positions: crosses the epoch boundary inside a batch
  for count in (2, 3):
    per = [take(c, 6, 5, process_index=p, process_count=count) for p in range(count)]
    for k in range(5):
      for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([b[k][key] for b in per]), one[k][key])


def test_resume_from_step_k_gives_batch_k(prepared):
  c = shard_config(prepared)
  full = take(c, 4, 9)
  for k in (1, 5, 8):  # 5: positions 20-23 cross the end of epoch 0
    (got,) = take(c, 4, 1, start_step=k)
    np.testing.assert_array_equal(got["image"], full[k]["image"])
    np.testing.assert_array_equal(got["label"], full[k]["label"])
  again = take(c, 4, 9)
  other_seed = take(shard_config(prepared, seed=1), 4, 9)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, again))
  assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(full, other_seed))
  # Reader threads and prefetch depth change how, not what.
  single = take(shard_config(prepared, num_parallel_calls=1, prefetch=0), 4, 9)
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, single))


def test_jpeg_form_reads_the_raw_forms_images_through_jpeg(folder, prepared, tmp_path):
  """The same order, and each image the raw form's view through one JPEG encode and decode."""
  import io
  write(folder_source(folder), tmp_path, form="jpeg", quality=95)
  raw, jpeg = take(shard_config(prepared), 8, 3), take(shard_config(tmp_path), 8, 3)
  for a, b in zip(raw, jpeg):
    np.testing.assert_array_equal(a["label"], b["label"])
    assert b["image"].shape == (8, STORED, STORED, 3)
    for view, got in zip(a["image"], b["image"]):
      buffer = io.BytesIO()
      Image.fromarray(view).save(buffer, "JPEG", quality=95)
      np.testing.assert_array_equal(got, np.asarray(Image.open(buffer).convert("RGB")))


def test_array_source_and_decode_failures_are_counted(tmp_path):
  """An in-memory source: grey [N, h, w] images; a failed decode is left out and named."""
  images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), np.uint8)

  class Flaky(shards.ArraySource):
    def read(self, start, stop):
      for i, image, label, problem in super().read(start, stop):
        yield (i, None, -1, "cannot decode") if i == 2 else (i, image, label, problem)

  write(Flaky(images, np.arange(7) % 2, name="grey"), tmp_path, shard_size=3)
  s = shards.Shards(str(tmp_path))
  assert s.num_examples == 6 and s.bad_images == [("grey[2]", "cannot decode")]
  assert list(s.labels) == [0, 1, 1, 0, 1, 0]  # labels of images 0, 1, 3, 4, 5, 6
  out = np.empty((6, STORED, STORED, 3), np.uint8)
  s.read_into(np.arange(6), out)
  for row, i in enumerate([0, 1, 3, 4, 5, 6]):
    np.testing.assert_array_equal(out[row], shards.square_view(images[i], STORED))
  assert data.open_source(shard_config(tmp_path)).bad_images == [("grey[2]", "cannot decode")]


# ----------------------------------------------------------------------------- resume, space


class Killed(Exception):
  pass


def test_a_killed_prepare_resumes_without_rewriting_finished_shards(folder, prepared, tmp_path):
  source = folder_source(folder)

  def kill_after_shard_1(j):
    if j == 1:
      raise Killed

  with pytest.raises(Killed):
    write(source, tmp_path, _after_shard=kill_after_shard_1)
  assert not os.path.exists(tmp_path / shards.INDEX_FILE)
  with pytest.raises(shards.ShardError, match="not finished.*2 shard records"):
    data.check_data_config(shard_config(tmp_path))
  # As a kill in the middle of shard 2 and between shard 3's two renames would leave them.
  name = lambda j, ext: str(tmp_path / f"shard-{j:05d}-of-00005.{ext}")
  open(name(2, "npy") + ".tmp-4242", "wb").write(b"half a shard")
  write(source, tmp_path, _after_shard=lambda j: j == 3 and os.remove(name(3, "json")),
        num_processes=2, process_index=1)  # shards 2, 3, 4; its record of 3 then lost
  finished = {j: os.stat(name(j, "npy")) for j in (0, 1, 2, 4)}
  summary = write(source, tmp_path)
  assert summary.finished_before == [0, 1, 2, 4] and summary.written == [3]
  for j, st in finished.items():  # not rewritten: the same file, untouched
    now = os.stat(name(j, "npy"))
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
  assert files(str(tmp_path)) == files(prepared)  # no image missing, none twice


def test_another_preparation_in_the_same_directory_is_refused(folder, prepared):
  with pytest.raises(ValueError, match="stored_size: 24 there, 32 now"):
    write(folder_source(folder), prepared, stored_size=32)


def test_disk_space_is_stated_first_and_a_full_disk_refused_in_one_line(folder, tmp_path,
                                                                       monkeypatch, capsys):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shards.shutil, "disk_usage",
                      lambda path: usage._replace(free=10_000))
  status = prepare.main(["--dataset", "folder", "--data_dir", folder, "--img_size", str(IMG),
                         "--stored_size", str(STORED), "--out", str(tmp_path / "full")])
  out, err = capsys.readouterr()
  assert status == 1
  assert "23 images, about 39.74 kB (1,728 bytes/image, raw uint8 24 px); 10.00 kB free" in out
  assert err.count("\n") == 1 and err.startswith("prepare: not enough disk space in ")
  assert not [f for f in os.listdir(tmp_path / "full") if f.startswith("shard-")]


def test_the_command_line_writes_the_shards(folder, prepared, tmp_path, capsys):
  args = ["--dataset", "folder", "--data_dir", folder, "--img_size", str(IMG), "--stored_size",
          str(STORED), "--shard_size", str(SHARD_SIZE), "--out", str(tmp_path)]
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert "writes 5 of its 5 shards" in out and "23/23 images (100%)" in out and "ETA" in out
  assert files(str(tmp_path)) == files(prepared)
  assert prepare.main(args) == 0 and "finished already" in capsys.readouterr().out
  assert prepare.main(["--dataset", "synthetic", "--img_size", "16", "--out", "x"]) == 1
  assert "nothing to prepare" in capsys.readouterr().err


# ----------------------------------------------------------------------------- broken shards


def test_a_truncated_or_missing_shard_is_named_in_one_line(prepared, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(prepared, broken)
  with open(broken / "shard-00002-of-00005.npy", "r+b") as f:
    f.truncate(1000)
  os.remove(broken / "shard-00004-of-00005.npy")
  for call in (data.open_source, data.check_data_config, data.num_examples):
    with pytest.raises(ValueError) as e:
      call(shard_config(broken))
    message = str(e.value)
    assert "\n" not in message
    assert "shard-00002-of-00005.npy is truncated or changed (1,000 bytes" in message
    assert "shard-00004-of-00005.npy is missing" in message


def test_shard_config_errors(prepared, tmp_path):
  with pytest.raises(ValueError, match="needs config.data_dir"):
    data.check_data_config(shard_config(None))
  with pytest.raises(ValueError, match="is not a directory"):
    data.check_data_config(shard_config(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="img_size=32 is larger than the 24 px"):
    data.check_data_config(shard_config(prepared, img_size=32))
  with pytest.raises(ValueError, match="no evaluation split"):
    data.create_eval_iterator(shard_config(prepared), 4)
  from eesmm_jax.data import finetune_input
  with pytest.raises(ValueError, match="pretraining only"):
    finetune_input.num_classes(shard_config(prepared))


# ----------------------------------------------------------------------------- device crop


def tf_windows(height, width, n, scale, ratio):
  """[n, 4] windows and found flags of tfdata.random_resized_crop_window, seeds 0..n-1."""
  @tf.function
  def draw(seeds):
    return tf.map_fn(lambda s: tfdata.random_resized_crop_window(
        tf.constant([height, width, 3]), tf.stack([s, tf.constant(7, tf.int64)]), scale, ratio),
        seeds, fn_output_signature=tf.int32)
  windows = draw(tf.range(n, dtype=tf.int64)).numpy()
  return windows


def jax_windows(height, width, n, scale, ratio, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  windows, found = jax.jit(jax.vmap(lambda k: device_augment.crop_window(
      k, height, width, scale, ratio)))(keys)
  return np.asarray(windows), np.asarray(found)


def window_stats(windows, height, width, scale, ratio):
  y, x, h, w = windows.T.astype(float)
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  # The fallback is the one window whose area may leave the scale range or its ratio the ratio
  # range; tf's flags are not returned, so a fallback is recognised as the centred clamped crop.
  centred = (y == np.floor((height - h) / 2)) & (x == np.floor((width - w) / 2))
  area, aspect = h * w / (height * width), w / h
  return dict(area=area, aspect=aspect, centred=centred)


def assert_same_distribution(a, b, sigmas=4.5):
  """Means and standard deviations of area fraction and aspect ratio, and the share of centred
  windows, agree within `sigmas` standard errors."""
  for key in ("area", "aspect"):
    x, y = a[key], b[key]
    se_mean = np.sqrt(x.var() / len(x) + y.var() / len(y))
    assert abs(x.mean() - y.mean()) <= sigmas * se_mean, (key, x.mean(), y.mean(), se_mean)
    se_std = np.sqrt(x.var() / (2 * len(x)) + y.var() / (2 * len(y)))
    assert abs(x.std() - y.std()) <= sigmas * se_std, (key, x.std(), y.std(), se_std)
  p, q = a["centred"].mean(), b["centred"].mean()
  pooled = (p + q) / 2
  se = np.sqrt(pooled * (1 - pooled) * (1 / len(a["centred"]) + 1 / len(b["centred"])))
  assert abs(p - q) <= sigmas * max(se, 1e-12), ("centred", p, q, se)


@pytest.mark.parametrize("height,width", [(256, 256), (100, 160), (170, 120)])
def test_device_crop_windows_match_tfdatas_rule(height, width):
  """The shards' square images, and shapes where the 10 tries often all fail (the fallback)."""
  n, scale, ratio = 4000, (0.67, 1.0), (3 / 4, 4 / 3)
  ours, found = jax_windows(height, width, n, scale, ratio)
  theirs = tf_windows(height, width, n, scale, ratio)
  a = window_stats(ours, height, width, scale, ratio)
  b = window_stats(theirs, height, width, scale, ratio)
  assert_same_distribution(a, b)
  assert (a["centred"] | found).all()  # every fallback is the centred crop
  if height != width:
    assert (~found).mean() > 0.01  # the fallback is exercised here
  else:
    assert (~found).mean() < 0.01
  # The test has the power to see a small change of the rule.
  shifted = window_stats(jax_windows(height, width, n, (0.6, 1.0), ratio, seed=1)[0], height,
                         width, scale, ratio)
  with pytest.raises(AssertionError):
    assert_same_distribution(shifted, b)


def test_device_crop_and_resize_give_tfs_pixels_for_a_window():
  """The weights are tf.image.resize(antialias=True)'s on the cropped image: shrinking,
  enlarging, flipped or not."""
  image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
  for y, x, h, w in [(0, 0, 40, 40), (3, 5, 30, 27), (10, 2, 12, 9), (5, 5, 35, 20)]:
    for flip in (False, True):
      got = device_augment.crop_and_resize(jnp.asarray(image), jnp.array([y, x, h, w]), IMG,
                                           jnp.asarray(flip))
      want = tf.image.resize(image[y:y + h, x:x + w], [IMG, IMG], antialias=True).numpy()
      np.testing.assert_allclose(np.asarray(got), want[:, ::-1] if flip else want, atol=2e-3)


def test_each_image_draws_its_own_view_from_the_key():
  images = jnp.asarray(np.broadcast_to(
      np.random.default_rng(0).integers(0, 256, (1, STORED, STORED, 3), np.uint8),
      (8, STORED, STORED, 3)))
  crop = jax.jit(lambda k, x: device_augment.random_resized_crop(k, x, IMG))
  a, b = crop(jax.random.key(0), images), crop(jax.random.key(0), images)
  c = crop(jax.random.key(1), images)
  assert a.shape == (8, IMG, IMG, 3) and a.dtype == jnp.uint8
  np.testing.assert_array_equal(a, b)
  assert len({np.asarray(v).tobytes() for v in a}) == 8  # 8 copies, 8 different views
  assert not np.array_equal(a, c)
  whole = jax.jit(device_augment.whole_view, static_argnums=1)(images, IMG)
  want = tf.image.resize(np.asarray(images[0]), [IMG, IMG], antialias=True).numpy()
  assert np.abs(np.asarray(whole[0]).astype(float) - want).max() <= 0.5 + 1e-3


def test_augment_then_leaves_the_losss_own_draws_alone():
  """The loss sees img_size views, and the rng it is given: masks and dropout unchanged."""
  def loss_fn(params, images, rng, train):
    return jnp.zeros(()), {"images": images, "rng": jax.random.key_data(rng)}

  images = jnp.zeros((4, STORED, STORED, 3), jnp.uint8)
  rng = jax.random.key(3)
  augmented = jax.jit(device_augment.augment_then(loss_fn, IMG), static_argnums=3)
  for train in (True, False):
    _, aux = augmented(None, images, rng, train)
    assert aux["images"].shape == (4, IMG, IMG, 3) and aux["images"].dtype == jnp.uint8
    np.testing.assert_array_equal(aux["rng"], jax.random.key_data(rng))
  with pytest.raises(ValueError, match="uint8"):
    augmented(None, images.astype(jnp.float32), rng, True)


# ----------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_pretraining_on_shards_runs_without_tensorflow_or_clu(tmp_path):
  """Shards written from an in-memory source and pretrained on, in a process where TensorFlow,
  TFDS and clu cannot be imported; the step takes stored-size images and crops them."""
  from tests.train.test_step import BLOCK_TF, run_python
  proc = run_python(BLOCK_TF + f"""
    import json, os, sys
    import numpy as np
    from absl import app
    from eesmm_jax import main, plan, sharding
    from eesmm_jax.configs import demo
    from eesmm_jax.data import shards
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), np.uint8)
    out = {str(tmp_path / "shards")!r}
    shards.write_shards(shards.ArraySource(images, np.arange(40) % 10), out, img_size=32,
                        shard_size=16)
    sys.argv = ["main", "--config", "configs/demo.py", "--workdir", {str(tmp_path / "run")!r},
                "--config.data.dataset=shards", "--config.data.data_dir=" + out,
                "--config.batch_size=16", "--config.total_steps=2", "--config.log_every=1",
                "--config.optim.warmup_epochs=0", "--config.picture_every=2"]
    try:
      app.run(main.main)
    except SystemExit as e:
      assert not e.code, e.code
    rows = [json.loads(l) for l in open({str(tmp_path / "run" / "metrics.jsonl")!r})]
    assert [r["step"] for r in rows] == [1, 2], rows
    assert all(np.isfinite(r["loss"]) and r["bad_images"] == 0 for r in rows), rows
    assert any(f.endswith(".png") for _, _, fs in os.walk({str(tmp_path / "run")!r}) for f in fs)
    c = demo.get_config()
    c.data.dataset, c.data.data_dir, c.batch_size = "shards", out, 16
    p = plan.pretraining(c, sharding.make_mesh())
    assert (p.input_size, p.num_examples) == (40, 40), (p.input_size, p.num_examples)
    assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")
                and sys.modules[m] is not None]
    print("ok")
  """)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
