"""The optimizer of SimMIM pretraining and fine-tuning, built from optax parts.

Reference: microsoft/SimMIM `optimizer.py`, `lr_scheduler.py` and `main_simmim.py` (lr scaling),
which use timm's `CosineLRScheduler`. What is matched, and why each part is built as it is:

* AdamW (b1, b2, eps from the config: the EESMM paper uses eps 1e-6, SimMIM 1e-8) with weight
  decay 0.05 on every parameter except the reference's no-decay set: 1-D parameters (biases,
  LayerNorm scales), `absolute_pos_embed`, `mask_token` and `relative_position_bias_table`.
  `optax.adamw`'s `mask=` does this; the decay is decoupled and multiplied by the lr, as torch's.
* Layer-wise lr decay with SimMIM's Swin layer ids (`get_swin_layer`, see `swin_layer_id`). torch
  gives every (layer, decay) group its own `lr * scale`; AdamW's update is linear in the lr, so one
  `optax.adamw` followed by a per-group `optax.scale(scale)` gives the same parameters. We prefer
  that to one adamw per group because the optimizer state is then a single Adam state shaped like
  the params whatever the layer decay, so checkpoints keep their layout when the decay changes.
* Gradient clipping by global norm (5.0) before AdamW, as torch's `clip_grad_norm_` before
  `optimizer.step()`.
* Gradient accumulation with `optax.MultiSteps` (mean of the micro-batch gradients, equal to the
  reference's `loss / accumulation_steps` summed). One difference: with accumulation the reference
  clips the running sum after every micro-batch, we clip the accumulated mean once per update; the
  two agree whenever no clipping happens.
* Learning rates scaled by (global batch * accumulation steps) / 512 (`scaled_lrs`), schedules
  stepped per optimizer update (`make_schedule`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence, Union

import jax
import ml_collections
import optax

# Names whose parameters get no weight decay whatever their rank (SimMIM's `no_weight_decay` and
# `no_weight_decay_keywords` of the Swin encoder, plus 1-D and `.bias` handled in `decays`).
NO_DECAY_NAMES = ("absolute_pos_embed", "mask_token", "relative_position_bias_table")

SCHEDULES = ("cosine", "multistep")
OPTIMIZERS = ("adamw",)

PathLike = Union[str, Sequence[Any]]


def default_optim_config() -> ml_collections.ConfigDict:
  """SimMIM's 100-epoch Swin-B pretraining recipe (lr values before batch scaling)."""
  c = ml_collections.ConfigDict()
  c.optimizer = "adamw"
  c.base_lr = 2e-4          # scaled by global_batch * accum_steps / 512, as all three lrs
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-6              # EESMM paper; the SimMIM code uses 1e-8
  c.clip_grad = 5.0         # 0 turns clipping off
  c.layer_decay = 1.0       # 1.0 = off (SimMIM pretraining); 0.9 / 0.8 for fine-tuning
  c.warmup_epochs = 10.0    # floats, so fractions of an epoch can be given
  c.epochs = 100.0
  c.schedule = "cosine"     # 'cosine' | 'multistep'
  c.multistep_milestones = (700,)  # epochs; only read by 'multistep' (SimMIM 800-epoch recipe)
  c.multistep_gamma = 0.1
  c.accum_steps = 1
  return c


# ----------------------------------------------------------------------------- parameter naming


def path_names(path: PathLike) -> tuple[str, ...]:
  """('layers_2', 'blocks_5', 'attn', 'qkv', 'kernel') from a jax key path, names or 'a/b/c'."""
  if not isinstance(path, str):
    path = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
  return tuple(p for p in path.split("/") if p)


def _strip_prefix(names: tuple[str, ...]) -> tuple[str, ...]:
  """Drop the 'params' collection and the 'encoder' wrapper of the pretraining tree."""
  while names and names[0] in ("params", "encoder"):
    names = names[1:]
  return names


def swin_layer_id(path: PathLike, depths: Sequence[int]) -> int:
  """SimMIM's `get_swin_layer` on a Flax parameter path.

  mask_token, patch_embed -> 0; layers_i/blocks_j -> sum(depths[:i]) + j + 1;
  layers_i/downsample -> sum(depths[:i+1]) (the merge at the end of stage i shares the id of the
  stage's last block); anything else (final norm, head, absolute_pos_embed, the decoder) ->
  sum(depths) + 1. Paths may start with 'encoder' (pretraining tree) or not (bare Swin).
  """
  depths = tuple(int(d) for d in depths)
  top = sum(depths) + 1
  names = _strip_prefix(path_names(path))
  if not names or names[0] == "decoder":
    return top
  if names[0] in ("mask_token", "patch_embed"):
    return 0
  m = re.fullmatch(r"layers_(\d+)", names[0])
  if m is None:
    return top
  i = int(m.group(1))
  where = "/".join(path_names(path))
  if i >= len(depths):
    raise ValueError(f"parameter {where} names stage {i} but depths={depths} has {len(depths)} "
                     "stages: the params are not this Swin's")
  sub = names[1] if len(names) > 1 else ""
  if sub == "downsample":
    return sum(depths[:i + 1])
  b = re.fullmatch(r"blocks_(\d+)", sub)
  if b is None:
    raise ValueError(f"parameter {where}: expected layers_{i}/blocks_<j> or layers_{i}/downsample")
  j = int(b.group(1))
  if j >= depths[i]:
    raise ValueError(f"parameter {where} names block {j} of stage {i} but depths={depths} gives "
                     f"that stage {depths[i]} blocks: set the optimizer config's depths")
  return sum(depths[:i]) + j + 1


def layer_scale(layer_id: int, depths: Sequence[int], decay: float) -> float:
  """decay ** (num_layers + 1 - id), num_layers = sum(depths): 1 for the head, decay**25 for the
  Swin-B patch embedding at decay 0.9."""
  return float(decay) ** (sum(depths) + 1 - layer_id)


def layer_decay_scales(params: Any, depths: Sequence[int], decay: float) -> Any:
  """A tree like `params` holding each parameter's lr multiplier (floats)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: layer_scale(swin_layer_id(p, depths), depths, decay), params)


def decays(path: PathLike, leaf: Any) -> bool:
  """Whether weight decay applies: not for 1-D tensors, biases, nor `NO_DECAY_NAMES`."""
  names = path_names(path)
  if len(getattr(leaf, "shape", ())) <= 1 or (names and names[-1] == "bias"):
    return False
  return not any(n in NO_DECAY_NAMES for n in names)


def weight_decay_mask(params: Any) -> Any:
  """A bool tree like `params`: True where AdamW decays the parameter."""
  return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------- learning rates


def scaled_lrs(config: ml_collections.ConfigDict, global_batch: int) -> dict[str, float]:
  """base, warm-up and min lr times global_batch * accum_steps / 512 (SimMIM's linear scaling).

  `global_batch` is the batch of one forward pass summed over all processes (the reference's
  BATCH_SIZE * world_size); with accumulation one update sees accum_steps times as many images.
  """
  if int(global_batch) <= 0:
    raise ValueError(f"global_batch must be a positive integer, got {global_batch!r}")
  factor = global_batch * int(config.accum_steps) / 512.0
  return dict(base_lr=config.base_lr * factor, warmup_lr=config.warmup_lr * factor,
              min_lr=config.min_lr * factor)


def make_schedule(config: ml_collections.ConfigDict, global_batch: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """The base lr as a function of the optimizer-update count t (timm semantics, per iteration).

  With lrs from `scaled_lrs`, W = int(warmup_epochs * U), T = int(epochs * U) and
  U = steps_per_epoch / accum_steps updates per epoch:

    t < W:                 warmup_lr + t * (base_lr - warmup_lr) / W
    cosine, W <= t < T:    min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / T))
    cosine, t >= T:        min_lr
    multistep, t >= W:     base_lr * gamma ** #{milestones m : m * U <= t}

  The cosine runs over the whole run, t counted from 0, not from the end of the warm-up: timm's
  CosineLRScheduler with its default warmup_prefix=False, so the lr steps down slightly at t = W.
  Update t uses lr(t), as in timm's train loop (SimMIM's loop calls step_update after the step, so
  its update t uses lr(t - 1); the difference is one warm-up increment).
  """
  _check_config(config)
  if int(steps_per_epoch) <= 0:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
  lrs = scaled_lrs(config, global_batch)
  per_epoch = steps_per_epoch / int(config.accum_steps)
  # int() as the reference; the epsilon keeps float epochs (total_steps / steps_per_epoch) exact.
  steps = lambda epochs: int(epochs * per_epoch + 1e-6)
  total, warmup = steps(config.epochs), steps(config.warmup_epochs)
  if total <= 0:
    raise ValueError(f"epochs={config.epochs} at {per_epoch:g} updates per epoch gives no update")
  base, init, floor = lrs["base_lr"], lrs["warmup_lr"], lrs["min_lr"]

  if config.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(base, decay_steps=total, alpha=floor / base)
    # join_schedules restarts the count at the boundary; timm's cosine keeps the absolute step.
    after = lambda t: cosine(t + warmup)
  else:
    scales: dict[int, float] = {}
    for m in config.multistep_milestones:
      b = steps(m) - warmup
      scales[b] = scales.get(b, 1.0) * config.multistep_gamma
    after = optax.piecewise_constant_schedule(base, scales)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(init, base, warmup), after], [warmup])


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(config: ml_collections.ConfigDict, params_or_shapes: Any, global_batch: int,
                   steps_per_epoch: int, depths: Sequence[int]
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule_fn) for SimMIM pretraining or fine-tuning.

  params_or_shapes: the params (or `jax.eval_shape` of them), bare Swin or {'encoder', 'decoder'};
    read to check the layer ids against `config.depths` before any step runs.
  global_batch: images in one forward pass over all processes (before accumulation).
  steps_per_epoch: forward passes (micro-batches of global_batch) per epoch.
  depths: the Swin's stage depths (the model's, never a config's copy), for the layer ids.
  schedule_fn maps the optimizer-update count (micro-step // accum_steps) to the base lr; the
  parameters of layer id l are updated with schedule_fn(t) * `layer_scale(l)`.
  `update` needs `params` (weight decay, layer labels).
  """
  schedule = make_schedule(config, global_batch, steps_per_epoch)
  depths = tuple(int(d) for d in depths)
  # Raises on a depths / params mismatch here rather than at the first traced update.
  layer_decay_scales(params_or_shapes, depths, config.layer_decay)

  parts = []
  if config.clip_grad:
    parts.append(optax.clip_by_global_norm(config.clip_grad))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=weight_decay_mask))
  if config.layer_decay != 1.0:
    ids = range(sum(depths) + 2)
    parts.append(optax.multi_transform(
        {f"layer_{i}": optax.scale(layer_scale(i, depths, config.layer_decay)) for i in ids},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda p, _: f"layer_{swin_layer_id(p, depths)}", params)))
  tx = optax.chain(*parts)
  if config.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(config.accum_steps)).gradient_transformation()
  return tx, schedule


def _check_config(c: ml_collections.ConfigDict) -> None:
  """Raise a ValueError naming the key, its value and what is accepted."""
  def bad(key, accepted):
    raise ValueError(f"optimizer config {key}={c[key]!r} is invalid: {accepted}")

  if c.optimizer not in OPTIMIZERS:
    bad("optimizer", f"one of {OPTIMIZERS}")
  if c.schedule not in SCHEDULES:
    bad("schedule", f"one of {SCHEDULES}")
  if not c.base_lr > 0:
    bad("base_lr", "must be > 0")
  for key in ("warmup_lr", "min_lr", "weight_decay", "clip_grad"):
    if not c[key] >= 0:
      bad(key, "must be >= 0")
  for key in ("b1", "b2"):
    if not 0 <= c[key] < 1:
      bad(key, "must be in [0, 1)")
  if not c.eps > 0:
    bad("eps", "must be > 0")
  if not 0 < c.layer_decay <= 1:
    bad("layer_decay", "must be in (0, 1]; 1.0 turns layer-wise decay off")
  if not c.epochs > 0:
    bad("epochs", "must be > 0")
  if not 0 <= c.warmup_epochs <= c.epochs:
    bad("warmup_epochs", f"must be in [0, epochs={c.epochs}] (the warm-up cannot outlast the run)")
  if int(c.accum_steps) != c.accum_steps or c.accum_steps < 1:
    bad("accum_steps", "must be an integer >= 1")
  if c.schedule == "multistep":
    ms = list(c.multistep_milestones)
    if not ms or ms != sorted(ms) or ms[0] < c.warmup_epochs or ms[-1] > c.epochs:
      bad("multistep_milestones", f"must be a non-empty ascending list of epochs in "
          f"[warmup_epochs={c.warmup_epochs}, epochs={c.epochs}]")
    if not 0 < c.multistep_gamma <= 1:
      bad("multistep_gamma", "must be in (0, 1]")
