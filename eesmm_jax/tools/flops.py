"""Training FLOPs per image, SimMIM vs EESMM: XLA's count of the trainer's own train step.

    python -m eesmm_jax.tools.flops                        # Swin-B at 192/window 6 and 224/window 7
    python -m eesmm_jax.tools.flops --variant swin_tiny --images 24

`step_flops` is the project's one FLOP counter: the benchmark's GFLOPs per image and MFU and the
study's pretraining FLOPs are its count. It lowers the trainer's step (`plan.pretraining`,
`step.jit_train_step`: the objective's value_and_grad, micro-batches, AdamW with layer decay) on
abstract shapes for one CPU device with the portable forms (`impl` and `attention_impl` 'xla'),
and reads XLA's cost analysis of the lowered program, before optimisation. So the count is the
model's, the same on every machine, mesh and kernel form: a GPU's compiled program misses the
matmuls that became cuBLAS calls, a mesh's counts replicated work per device, and the XLA:CPU
forms compute sums as matmuls. Nothing is allocated or run.

FLOPs per image = the step's FLOPs / images per step, where one step consumes the same
`--images` images for every method (SimMIM: that many encoder inputs; EESMM: images / n blends).
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import jax
import ml_collections

from eesmm_jax import plan as plan_lib
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.config import pretrain_config
from eesmm_jax.models import swin

SHAPES = ((192, 6), (224, 7))

# The Swins the tools count and time: swin.VARIANTS, and two 4-stage ones small enough for two
# CPU cores at 192/224 px (stride 32, so SimMIM's 32-px mask blocks and head are unchanged). At
# width 32 the full-resolution pixel work (masks, blend, loss, pixel shuffle) is a third of the
# step, which no method shortens; at 64 the encoder dominates as it does in Swin-B.
BACKBONES = {
    **swin.VARIANTS,
    "swin_micro": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "swin_mini": dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
    # The GPU probe's CPU test: every stage once, as narrow as a Swin goes.
    "swin_nano": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}


def step_config(backbone: str, img_size: int, window: int, num_mix: int, batch: int,
                dtype: str = "float32", data: str = "synthetic", data_dir: Optional[str] = None,
                remat: str = "none") -> ml_collections.ConfigDict:
  """A pretraining config at a backbone of `BACKBONES`, size and batch: SimMIM's AdamW recipe,
  what the benchmark times and this tool counts."""
  if backbone not in BACKBONES:
    raise ValueError(f"backbone {backbone!r} is unknown; choose one of {sorted(BACKBONES)}")
  config = pretrain_config()
  config.img_size = img_size
  config.dtype = dtype
  config.batch_size = batch
  config.model.name = backbone if backbone in swin.VARIANTS else "swin_tiny"
  for key, value in BACKBONES[backbone].items():
    config.model[key] = value
  config.model.window_size = window
  config.objective.num_mix = num_mix
  config.model.remat = remat
  config.data.dataset = data
  config.data.data_dir = data_dir
  # The schedule's length and shape: the lr's value does not change the step's cost.
  config.total_steps = 1000
  config.optim.warmup_epochs = 0.0
  return config


_COUNTED: dict[str, float] = {}  # config (as JSON) -> FLOPs: a cell counted once per process


def step_flops(config: ml_collections.ConfigDict) -> float:
  """XLA's FLOPs of one train step of `config` over its `batch_size` images (module docstring:
  how and why it is counted this way), counted once per config and process."""
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _COUNTED:
    _COUNTED[key] = _count_step_flops(config)
  return _COUNTED[key]


def _count_step_flops(config: ml_collections.ConfigDict) -> float:
  p = plan_lib.pretraining(config, sharding.make_mesh(jax.devices("cpu")[:1]),
                           impl="xla", attention_impl="xla")
  images = jax.ShapeDtypeStruct((config.batch_size, p.input_size, p.input_size, 3),
                                jax.numpy.uint8, sharding=p.data_sharding)
  lowered = step_lib.jit_train_step(p).lower(p.state_shapes, images)
  cost = lowered.cost_analysis()
  if not cost:  # a jaxlib without the lowered program's analysis: the compiled CPU program's
    cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.flops", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="swin_base", choices=sorted(BACKBONES))
  parser.add_argument("--images", type=int, default=12,
                      help="images per train step, a multiple of every n (default 12)")
  parser.add_argument("--num_mix", type=int, nargs="+", default=[1, 2, 3])
  args = parser.parse_args(argv)
  if args.images < 1 or any(n < 1 or args.images % n for n in args.num_mix):
    parser.error(f"--images {args.images} must be a positive multiple of every --num_mix "
                 f"{args.num_mix} (each >= 1)")

  print(f"{args.variant}, {args.images} images per step, the trainer's step (AdamW), float32\n")
  print("| image/window | method | encoder inputs per step | train GFLOPs per image "
        "| vs SimMIM | 1/n |")
  print("|---|---|---|---|---|---|")
  for img_size, window in SHAPES:
    base = None
    for n in args.num_mix:
      config = step_config(args.variant, img_size, window, n, args.images)
      per_image = step_flops(config) / args.images
      base = base or per_image
      method = "SimMIM" if n == 1 else f"EESMM n={n}"
      print(f"| {img_size}/{window} | {method} | {args.images // n} | {per_image / 1e9:.2f} "
            f"| {per_image / base:.3f} | {1 / n:.3f} |", flush=True)


if __name__ == "__main__":
  main()
