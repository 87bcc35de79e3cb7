"""Training FLOPs per image, SimMIM vs EESMM, from XLA's cost analysis of a jitted train step.

    python -m eesmm_jax.tools.flops                        # Swin-B at 192/window 6 and 224/window 7
    python -m eesmm_jax.tools.flops --variant swin_tiny --images 24

`step_flops` counts any encoder and objective config (the study, `eesmm_jax.tools.study`, counts its
small Swin with it).

The step is value_and_grad of the objective plus an AdamW update, lowered on abstract shapes
(`jax.eval_shape`), so nothing is allocated or run: only compiled (a minute or two per step for
Swin-B on a small CPU). FLOPs per image = the step's FLOPs / images per step, where one step
consumes the same `--images` images for every method (SimMIM: that many encoder inputs; EESMM:
images / n blends).
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from eesmm_jax import objectives
from eesmm_jax.models import swin

SHAPES = ((192, 6), (224, 7))


def train_step_flops(variant: str, img_size: int, window_size: int, num_mix: int,
                     images: int) -> float:
  """FLOPs of one compiled train step over `images` images of a named Swin variant with EESMM's
  default objective at `num_mix` (XLA's count, forward + backward + optimizer)."""
  encoder = swin.create_model(variant, img_size=img_size, window_size=window_size,
                              num_classes=0, use_mask_token=True, drop_path_rate=0.0)
  objective = objectives.default_objective_config()
  objective.num_mix = num_mix
  return step_flops(encoder, objective, images)


def step_flops(encoder, objective: ml_collections.ConfigDict, images: int,
               device: Optional[jax.Device] = None) -> float:
  """FLOPs of one compiled train step over `images` images: value_and_grad of `objective` on
  `encoder` (any Swin built with use_mask_token=True, num_classes=0) plus an AdamW update.

  `device`: compile for that device (default JAX's). A GPU's compiled count misses the matmuls
  that became cuBLAS calls (tools/benchmark.py's `flops_per_image`), so counts that must agree
  across machines are taken on a CPU device (`jax.devices('cpu')[0]`)."""
  model = objectives.build_model(objective, encoder)
  loss_fn = objectives.build_objective(objective, model)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  image = (encoder.img_size, encoder.img_size, encoder.in_chans)
  side = encoder.img_size // encoder.patch_size
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1,) + image, jnp.float32),
                          jax.ShapeDtypeStruct((1, side, side), jnp.int32))["params"]
  opt_state = jax.eval_shape(tx.init, params)
  place = (lambda tree: tree) if device is None else (lambda tree: jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)), tree))

  def train_step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = jax.ShapeDtypeStruct((images,) + image, jnp.float32)
  rng = jax.eval_shape(jax.random.key, 0)
  args = place((params, opt_state, batch, rng))
  cost = jax.jit(train_step).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.flops", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="swin_base", choices=sorted(swin.VARIANTS))
  parser.add_argument("--images", type=int, default=12,
                      help="images per train step, a multiple of every n (default 12)")
  parser.add_argument("--num_mix", type=int, nargs="+", default=[1, 2, 3])
  args = parser.parse_args(argv)
  if any(args.images % n for n in args.num_mix):
    parser.error(f"--images {args.images} must be a multiple of every --num_mix {args.num_mix}")

  print(f"{args.variant}, {args.images} images per step, AdamW, float32, "
        f"device {jax.devices()[0].platform}\n")
  print("| image/window | method | encoder inputs per step | train GFLOPs per image "
        "| vs SimMIM | 1/n |")
  print("|---|---|---|---|---|---|")
  for img_size, window in SHAPES:
    base = None
    for n in args.num_mix:
      t = time.time()
      per_image = train_step_flops(args.variant, img_size, window, n, args.images) / args.images
      base = base or per_image
      method = "SimMIM" if n == 1 else f"EESMM n={n}"
      print(f"| {img_size}/{window} | {method} | {args.images // n} | {per_image / 1e9:.2f} "
            f"| {per_image / base:.3f} | {1 / n:.3f} |", flush=True)
      print(f"<!-- compiled in {time.time() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
  main()
