"""Reconstruction grids: what the decoder recovers from the blended, masked input."""

from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image

from eesmm_jax.input_pipeline import MEAN_RGB, STDDEV_RGB


def _to_uint8(x: np.ndarray) -> np.ndarray:
  x = x * np.asarray(STDDEV_RGB) + np.asarray(MEAN_RGB)
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def reconstruction_grid(aux: dict, max_rows: int = 4) -> np.ndarray:
  """One row per blended sample: the n originals, the blended masked input, then the n
  reconstructions (predicted pixels where component k is masked, its visible pixels elsewhere,
  as SimMIM's figures show). uint8 [rows * H, (2n + 1) * W, 3]."""
  aux = jax.device_get(aux)
  targets, preds, inputs = aux["targets"], aux["predictions"], aux["inputs"]
  masks = aux["masks"]
  rows, n, h, w, _ = targets.shape
  rows = min(rows, max_rows)
  scale = h // masks.shape[-1]
  pix = np.repeat(np.repeat(masks, scale, axis=-2), scale, axis=-1)[..., None]
  tiles = []
  for b in range(rows):
    row = [targets[b, k] for k in range(n)] + [inputs[b]]
    row += [np.where(pix[b, k] > 0, preds[b, k], targets[b, k]) for k in range(n)]
    tiles.append(np.concatenate([_to_uint8(t) for t in row], axis=1))
  grid = np.concatenate(tiles, axis=0)
  zoom = max(1, 96 // h)  # small images (the demo's 32 px digits) are enlarged to be seen
  return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


def write_reconstructions(workdir: str, step: int, aux: dict, writer=None) -> str:
  """`<workdir>/pictures/recon_<step>.png`, and the same image to TensorBoard."""
  if jax.process_index() != 0:
    return ""
  grid = reconstruction_grid(aux)
  os.makedirs(os.path.join(workdir, "pictures"), exist_ok=True)
  path = os.path.join(workdir, "pictures", f"recon_{step:07d}.png")
  Image.fromarray(grid).save(path)
  if writer is not None:
    writer.write_images(step, {"reconstructions": grid[None]})
  return path
