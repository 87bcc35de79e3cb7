"""Symbolic links in a folder source: links that lead nowhere are bad images (named, counted, never
a raw error), a directory loop is walked once, and an image reached by several paths is listed
once. URL paths (gs://, here TF's ram://) are still listed through tf.io.gfile."""
import contextlib
import io
import logging
import os
import signal

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from eesmm_jax.data import tfdata as ip


def png(value):
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def images(d, n, start=0):
  d.mkdir(parents=True, exist_ok=True)
  for i in range(start, start + n):
    (d / f"{i}.png").write_bytes(png(i))


@contextlib.contextmanager
def within(seconds):
  """Fails instead of hanging: two nested directory loops, walked without a seen-set, list
  every path through them ~40 levels deep, exponentially many."""
  def too_long(*_):
    raise TimeoutError(f"listing took more than {seconds} s: the links are walked in circles")
  previous = signal.signal(signal.SIGALRM, too_long)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def fresh_process():
  """As a new process: no manifests read, nothing reported yet."""
  ip._manifests.clear()
  ip._reported.clear()


def rel(paths, root):
  return sorted(os.path.relpath(p, root) for p in paths)


def test_dangling_links_and_link_loops_are_bad_images(tmp_path, caplog):
  images(tmp_path, 3)
  os.symlink("missing.png", tmp_path / "dangling.png")
  os.symlink("loop.png", tmp_path / "loop.png")  # ELOOP when followed
  os.symlink("0.png", tmp_path / "alias.png")    # the same image as 0.png
  os.symlink("nowhere", tmp_path / "notes")      # not an image by name: ignored, said once
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # listed twice, as a run does: each line still appears once
      paths, labels, classes = ip.list_folder(str(tmp_path), "train")
  assert rel(paths, tmp_path) == ["0.png", "1.png", "2.png"] and labels is None and not classes
  bad = dict((os.path.basename(p), why) for p, why in
             ip.bad_images(_config(tmp_path)))
  assert sorted(bad) == ["dangling.png", "loop.png"]
  assert bad["dangling.png"].startswith("dangling symbolic link (-> missing.png")
  assert bad["loop.png"].startswith("symbolic link loop")
  log = [r.getMessage() for r in caplog.records]
  for name in ("dangling.png", "loop.png", "notes"):
    assert sum(name in m for m in log) == 1, (name, log)
  assert sum("reached by more than one path" in m for m in log) == 1
  # Links to nothing leave no verdict behind; the real images keep theirs.
  manifest = (tmp_path / ip.IMAGE_CHECK_FILE).read_text()
  assert "dangling.png" not in manifest and "\t0.png" in manifest


def test_a_folder_of_dangling_links_is_a_clear_error(tmp_path):
  for i in range(3):
    os.symlink(f"/nonexistent/{i}.png", tmp_path / f"{i}.png")
  with pytest.raises(ValueError, match=r"no readable image .* all 3 files .*dangling symbolic"):
    ip.list_folder(str(tmp_path), "train")


def test_directory_links_are_followed_once_per_real_directory(tmp_path, caplog):
  root = tmp_path / "data" / "train"
  images(root / "a", 2)
  images(root / "a" / "sub", 2, start=10)
  images(root / "b", 3, start=20)
  elsewhere = tmp_path / "elsewhere"
  images(elsewhere, 2, start=30)
  os.symlink("..", root / "a" / "up")                   # a loop up to the root
  os.symlink("../../a", root / "a" / "sub" / "back")    # a loop up to its class
  os.symlink("sub", root / "a" / "sub_again")           # a second path to a directory
  os.symlink("../b", root / "a" / "to_b")               # into another class: b keeps them
  os.symlink(elsewhere, root / "b" / "outside")         # outside the root: followed
  os.symlink(elsewhere, root / "b" / "outside_again")   # once
  os.symlink(root / "b", root / "c")                    # a class that is a link: b's images
  with caplog.at_level(logging.WARNING), within(60):
    paths, labels, classes = ip.list_folder(str(tmp_path / "data"), "train")
  assert classes == ["a", "b", "c"]
  assert rel(paths, root) == ["a/0.png", "a/1.png", "a/sub/10.png", "a/sub/11.png",
                              "b/20.png", "b/21.png", "b/22.png",
                              "b/outside/30.png", "b/outside/31.png"]
  assert [classes[i] for i in labels] == [p.split("/")[0] for p in rel(paths, root)]
  log = [r.getMessage() for r in caplog.records]
  for link in ("a/up", "a/sub/back", "a/sub_again", "a/to_b", "b/outside_again"):
    assert sum(m.startswith(f"not following {root}/{link}:") for m in log) == 1, (link, log)


def test_url_paths_are_listed_through_gfile():
  """gs:// cannot be reached from the tests; TF's in-memory file system takes the same path."""
  root = "ram://links_test/train"
  for c in ("a", "b"):
    tf.io.gfile.makedirs(f"{root}/{c}")
  for name, data in [("a/1.png", png(1)), ("a/2.png", png(2)), ("b/3.png", png(3)),
                     ("b/4.png", b"not an image")]:
    with tf.io.gfile.GFile(f"{root}/{name}", "wb") as f:
      f.write(data)
  paths, labels, classes = ip.list_folder("ram://links_test", "train")
  assert paths == [f"{root}/a/1.png", f"{root}/a/2.png", f"{root}/b/3.png"]
  assert labels == [0, 0, 1] and classes == ["a", "b"]
  assert [p for p, _ in ip.bad_images(_config("ram://links_test"))] == [f"{root}/b/4.png"]
  ip._manifests.clear()  # as a new process: the verdicts come from the manifest
  assert ip.list_folder("ram://links_test", "train")[0] == paths


def _config(data_dir):
  c = ip.default_data_config()
  c.update(dataset="folder", data_dir=str(data_dir))
  return c
