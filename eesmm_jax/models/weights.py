"""Encoder weights to start from, for pretraining's `init_from` and for fine-tuning: one loader.

Sources: a PyTorch .pth (official, timm or SimMIM layout, through `convert`), a directory written by
`python -m eesmm_jax.convert to-flax`, or a pretraining / fine-tuning workdir (its latest
checkpoint's encoder). Tables of another window or image size are resized as `convert` resizes.
"""
from __future__ import annotations

import numpy as np
from absl import logging
from flax import traverse_util

from eesmm_jax import convert
from eesmm_jax.models import swin


def check_source(path: str) -> str:
  """'pth', 'convert' or 'workdir': the form of weights at `path`, from the file system alone;
  ValueError saying what is wrong and what is accepted (a run checks `init_from` with it while
  it is planned, before anything compiles)."""
  return convert.source_kind(path)


def _read_source(path: str, model: swin.SwinTransformer) -> dict:
  """Flattened Flax params from a .pth (any layout), a convert directory or a workdir."""
  kind = check_source(path)
  if kind == "convert":
    return traverse_util.flatten_dict(convert.load_flax(path)[0])
  if kind == "workdir":
    return traverse_util.flatten_dict(convert.latest_checkpoint_params(path))
  state, extra = convert.unwrap_checkpoint(convert.read_pth(path))
  if extra:
    logging.info("init_from %s: left out %d non-encoder tensors (%s ...)", path, len(extra),
                 sorted(extra)[0])
  # The source decides whether a head and a mask token come along; _fit_params keeps what fits.
  head = state.get("head.weight", state.get("head.fc.weight"))
  keep_head = bool(model.num_classes) and head is not None and head.shape[0] == model.num_classes
  state = {k: v for k, v in state.items() if keep_head or not k.startswith("head.")}
  source = model.clone(num_classes=model.num_classes if keep_head else 0,
                       use_mask_token="mask_token" in state)
  return traverse_util.flatten_dict(convert.torch_to_flax(state, source))


def _fit_params(flat: dict, model: swin.SwinTransformer, where: str) -> tuple[dict, bool]:
  """Source params -> those of `model` that the source provides, resized where they may be.

  Bias tables and absolute position embeddings of another size are resized bicubically; a head
  of another number of classes, or a mask token the source lacks, is left out (the caller keeps
  its fresh one). Returns (params, head_loaded).
  """
  expected = traverse_util.flatten_dict(convert.param_shapes(model))
  head_fits = all(p in flat and np.shape(flat[p]) == tuple(expected[p].shape)
                  for p in expected if p[0] == "head")
  out = {}
  for path, spec in expected.items():
    if (path[0] == "head" and not head_fits) or (path[0] == "mask_token" and path not in flat):
      continue
    if path not in flat:
      raise convert.ConversionError(
          f"{where} does not fit the model: it has no {'/'.join(path)} (model: "
          f"embed_dim={model.embed_dim}, depths={tuple(model.depths)})")
    value = convert.resize_to(path, np.asarray(flat[path]), spec.shape)
    if value.shape != spec.shape:
      raise convert.ConversionError(f"{where}: {'/'.join(path)} has shape {value.shape}, the "
                                    f"model expects {tuple(spec.shape)}")
    out[path] = value.astype(spec.dtype)
  return traverse_util.unflatten_dict(out), head_fits and any(p[0] == "head" for p in expected)


def load_weights(path: str, model: swin.SwinTransformer) -> tuple[dict, bool]:
  """Params for `model` (an encoder, or a classifier) from a PyTorch .pth (official, timm or
  SimMIM layout), a `convert to-flax` directory, or a pretraining / fine-tuning workdir.

  -> (params, head_loaded). What the source lacks and a run makes fresh (a head of another size,
  a mask token) is absent from params: merge them over the run's initial params.
  """
  return _fit_params(_read_source(path, model), model, f"init_from {path!r}")


def merge_params(init: dict, loaded: dict) -> dict:
  """`loaded` over `init`, leaf by leaf, in init's dtypes."""
  flat = traverse_util.flatten_dict(init)
  for path, value in traverse_util.flatten_dict(loaded).items():
    flat[path] = np.asarray(value, np.asarray(flat[path]).dtype)
  return traverse_util.unflatten_dict(flat)
