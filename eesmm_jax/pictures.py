"""Reconstruction grids: what the decoder recovers from the blended, masked input."""

from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image, ImageDraw

from eesmm_jax.data import MEAN_RGB, STDDEV_RGB


def _to_uint8(x: np.ndarray) -> np.ndarray:
  x = x * np.asarray(STDDEV_RGB) + np.asarray(MEAN_RGB)
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def _labelled(grid: np.ndarray, labels: list[str], tile_w: int, row_labels: list[str],
              tile_h: int) -> np.ndarray:
  """A header row naming the columns and a left margin naming the rows, in black on white."""
  top, left = 14, 8 * max(len(r) for r in row_labels) + 6
  canvas = Image.new("RGB", (grid.shape[1] + left, grid.shape[0] + top), "white")
  canvas.paste(Image.fromarray(grid), (left, top))
  draw = ImageDraw.Draw(canvas)
  for c, label in enumerate(labels):
    draw.text((left + c * tile_w + 2, 1), label, fill="black")
  for r, label in enumerate(row_labels):
    draw.text((2, top + r * tile_h + tile_h // 2 - 5), label, fill="black")
  return np.asarray(canvas)


def reconstruction_grid(aux: dict, max_rows: int = 4) -> np.ndarray:
  """Two rows per blended sample, columns: the n originals, the blended masked input, the n
  reconstructions. Row 'raw': the decoder's output everywhere. Row 'pasted': each original with
  its masked blocks greyed, and each reconstruction with the visible pixels pasted over it (as
  MAE's figures show). Images in image space: with norm_target the predictions are shown
  de-normalised with each original's local statistics (`objectives.denormalize_targets`), so
  a reconstruction looks like the image it recovers. Labelled; uint8 [H', W', 3]."""
  aux = jax.device_get(aux)
  targets, preds, inputs = aux["images"], aux["reconstructions"], aux["inputs"]
  masks = aux["masks"]
  rows, n, h, w, _ = targets.shape
  rows = min(rows, max_rows)
  scale = h // masks.shape[-1]
  pix = np.repeat(np.repeat(masks, scale, axis=-2), scale, axis=-1)[..., None]
  grey = np.zeros_like(targets[0, 0])  # the normalised mean: grey once shown
  tiles, row_labels = [], []
  for b in range(rows):
    raw = [targets[b, k] for k in range(n)] + [inputs[b]] + [preds[b, k] for k in range(n)]
    pasted = ([np.where(pix[b, k] > 0, grey, targets[b, k]) for k in range(n)] + [inputs[b]] +
              [np.where(pix[b, k] > 0, preds[b, k], targets[b, k]) for k in range(n)])
    for row, name in ((raw, "raw"), (pasted, "pasted")):
      tiles.append(np.concatenate([_to_uint8(t) for t in row], axis=1))
      row_labels.append(f"{b} {name}")
  grid = np.concatenate(tiles, axis=0)
  zoom = max(1, 96 // h)  # small images (the demo's 32 px digits) are enlarged to be seen
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  labels = ([f"original {k + 1}" for k in range(n)] + ["masked blend"] +
            [f"recon {k + 1}" for k in range(n)])
  return _labelled(grid, labels, w * zoom, row_labels, h * zoom)


def tile_grid(rows: list, column_labels: list[str], row_labels: list[str]) -> np.ndarray:
  """Rows of ImageNet-normalised images [H, W, C] as one labelled uint8 picture, small images
  enlarged to be seen (the figure of `eesmm_jax.tools.study`)."""
  h, w = np.shape(rows[0][0])[:2]
  grid = np.concatenate([np.concatenate([_to_uint8(np.asarray(t)) for t in row], axis=1)
                         for row in rows], axis=0)
  zoom = max(1, 96 // h)
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  return _labelled(grid, column_labels, w * zoom, row_labels, h * zoom)


def write_reconstructions(workdir: str, step: int, aux: dict, writer=None) -> str:
  """`<workdir>/pictures/recon_<step>.png`, and the same image to TensorBoard."""
  if jax.process_index() != 0:
    return ""
  grid = reconstruction_grid(aux)
  os.makedirs(os.path.join(workdir, "pictures"), exist_ok=True)
  path = os.path.join(workdir, "pictures", f"recon_{step:07d}.png")
  # Written beside and renamed: a full disk leaves no half picture under the real name.
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  if writer is not None:
    writer.write_images(step, {"reconstructions": grid[None]})
  return path
