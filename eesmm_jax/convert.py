"""Swin weights between PyTorch state dicts and Flax params, both ways.

Accepted PyTorch layouts:
  * 'official': microsoft/Swin-Transformer (downsample at the end of stages 0..n-2 as
    `layers.{i}.downsample`, classifier `head.*`, persistent `relative_position_index` and
    `attn_mask` buffers);
  * 'timm' (>= 0.9): downsample at the start of stages 1..n-1 (`layers.{i+1}.downsample`),
    classifier `head.fc.*`, no buffers;
  * SimMIM checkpoints: the official layout under `encoder.` plus `encoder.mask_token`, with the
    `decoder.*` weights kept apart (returned by `torch_to_flax(..., return_extra=True)`, never
    mixed into the encoder params).

Our Flax names mirror the official ones (see models/swin.py), so the map is a renaming plus the
layout conversions: Linear weights transpose, Conv weights OIHW -> HWIO, LayerNorm weight -> scale.

Command line (needs the `torch` extra):
  python -m eesmm_jax.convert to-flax simmim_pretrain.pth ckpt_dir --model swin_base \
      --img_size 224 --window_size 7 --num_classes 0 --use_mask_token
  python -m eesmm_jax.convert to-torch ckpt_dir swin.pth --layout timm
  python -m eesmm_jax.convert to-torch /path/to/workdir encoder.pth   # its latest checkpoint
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from eesmm_jax.models import swin

BUFFERS = ("relative_position_index", "attn_mask")
LAYOUTS = ("timm", "official")


class ConversionError(ValueError):
  """Keys or shapes of a checkpoint do not fit the target model."""


# ----------------------------------------------------------------------------------------------
# Naming.


def _flax_to_torch_name(path: tuple[str, ...], layout: str, num_stages: int) -> str:
  """('layers_0', 'blocks_1', 'attn', 'qkv', 'kernel') -> 'layers.0.blocks.1.attn.qkv.weight'."""
  parts = []
  for name in path:
    m = re.fullmatch(r"(layers|blocks)_(\d+)", name)
    parts.extend([m.group(1), m.group(2)] if m else [name])
  leaf = parts[-1]
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  key = ".".join(parts)
  if layout == "timm":
    key = re.sub(r"^layers\.(\d+)\.downsample",
                 lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
    key = re.sub(r"^head\.", "head.fc.", key)
  return key


def _to_torch_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def _to_flax_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'official' when stage 0 owns a downsample or the head is a bare Linear, else 'timm'."""
  if "layers.0.downsample.reduction.weight" in state_dict or "head.weight" in state_dict:
    return "official"
  return "timm"


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict, dict]:
  """Strips the {'model': ...} wrapper and a SimMIM `encoder.` prefix.

  Returns (encoder_state_dict, extra) where extra holds the keys outside the encoder
  (a SimMIM `decoder.*`), under their original names.
  """
  if not isinstance(checkpoint, Mapping):
    raise ConversionError(f"holds a {type(checkpoint).__name__}, not a state dict: expected a "
                          f"dict of parameter names to tensors, as torch.save(model.state_dict(), "
                          f"path) writes (optionally under 'model' or 'state_dict')")
  for wrapper in ("model", "state_dict"):
    if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
      checkpoint = checkpoint[wrapper]
  odd = [k for k in checkpoint if not isinstance(k, str)]
  if odd:
    raise ConversionError(f"holds a dict keyed by {type(odd[0]).__name__} ({odd[0]!r}), not a "
                          f"state dict: expected parameter names (str) to tensors")
  if not any(k.startswith("encoder.") for k in checkpoint):
    return dict(checkpoint), {}
  encoder = {k[len("encoder."):]: v for k, v in checkpoint.items() if k.startswith("encoder.")}
  extra = {k: v for k, v in checkpoint.items() if not k.startswith("encoder.")}
  return encoder, extra


# ----------------------------------------------------------------------------------------------
# Resizing position tables (when the window or image size changes between checkpoints).


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a=-0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of PyTorch's `interpolate(mode='bicubic', align_corners=False)` along one
  axis: half-pixel source coordinates, border taps clamped."""
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  left = np.floor(src).astype(np.int64)
  weights = _cubic_weights(src - left)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(left - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
  return matrix


def resize_grid(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of [H, W, C] to [out_h, out_w, C], as the Swin reference's `load_pretrained`
  does with F.interpolate (SimMIM's scipy interp2d no longer exists in SciPy >= 1.14)."""
  mh = bicubic_matrix(grid.shape[0], out_hw[0])
  mw = bicubic_matrix(grid.shape[1], out_hw[1])
  out = np.einsum("oh,hwc,pw->opc", mh, grid.astype(np.float64), mw)
  return out.astype(grid.dtype)


def resize_relative_position_bias_table(table: np.ndarray, num_positions: int) -> np.ndarray:
  """((2W-1)^2, heads) -> (num_positions, heads), both square grids of relative offsets."""
  src, dst = _square_side(table.shape[0]), _square_side(num_positions)
  return resize_grid(table.reshape(src, src, -1), (dst, dst)).reshape(dst * dst, -1)


def resize_absolute_pos_embed(pos: np.ndarray, num_patches: int) -> np.ndarray:
  """(1, L, C) -> (1, num_patches, C) over the square patch grid."""
  src, dst = _square_side(pos.shape[1]), _square_side(num_patches)
  return resize_grid(pos[0].reshape(src, src, -1), (dst, dst)).reshape(1, dst * dst, -1)


def _square_side(n: int) -> int:
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ConversionError(f"cannot resize a table of {n} positions: not a square grid")
  return side


_RESIZERS = {
    "relative_position_bias_table": lambda v, shape: resize_relative_position_bias_table(v, shape[0]),
    "absolute_pos_embed": lambda v, shape: resize_absolute_pos_embed(v, shape[1]),
}


def resize_to(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`value` at `shape` where the parameter at `path` may be resized (a relative position bias
  table, an absolute position embedding), else unchanged; the caller checks the shape."""
  if value.shape != tuple(shape) and path[-1] in _RESIZERS:
    return _RESIZERS[path[-1]](value, shape)
  return value


# ----------------------------------------------------------------------------------------------
# Conversion.


def param_shapes(model: swin.SwinTransformer) -> dict:
  """The model's param tree as ShapeDtypeStructs, without allocating anything."""
  x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_chans), np.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is imported only by the CLI
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def torch_to_flax(state_dict: Mapping[str, Any], model: swin.SwinTransformer, *,
                  return_extra: bool = False):
  """PyTorch Swin (official, timm or SimMIM) state dict -> Flax params for `model`.

  Buffers (`relative_position_index`, `attn_mask`) are ignored: the model computes them.
  Relative position bias tables and `absolute_pos_embed` are resized bicubically when the
  model's window or image size differs from the checkpoint's. Keys outside the encoder (a SimMIM
  decoder) are refused unless `return_extra=True`, which returns `(params, extra)`.
  Raises ConversionError naming missing and unexpected keys, or the first shape mismatch.
  """
  encoder, extra = unwrap_checkpoint(state_dict)
  if extra and not return_extra:
    raise ConversionError(
        f"the checkpoint holds weights outside the encoder ({_preview(sorted(extra))}); pass "
        "return_extra=True to receive them separately")
  layout = detect_layout(encoder)
  expected = traverse_util.flatten_dict(param_shapes(model))
  names = {path: _flax_to_torch_name(path, layout, len(model.depths)) for path in expected}

  missing = sorted(n for n in names.values() if n not in encoder)
  wanted = set(names.values())
  unexpected = sorted(k for k in encoder
                      if k not in wanted and k.split(".")[-1] not in BUFFERS)
  if missing or unexpected:
    raise ConversionError(
        f"checkpoint ({layout} layout) does not fit {type(model).__name__}"
        f"(embed_dim={model.embed_dim}, depths={tuple(model.depths)}, "
        f"num_classes={model.num_classes}, use_mask_token={model.use_mask_token}, "
        f"ape={model.ape}): missing keys {_preview(missing)}; unexpected keys "
        f"{_preview(unexpected)}")

  flat = {}
  for path, spec in expected.items():
    value = resize_to(path, _to_flax_value(path, _as_numpy(encoder[names[path]])), spec.shape)
    if value.shape != spec.shape:
      raise ConversionError(
          f"shape mismatch for {names[path]} (flax {'/'.join(path)}): checkpoint "
          f"{tuple(_as_numpy(encoder[names[path]]).shape)} -> {value.shape} after layout "
          f"conversion, model expects {tuple(spec.shape)}")
    flat[path] = value.astype(spec.dtype)
  params = traverse_util.unflatten_dict(flat)
  if return_extra:
    return params, {k: _as_numpy(v) for k, v in extra.items()}
  return params


def flax_to_torch(params: Mapping, model: swin.SwinTransformer,
                  layout: str = "timm") -> dict[str, np.ndarray]:
  """Flax params -> a state dict (numpy values) that loads with `strict=True` into timm's
  SwinTransformer ('timm') or microsoft/Swin-Transformer's ('official', buffers included).
  A `mask_token`, if present, is exported as `mask_token` (prefix the keys with `encoder.` for a
  SimMIM checkpoint)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  expected = traverse_util.flatten_dict(param_shapes(model))
  flat = traverse_util.flatten_dict(params)
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    raise ConversionError(f"params do not fit the model: missing {_preview(missing)}; "
                          f"unexpected {_preview(extra)}")
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if value.shape != expected[path].shape:
      raise ConversionError(f"shape mismatch for {'/'.join(path)}: params {value.shape}, "
                            f"model expects {tuple(expected[path].shape)}")
    out[_flax_to_torch_name(path, layout, len(model.depths))] = _to_torch_value(path, value)
  if layout == "official":
    out.update(_official_buffers(model))
  return out


def _official_buffers(model: swin.SwinTransformer) -> dict[str, np.ndarray]:
  """The persistent buffers that the official model's strict load expects."""
  out = {}
  res = model.img_size // model.patch_size
  for i, depth in enumerate(model.depths):
    for j in range(depth):
      ws, shift = swin.effective_window(res, model.window_size,
                                        0 if j % 2 == 0 else model.window_size // 2)
      prefix = f"layers.{i}.blocks.{j}"
      out[f"{prefix}.attn.relative_position_index"] = swin.relative_position_index(ws)
      if shift:
        out[f"{prefix}.attn_mask"] = swin.shifted_window_mask(res, res, ws, shift)
    res //= 2
  return out


def _preview(keys: list[str], limit: int = 8) -> str:
  if not keys:
    return "none"
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return "[" + ", ".join(keys[:limit]) + "]" + more


# ----------------------------------------------------------------------------------------------
# Command line: .pth <-> Orbax checkpoint (params plus a model.json describing the model).

MODEL_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
                "num_heads", "window_size", "mlp_ratio", "qkv_bias", "ape", "patch_norm",
                "use_mask_token")


def model_spec(model: swin.SwinTransformer) -> dict:
  return {f: (list(getattr(model, f)) if f in ("depths", "num_heads") else getattr(model, f))
          for f in MODEL_FIELDS}


def save_flax(params, model: swin.SwinTransformer, directory: str) -> None:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump(model_spec(model), f, indent=1)


def load_flax(directory: str):
  """-> (params, model) from a directory written by `save_flax`."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, "model.json")) as f:
    model = swin.SwinTransformer(**json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"), param_shapes(model))
  return jax.tree_util.tree_map(np.asarray, params), model


def read_pth(path: str):
  """What torch.save wrote at `path`, checked to be a state dict (see `unwrap_checkpoint`);
  ConversionError naming the file when it does not load or holds something else."""
  import torch  # the `torch` extra
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except OSError:
    raise
  except Exception as e:  # noqa: BLE001 - pickle, zip and torch's own errors alike
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConversionError(f"{path} does not load as a PyTorch checkpoint ({first})") from None
  try:
    unwrap_checkpoint(checkpoint)
  except ConversionError as e:
    raise ConversionError(f"{path} {e}") from None
  return checkpoint


SOURCES = ("a .pth, a `convert to-flax` directory (model.json), or a pretraining / fine-tuning "
           "workdir (checkpoints/<step>)")


def source_kind(path: str) -> str:
  """'pth', 'convert' or 'workdir': which form of weights `path` is, read from the file system
  only (cheap: a run checks it while it is planned). ValueError naming `path`, what is wrong
  and the forms accepted."""
  if not os.path.exists(path):
    raise ValueError(f"{path!r} does not exist: give {SOURCES}")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      head = f.read(4)
    if not head:
      raise ValueError(f"{path!r} is an empty file: give {SOURCES}")
    # torch.save writes a zip archive, or (before torch 1.6, or _use_new_zipfile_serialization
    # =False) a pickle, whose first byte is the PROTO opcode.
    if head[:2] != b"PK" and head[:1] != b"\x80":
      raise ValueError(f"{path!r} is not a PyTorch checkpoint (neither the zip archive nor the "
                       f"pickle torch.save writes): give {SOURCES}")
    return "pth"
  if os.path.exists(os.path.join(path, "model.json")):
    spec = _read_json(os.path.join(path, "model.json"))
    if spec is None:
      raise ValueError(f"{path!r} has a model.json that is not valid JSON (truncated?): "
                       f"convert again")
    unknown = sorted(set(spec) - set(MODEL_FIELDS))
    if unknown:
      raise ValueError(f"{path!r} has a model.json naming fields no Swin has ({unknown}): not "
                       f"written by `convert to-flax`")
    if not os.path.isdir(os.path.join(path, "params")):
      raise ValueError(f"{path!r} has model.json but no params/ beside it: an incomplete "
                       f"`convert to-flax` output; convert again")
    return "convert"
  steps = _checkpoint_steps(path)
  if steps:
    if not os.path.isdir(os.path.join(path, "checkpoints", str(max(steps)), "default")):
      raise ValueError(f"{path!r} has checkpoints/{max(steps)} without default/ in it: not a "
                       f"checkpoint of this project's trainer")
    return "workdir"
  parent = os.path.dirname(os.path.abspath(path))
  if any(d.isdigit() for d in os.listdir(path)):
    raise ValueError(f"{path!r} looks like a checkpoints folder (<workdir>/checkpoints): give "
                     f"the workdir that holds it, {parent!r}")
  if os.path.isdir(os.path.join(path, "default")):
    raise ValueError(f"{path!r} looks like one checkpoint (<workdir>/checkpoints/<step>): give "
                     f"the workdir, {os.path.dirname(parent)!r}")
  raise ValueError(f"{path!r} holds no checkpoint (no checkpoints/<step>) and no model.json: "
                   f"give {SOURCES}")


def _read_json(path: str):
  """The JSON object in `path`, or None where it is not one (torn, corrupt, not an object)."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, UnicodeDecodeError):
    return None
  return value if isinstance(value, dict) else None


def _checkpoint_steps(directory: str) -> list[int]:
  ckpt_dir = os.path.join(directory, "checkpoints")
  return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []


def latest_checkpoint_params(directory: str, encoder_only: bool = True) -> dict:
  """The params of the latest checkpoint of a pretraining or fine-tuning workdir, as numpy; of a
  pretraining checkpoint, the encoder's (the decoder left out) unless not `encoder_only`. Reads
  only: creates nothing there."""
  import orbax.checkpoint as ocp
  steps = _checkpoint_steps(directory)
  if not steps:
    source_kind(directory)  # raises, saying what the folder is instead
    raise ValueError(f"{directory!r} holds no checkpoint (no checkpoints/<step>): give a "
                     f"pretraining or fine-tuning workdir")
  latest = os.path.join(os.path.abspath(directory), "checkpoints", str(max(steps)), "default")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(latest)["params"]
  if encoder_only:
    params = params.get("encoder", params)
  return jax.tree_util.tree_map(np.asarray, params)


def workdir_model(directory: str, params: Mapping) -> swin.SwinTransformer:
  """The Swin of a workdir's checkpoints: its shape from the workdir's config.json (the config
  the checkpoints were written under), a head and a mask token where `params` hold them."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{directory!r} has no config.json, which names the model its checkpoints "
                     f"hold (a workdir from before config.json was kept): convert from a "
                     f"`convert to-flax` directory instead")
  flat = _read_json(path)
  if flat is None:
    raise ValueError(f"{path} is not valid JSON (truncated?): it names the model of the "
                     f"checkpoints beside it; restore it, or convert from a `convert to-flax` "
                     f"directory instead")
  try:
    kwargs = dict(img_size=flat["img_size"], patch_size=flat["model.patch_size"],
                  window_size=flat["model.window_size"])
    name = flat["model.name"]
  except KeyError as e:
    raise ValueError(f"{path} lacks {e.args[0]}: not a config the trainer recorded") from None
  for key in ("embed_dim", "depths", "num_heads"):
    value = flat.get(f"model.{key}")
    if value is not None:
      kwargs[key] = tuple(value) if key != "embed_dim" else value
  head = params.get("head", {}).get("kernel")
  return swin.create_model(name, num_classes=0 if head is None else int(np.shape(head)[-1]),
                           use_mask_token="mask_token" in params,
                           ape="absolute_pos_embed" in params, **kwargs)


def main(argv=None) -> None:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  to_flax = sub.add_parser("to-flax", help=".pth -> Orbax checkpoint directory")
  to_flax.add_argument("src")
  to_flax.add_argument("dst")
  to_flax.add_argument("--model", default="swin_base", choices=sorted(swin.VARIANTS))
  to_flax.add_argument("--img_size", type=int, default=224)
  to_flax.add_argument("--patch_size", type=int, default=4)
  to_flax.add_argument("--window_size", type=int, default=7)
  to_flax.add_argument("--num_classes", type=int, default=1000)
  to_flax.add_argument("--use_mask_token", action="store_true")
  to_flax.add_argument("--ape", action="store_true")
  to_flax.add_argument("--embed_dim", type=int, help="override the variant's width")
  to_flax.add_argument("--depths", type=int, nargs="+", help="override the variant's depths")
  to_flax.add_argument("--num_heads", type=int, nargs="+", help="override the variant's heads")
  to_torch = sub.add_parser("to-torch", help="a `to-flax` directory, or a pretraining or "
                           "fine-tuning workdir (its latest checkpoint's encoder) -> .pth")
  to_torch.add_argument("src")
  to_torch.add_argument("dst")
  to_torch.add_argument("--layout", default="timm", choices=LAYOUTS)
  args = parser.parse_args(argv)

  import torch
  if args.command == "to-flax":
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in vars(args).items()
                 if k in ("embed_dim", "depths", "num_heads") and v is not None}
    model = swin.create_model(args.model, img_size=args.img_size, patch_size=args.patch_size,
                              window_size=args.window_size, num_classes=args.num_classes,
                              use_mask_token=args.use_mask_token, ape=args.ape, **overrides)
    checkpoint = read_pth(args.src)
    params, extra = torch_to_flax(checkpoint, model, return_extra=True)
    save_flax(params, model, args.dst)
    if extra:
      print(f"left out {len(extra)} non-encoder tensors: {_preview(sorted(extra))}")
    print(f"wrote {args.dst}")
  else:
    if source_kind(args.src) == "pth":
      raise ValueError(f"{args.src!r} is a file: to-torch reads a `to-flax` directory or a "
                       f"pretraining / fine-tuning workdir")
    if source_kind(args.src) == "convert":
      params, model = load_flax(args.src)
    else:
      params = latest_checkpoint_params(args.src)
      model = workdir_model(args.src, params)
    state = flax_to_torch(params, model, layout=args.layout)
    torch.save({k: torch.tensor(np.asarray(v)) for k, v in state.items()}, args.dst)
    note = (" (with mask_token, which a classifier's strict load refuses: pop it, or load it "
            "as SimMIM's encoder.mask_token)" if "mask_token" in state else "")
    print(f"wrote {args.dst} ({args.layout} layout, {len(state)} tensors){note}")


if __name__ == "__main__":
  from eesmm_jax import cli
  cli.run_main(main)
