"""Bad files in a folder source: skipped, named in the log, counted; odd colour modes become RGB."""
import builtins
import io
import logging
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from eesmm_jax.data import tfdata as ip



def encoded(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def rgb(colour):
  return Image.new("RGB", (40, 32), colour)


JPEG = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)),
               "JPEG")
PNG = encoded(rgb((1, 2, 3)), "PNG")

# name -> (bytes, the RGB it must decode to); every image a solid colour.
GOOD = {
    "rgb.jpg": (encoded(rgb((200, 60, 30)), "JPEG", quality=95), (200, 60, 30)),
    "rgb.png": (encoded(rgb((10, 20, 250)), "PNG"), (10, 20, 250)),
    "gray.jpg": (encoded(rgb((90, 90, 90)).convert("L"), "JPEG", quality=95), (90, 90, 90)),
    "gray.png": (encoded(rgb((70, 70, 70)).convert("L"), "PNG"), (70, 70, 70)),
    "cmyk.jpg": (encoded(rgb((40, 160, 220)).convert("CMYK"), "JPEG", quality=95), (40, 160, 220)),
    "alpha.png": (encoded(Image.new("RGBA", (40, 32), (250, 100, 0, 60)), "PNG"), (250, 100, 0)),
    "gray_alpha.png": (encoded(Image.new("LA", (40, 32), (120, 200)), "PNG"), (120, 120, 120)),
    "palette.png": (encoded(rgb((0, 128, 255)).convert("P", palette=Image.ADAPTIVE), "PNG"), (0, 128, 255)),
    "16bit.png": (encoded(Image.new("I;16", (40, 32), 180 * 257), "PNG"), (180, 180, 180)),
}
BAD = {
    "truncated.jpg": JPEG[: len(JPEG) // 2],
    "no_end_marker.jpg": JPEG[:-2],
    "truncated.png": PNG[: len(PNG) // 2],
    "corrupt.png": PNG[:40] + b"\x00" * 16 + PNG[56:],   # a flipped chunk: CRC mismatch
    "corrupt.jpg": JPEG[:200] + bytes(range(256)) * 4,   # garbage after the headers
    "empty.jpg": b"",
    "notes.png": b"not an image, despite the name",
    "image.tiff.jpg": encoded(rgb((5, 5, 5)), "TIFF"),  # an image TF cannot decode
}


@pytest.fixture
def folder(tmp_path):
  """ImageFolder layout, one file per class, so each label names one file."""
  for name, data in [(n, d) for n, (d, _) in GOOD.items()] + list(BAD.items()):
    d = tmp_path / "train" / name.replace(".", "_")
    d.mkdir(parents=True)
    (d / name).write_bytes(data)
  ip._manifests.clear()
  ip._reported.clear()
  return tmp_path


def folder_config(folder, **kw):
  c = ip.default_data_config()
  c.update(dataset="folder", data_dir=str(folder), img_size=16, **kw)
  return c


def names(paths):
  return sorted(os.path.basename(p) for p in paths)


def test_bad_files_are_skipped_named_and_counted(folder, caplog):
  c = folder_config(folder)
  with caplog.at_level(logging.WARNING):
    paths, labels, classes = ip.list_folder(str(folder), "train")
  assert names(paths) == sorted(GOOD)
  bad = ip.bad_images(c)
  assert names(p for p, _ in bad) == sorted(BAD) and all(why for _, why in bad)
  assert dict((os.path.basename(p), why) for p, why in bad)["empty.jpg"].startswith("empty")
  for name in BAD:  # each named in the log, once
    assert sum(name in r.getMessage() for r in caplog.records) == 1, name
  assert ip.num_examples(c) == len(GOOD)
  # Labels still name the class directories (bad ones leave gaps).
  assert [classes[l] for l in labels] == [os.path.basename(os.path.dirname(p)) for p in paths]


def test_odd_colour_modes_decode_as_rgb(folder):
  c = folder_config(folder)
  _, _, classes = ip.list_folder(str(folder), "train")
  it = ip.create_pretrain_iterator(c, len(GOOD), process_index=0, process_count=1)
  for _ in range(2):  # two epochs: nothing bad reaches the decoder
    batch = next(it)
    assert sorted(batch["label"]) == sorted(classes.index(n.replace(".", "_")) for n in GOOD)
    for image, label in zip(batch["image"], batch["label"]):
      name = classes[label].replace("_jpg", ".jpg").replace("_png", ".png")
      want = np.array(GOOD[name][1])  # uint8 pixels
      tol = 7 if name.endswith(".jpg") else 0
      np.testing.assert_allclose(image, np.broadcast_to(want, image.shape), atol=tol, err_msg=name)


def test_verdicts_are_cached_until_a_file_changes(folder, monkeypatch):
  ip.list_folder(str(folder), "train")
  manifest = folder / "train" / ip.IMAGE_CHECK_FILE
  assert manifest.exists()
  ip._manifests.clear()  # as a new process: only the manifest on disk

  def no_decode(path):
    raise AssertionError(f"{path} decoded again")

  monkeypatch.setattr(ip, "image_problem", no_decode)
  paths, _, _ = ip.list_folder(str(folder), "train")
  assert names(paths) == sorted(GOOD)

  changed = folder / "train" / "rgb_png" / "rgb.png"
  changed.write_bytes(GOOD["rgb.png"][0][:30])  # truncated: another size, checked again
  monkeypatch.undo()
  paths, _, _ = ip.list_folder(str(folder), "train")
  assert "rgb.png" not in names(paths)
  assert "rgb.png" in names(p for p, _ in ip.bad_images(folder_config(folder)))


def test_unwritable_folder_keeps_its_manifest_in_the_user_cache(folder, monkeypatch,
                                                                tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
  (folder / "train" / ip.IMAGE_CHECK_FILE).mkdir()  # the manifest's name is taken: not writable
  ip.list_folder(str(folder), "train")
  written = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]
  assert len(written) == 1 and written[0].endswith(".tsv")
  lines = open(written[0]).read().splitlines()
  assert lines[0].startswith("# eesmm_jax image check") and len(lines) == 1 + len(GOOD) + len(BAD)
  assert not [f for f in os.listdir(folder / "train") if ".tmp." in f]


def test_folder_without_a_readable_image_is_an_error(tmp_path):
  for name, data in BAD.items():
    (tmp_path / name).write_bytes(data)
  with pytest.raises(ValueError, match=r"no readable image in .*all 8 files fail to decode"):
    ip.list_folder(str(tmp_path), "train")


# ----------------------------------------------------------------------------- permissions
# As root every file is readable whatever its mode, so these tests change what the cache key
# sees (mode, ctime, inode) and inject the failure to open instead of relying on chmod 000.
def checked_again(folder, monkeypatch):
  """Lists the folder as a new process would and returns the names it decoded again."""
  ip._manifests.clear()
  decoded, real = [], ip.image_problem
  monkeypatch.setattr(ip, "image_problem",
                      lambda p: decoded.append(os.path.basename(p)) or real(p))
  ip.list_folder(str(folder), "train")
  monkeypatch.setattr(ip, "image_problem", real)
  return decoded


@pytest.mark.parametrize("change", ["chmod", "chmod_same_mode", "replaced"])
def test_a_permission_change_is_judged_again(folder, monkeypatch, change):
  """The verdict's key holds mode bits (chmod), ctime (chmod, chown, ACLs; here a chmod to the
  same mode) and inode (a file replaced by one of the same mtime and size)."""
  ip.list_folder(str(folder), "train")
  assert checked_again(folder, monkeypatch) == []
  path = folder / "train" / "rgb_png" / "rgb.png"
  time.sleep(0.05)  # the ctime clock ticks in milliseconds
  if change == "chmod":
    os.chmod(path, 0o400)
  elif change == "chmod_same_mode":
    os.chmod(path, os.stat(path).st_mode & 0o7777)
  else:
    shutil.copy2(path, str(path) + ".new")  # same bytes and mtime, another inode
    os.replace(str(path) + ".new", path)
  assert checked_again(folder, monkeypatch) == ["rgb.png"]
  assert checked_again(folder, monkeypatch) == []  # the new verdict is kept


def refuse(monkeypatch, name):
  """Opening files called `name` fails as on a file without read permission."""
  def fake_open(path, *args, **kw):
    if os.path.basename(str(path)) == name:
      raise PermissionError(13, "Permission denied", str(path))
    return builtins.open(path, *args, **kw)
  monkeypatch.setattr(ip, "open", fake_open, raising=False)


def test_a_file_that_becomes_unreadable_is_skipped_and_comes_back(folder, monkeypatch):
  ip.list_folder(str(folder), "train")  # every verdict cached
  refuse(monkeypatch, "rgb.png")          # e.g. its group lost read access: nothing on it changes
  ip._manifests.clear()
  paths, _, _ = ip.list_folder(str(folder), "train")
  assert "rgb.png" not in names(paths)
  why = dict((os.path.basename(p), w) for p, w in ip.bad_images(folder_config(folder)))
  assert why["rgb.png"] == "cannot read the file (Permission denied)"

  monkeypatch.undo()  # readable again, still with nothing changed on the file
  ip._manifests.clear()
  paths, _, _ = ip.list_folder(str(folder), "train")
  assert "rgb.png" in names(paths)


def test_a_cached_read_failure_is_never_reused(folder, monkeypatch):
  """A stale 'cannot read' verdict would skip a readable file for ever."""
  real = ip.image_problem
  monkeypatch.setattr(ip, "image_problem", lambda p: "cannot read the file (Permission denied)"
                      if p.endswith("rgb.png") else real(p))
  assert "rgb.png" not in names(ip.list_folder(str(folder), "train")[0])
  monkeypatch.undo()
  ip._manifests.clear()
  assert "rgb.png" in names(ip.list_folder(str(folder), "train")[0])


def test_a_manifest_of_the_old_format_is_checked_again(folder, monkeypatch):
  """Manifests written before the key held mode, inode and ctime: read as empty, no error."""
  manifest = folder / "train" / ip.IMAGE_CHECK_FILE
  manifest.write_text("".join(f"1\t2\t\t{n.replace('.', '_')}/{n}\n" for n in GOOD))
  every = sorted(n for n in list(GOOD) + list(BAD) if n != "empty.jpg")  # 0 bytes: no decode
  assert sorted(checked_again(folder, monkeypatch)) == every
  assert manifest.read_text().startswith("# eesmm_jax image check v2")
  assert checked_again(folder, monkeypatch) == []


def test_chmod_000_then_back(folder):
  """The real thing, where the tests run without the right to read any file."""
  path = folder / "train" / "rgb_png" / "rgb.png"
  ip.list_folder(str(folder), "train")
  os.chmod(path, 0)
  try:
    open(path, "rb").close()
    os.chmod(path, 0o644)
    pytest.skip("this process reads files whatever their mode (root, CAP_DAC_OVERRIDE): the "
                "tests above cover it by injection")
  except PermissionError:
    pass
  try:
    ip._manifests.clear()
    assert "rgb.png" not in names(ip.list_folder(str(folder), "train")[0])
  finally:
    os.chmod(path, 0o644)
  ip._manifests.clear()
  assert "rgb.png" in names(ip.list_folder(str(folder), "train")[0])
