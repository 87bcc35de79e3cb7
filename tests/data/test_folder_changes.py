"""A folder that changes under a run, and what the folder listing takes as data: images that
become unreadable after the listing, evaluation splits with other classes, hidden folders,
large and GIF/BMP images, and which image-check manifest is believed."""
import io
import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from eesmm_jax import data
from eesmm_jax.data import tfdata as ip

COLOURS = [(20 * i + 10, 200 - 20 * i, 7 * i) for i in range(8)]


def png(colour, size=(24, 24)):
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(autouse=True)
def fresh_state():
  ip._manifests.clear()
  ip._reported.clear()


def folder_config(root, **kw):
  c = ip.default_data_config()
  c.update(dataset="folder", data_dir=str(root), img_size=8, crop_scale=(1.0, 1.0),
           crop_ratio=(1.0, 1.0), **kw)
  return c


def solid_folder(root):
  for i, colour in enumerate(COLOURS):
    (root / f"{i}.png").write_bytes(png(colour))
  return root


def batch_colours(batch):
  """The index of COLOURS each (solid, uncropped) image shows."""
  centre = batch["image"][:, 4, 4].astype(int)
  return [int(np.argmin(np.abs(np.asarray(COLOURS) - c).sum(1))) for c in centre]


def test_images_that_become_unreadable_mid_run_are_replaced_named_and_counted(tmp_path, caplog):
  config = folder_config(solid_folder(tmp_path))
  source = data.open_source(config)
  assert source.num_examples == 8 and not source.bad_images
  (tmp_path / "2.png").write_bytes(b"not a png any more")      # overwritten
  (tmp_path / "5.png").write_bytes(png(COLOURS[5])[:40])       # truncated
  os.remove(tmp_path / "6.png")                                # deleted
  with caplog.at_level(logging.WARNING):
    it = data.create_pretrain_iterator(config, 4, source=source, process_index=0, process_count=1)
    seen = [batch_colours(next(it)) for _ in range(6)]         # three epochs
  assert all(len(s) == 4 for s in seen)
  assert not {2, 5, 6} & {c for s in seen for c in s}
  named = sorted(os.path.basename(p) for p, _ in source.bad_images)
  assert named == ["2.png", "5.png", "6.png"]                  # each counted once
  for name in named:
    assert sum(name in r.getMessage() for r in caplog.records) == 1
  # The same rows in every process: two processes' halves make the one-process batch.
  halves = [data.create_pretrain_iterator(config, 4, source=data.open_source(config),
                                          process_index=p, process_count=2) for p in (0, 1)]
  one = data.create_pretrain_iterator(config, 4, process_index=0, process_count=1)
  for _ in range(4):
    joined = np.concatenate([next(h)["image"] for h in halves])
    np.testing.assert_array_equal(joined, next(one)["image"])


def test_a_folder_whose_images_all_vanish_mid_run_ends_with_the_no_readable_image_error(
    tmp_path):
  config = folder_config(solid_folder(tmp_path))
  source = data.open_source(config)
  for i in range(8):
    os.remove(tmp_path / f"{i}.png")
  it = data.create_pretrain_iterator(config, 4, source=source, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="no readable image in"):
    next(it)


def labelled(root, classes):
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for j in range(2):
      (root / c / f"{j}.png").write_bytes(png(COLOURS[len(c) % 8]))


@pytest.mark.parametrize("eval_classes, hidden", [(["b"], False), (["a", "b"], True)])
def test_eval_labels_are_training_s_class_indices(tmp_path, eval_classes, hidden):
  labelled(tmp_path / "train", ["a", "b"])
  labelled(tmp_path / "val", eval_classes)
  if hidden:  # an empty hidden folder, and a hidden copy of a class's images
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    labelled(tmp_path / "val" / "b", [".ipynb_checkpoints"])
  config = folder_config(tmp_path, split="train")
  labels = np.concatenate([b["label"][b["mask"]] for b in data.create_eval_iterator(
      config, 4, split="val", process_index=0, process_count=1)])
  expected = [["a", "b"].index(c) for c in eval_classes for _ in range(2)]
  assert sorted(labels.tolist()) == expected


def test_an_eval_split_with_a_class_training_lacks_is_refused_by_name(tmp_path):
  labelled(tmp_path / "train", ["a", "b"])
  labelled(tmp_path / "val", ["a", "c"])
  config = folder_config(tmp_path, split="train")
  with pytest.raises(ValueError, match=r"has classes the training split does not: 'c'"):
    data.create_eval_iterator(config, 4, split="val", process_index=0, process_count=1)


def test_hidden_folders_are_not_classes(tmp_path):
  labelled(tmp_path / "train", ["a", "b"])
  (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
  _, labels, classes = ip.list_folder(str(tmp_path), "train")
  assert classes == ["a", "b"] and sorted(labels) == [0, 0, 1, 1]


def test_a_16000_pixel_jpeg_is_readable_and_gif_and_bmp_are_listed(tmp_path, caplog):
  big = Image.new("L", (16000, 16000), 128)  # 256 M pixels: past pillow's bomb guard
  big.save(tmp_path / "big.jpg", quality=50)
  Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "small.gif")
  Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "small.bmp")
  Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "small.webp")
  with caplog.at_level(logging.WARNING):
    paths, _, _ = ip.list_folder(str(tmp_path), "train")
  assert sorted(os.path.basename(p) for p in paths) == ["big.jpg", "small.bmp", "small.gif"]
  assert any("small.webp" in r.getMessage() for r in caplog.records)  # named as skipped
  batch = next(data.create_pretrain_iterator(folder_config(tmp_path), 3, process_index=0,
                                             process_count=1))
  assert batch["image"].shape == (3, 8, 8, 3)


def test_the_freshest_manifest_wins(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  (tmp_path / "images").mkdir()
  folder = solid_folder(tmp_path / "images")
  ip.list_folder(str(folder), "train")  # writes the manifest beside the images
  in_folder, in_cache = ip._manifest_paths(str(folder))
  stale = open(in_folder).read()
  (folder / "3.png").write_bytes(png((1, 1, 1), (30, 30)))  # changed: checked again
  time.sleep(0.01)
  # The folder went read-only: the fresh verdicts land in the cache, the stale file stays.
  os.makedirs(os.path.dirname(in_cache))
  ip._manifests.clear()
  real_write = ip._write_manifest
  monkeypatch.setattr(ip, "_write_manifest", lambda c, e: real_write(c[1:], e))
  ip.list_folder(str(folder), "train")
  assert open(in_folder).read() == stale and os.path.exists(in_cache)
  checked = []
  monkeypatch.setattr(ip, "image_problem", lambda p: checked.append(p) or "")
  ip._manifests.clear()
  ip.list_folder(str(folder), "train")
  assert checked == []  # the cache's verdicts, newer, were believed


def test_a_resume_on_a_changed_folder_is_refused_unless_resume_allow_names_data(tmp_path,
                                                                               capsys):
  import jax
  from eesmm_jax import train
  from tests.train.test_train import tiny_config
  one = jax.devices()[:1]
  (tmp_path / "images").mkdir()
  images = solid_folder(tmp_path / "images")
  config = tiny_config(**{"data.dataset": "folder", "data.data_dir": str(images),
                          "batch_size": 4, "checkpoint_every": 1, "optim.epochs": 2})
  workdir = str(tmp_path / "run")
  train.pretrain(config, workdir, one, stop_after=1)
  record = json.load(open(os.path.join(workdir, "data.json")))
  assert record["num_examples"] == 8 and record["what"].endswith(str(images))
  for i in range(8, 11):  # 3 added, 1 removed
    (images / f"{i}.png").write_bytes(png(COLOURS[i % 8]))
  os.remove(images / "0.png")
  with pytest.raises(ValueError, match=r"3 images added, 1 removed since step 1: the data order "
                                       r"from here differs from the original run"):
    train.pretrain(config, workdir, one, stop_after=2)
  config.resume_allow = "data"
  train.pretrain(config, workdir, one, stop_after=2)
  assert "resume_allow names data: resuming anyway" in capsys.readouterr().out
  assert json.load(open(os.path.join(workdir, "data.json")))["num_examples"] == 10
  train.pretrain(config, workdir, one, stop_after=3)  # the new listing is the record now


def test_evaluating_a_head_on_other_classes_is_refused_by_name(tmp_path):
  from eesmm_jax import finetune, workdir as workdir_lib
  labelled(tmp_path / "data" / "train", ["a", "c"])
  workdir = tmp_path / "tuned"
  workdir.mkdir()
  workdir_lib.write_json_atomically(str(workdir / "data.json"), {"classes": ["a", "b"]})
  config = finetune.finetune_config()
  config.update(mode="eval", init_from=str(workdir))
  config.data.update(dataset="folder", data_dir=str(tmp_path / "data"), split="train")
  with pytest.raises(ValueError, match=r"other classes.*1 only in its training \(b\); 1 only "
                                       r"here \(c\)"):
    finetune._check_head_classes(config)
