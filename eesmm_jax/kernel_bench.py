"""Where the step's kernels, compile time and memory go (issue 13), beside PyTorch.

  python -m eesmm_jax.kernel_bench kernels   # LayerNorm and SimMIM's head, JAX forms vs torch
  python -m eesmm_jax.kernel_bench compile   # the train step's compile time, by part
  python -m eesmm_jax.kernel_bench memory eesmm_swin_base_192 simmim_swin_base:224 ...

`kernels`: forward and forward + backward medians (20 calls after one) at cpu-small's SimMIM 192/6
shapes (swin_mini: stage-1 tokens [12, 48 * 48, 64]; the head's input [12, 6, 6, 512] to 3 * 32 *
32 channels), each JAX form's largest difference from the first, and PyTorch's own modules on the
same arrays (2 threads). `compile`: XLA's compile time of the swin_micro SimMIM step at 64/2,
batch 4, on one device: the loss alone, its gradient, the step with SGD, the step as the trainer
builds it (AdamW, clipping, non-finite steps kept out), and that step with AdamW over one
flattened vector (`optax.flatten`; its weight-decay mask then sees one vector, not the parameter
tree, so it is a different optimizer: a compile-time comparison only). `memory`: a config's
per-device need at its batch on `--devices` devices, from XLA's memory analysis of its step
compiled at 6 and 12 images on one device and extrapolated linearly in the images (shapes only:
nothing is allocated), and the fewest `micro_batches` that fit `--device_gb`. Numbers and their
reading: docs/timing.md and the configs' docstrings.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _median_ms(call) -> float:
  """Median ms of 20 calls after one; `call` must block (jax.block_until_ready, torch eager)."""
  from eesmm_jax.benchmark import timed_steps
  return statistics.median(timed_steps(call, steps=20, warmup=1)) * 1e3


def _layer_norms():
  def flax_ln(x, s, b):
    return nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": s, "bias": b}}, x)

  def two_pass(x, s, b):  # centred variance, written out
    xc = x - x.mean(-1, keepdims=True)
    return xc * jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + 1e-5) * s + b

  def matmul_means(x, s, b):  # the channel means as matmuls with a 1/C column
    col = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    xc = x - jnp.dot(x, col, precision="highest")
    var = jnp.dot(xc * xc, col, precision="highest")
    return xc * jax.lax.rsqrt(var + 1e-5) * s + b

  return {"flax nn.LayerNorm": flax_ln, "two-pass jnp": two_pass, "matmul means": matmul_means}


def _heads():
  from eesmm_jax.models.decoders import pixel_shuffle

  def conv(z, k, b):
    y = jax.lax.conv_general_dilated(z, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return pixel_shuffle(y + b, 32, 1)

  def matmul(z, k, b):  # decoders.Conv1x1
    return pixel_shuffle(jnp.einsum("...c,co->...o", z, k[0, 0]) + b, 32, 1)

  return {"1x1 conv + shuffle": conv, "matmul + shuffle": matmul}


def kernels() -> None:
  import torch
  torch.set_num_threads(2)
  block = jax.block_until_ready
  rng = np.random.default_rng(0)
  x = rng.standard_normal((12, 48 * 48, 64), np.float32)
  z = rng.standard_normal((12, 6, 6, 512), np.float32)
  k = (rng.standard_normal((1, 1, 512, 3072)) * 0.02).astype(np.float32)
  cases = [("LayerNorm", _layer_norms(), (x, np.ones(64, np.float32), np.zeros(64, np.float32))),
           ("head", _heads(), (z, k, np.zeros(3072, np.float32)))]
  for title, forms, args in cases:
    args = [jnp.asarray(a) for a in args]
    first = None
    for name, f in forms.items():
      forward = jax.jit(f)
      grad = jax.jit(jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))
      out = forward(*args)
      first = out if first is None else first
      print(f"{title:9s} {name:20s} forward {_median_ms(lambda: block(forward(*args))):7.2f} ms  "
            f"forward+backward {_median_ms(lambda: block(grad(*args))):7.2f} ms  "
            f"max diff {float(jnp.abs(out - first).max()):.1e}", flush=True)

  xt = torch.tensor(x, requires_grad=True)
  ln = torch.nn.LayerNorm(64)
  zt = torch.tensor(z.transpose(0, 3, 1, 2).copy(), requires_grad=True)
  head = torch.nn.Sequential(torch.nn.Conv2d(512, 3072, 1), torch.nn.PixelShuffle(32))
  for title, module, t in (("LayerNorm", ln, xt), ("head", head, zt)):
    print(f"{title:9s} {'torch':20s} forward {_median_ms(lambda: module(t)):7.2f} ms  "
          f"forward+backward {_median_ms(lambda: (module(t) ** 2).sum().backward()):7.2f} ms")


def compile_times() -> None:
  import optax
  from eesmm_jax import core, plan as plan_lib
  from eesmm_jax.benchmark import BACKBONES
  from eesmm_jax.config import pretrain_config

  c = pretrain_config()
  c.img_size, c.batch_size, c.total_steps, c.data.dataset = 64, 4, 100, "synthetic"
  c.optim.warmup_epochs = 0.0
  c.model.update(name="swin_tiny", window_size=2, **BACKBONES["swin_micro"])
  p = plan_lib.pretraining(c, core.make_mesh(jax.devices()[:1]))
  images = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.uint8, sharding=p.data_sharding)
  loss = lambda params, x: p.loss_fn(params, x, jax.random.key(0), True)[0]

  def step_with(tx=None):
    q = p
    if tx is not None:
      q = dataclasses.replace(p, tx=tx)
      shapes = jax.eval_shape(q.new_state, jax.random.key_data(jax.random.key(0)))
      q = dataclasses.replace(q, state_shapes=shapes,
                              state_sharding=core.state_shardings(shapes, q.mesh, False))
    return core.jit_train_step(q).lower(q.state_shapes, images)

  parts = {
      "loss (forward)": lambda: jax.jit(loss).lower(p.state_shapes.params, images),
      "gradient": lambda: jax.jit(jax.grad(loss)).lower(p.state_shapes.params, images),
      "step, SGD": lambda: step_with(optax.sgd(1e-3)),
      "step, the trainer's": step_with,
      "step, AdamW flattened": lambda: step_with(optax.flatten(p.tx)),
  }
  for name, lower in parts.items():
    lowered = lower()
    start = time.perf_counter()
    compiled = lowered.compile()
    print(f"{name:22s} compile {time.perf_counter() - start:5.1f} s  "
          f"{compiled.as_text().count(' fusion(')} fusions", flush=True)


def memory(configs: list[str], devices: int, device_gb: float) -> None:
  import importlib
  from eesmm_jax import core, plan as plan_lib
  gib = 2 ** 30

  def config(spec: str):
    name, *arg = spec.split(":")
    return importlib.import_module(f"eesmm_jax.configs.{name}").get_config(*arg)

  def need(spec: str, images: int) -> tuple[int, int]:
    c = config(spec)
    c.batch_size, c.data.dataset = images, "synthetic"
    p = plan_lib.pretraining(c, core.make_mesh(jax.devices()[:1]))
    batch = jax.ShapeDtypeStruct((images, c.img_size, c.img_size, 3), jnp.uint8,
                                 sharding=p.data_sharding)
    m = core.jit_train_step(p).lower(p.state_shapes, batch).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes

  for spec in configs:
    c = config(spec)
    per_device, n = c.batch_size // devices, c.objective.num_mix
    (args6, temps6), (args12, temps12) = need(spec, 6), need(spec, 12)
    # Per image: its pixels (an argument) and its activations (temporaries); the rest is fixed.
    pixels, per_image = (args12 - args6) / 6, (temps12 - temps6) / 6
    fixed = args6 + temps6 - 6 * (pixels + per_image)  # params, optimizer state, workspace
    total = lambda k: fixed + per_device * pixels + per_image * per_device / k
    fits = [k for k in range(1, 65) if (per_device // n) % k == 0 and total(k) <= device_gb * gib]
    print(f"{spec}: {per_device} images per device need {total(1) / gib:.1f} GiB "
          f"({fixed / gib:.2f} GiB params, optimizer state and workspace, "
          f"{per_image / 2 ** 20:.0f} MiB of activations per image); "
          + (f"micro_batches={fits[0]} fits {device_gb:g} GB ({total(fits[0]) / gib:.1f} GiB)"
             if fits else f"no micro_batches fits {device_gb:g} GB"), flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("kernels", "compile", "memory"))
  parser.add_argument("configs", nargs="*", help="memory: config modules, name[:arg]")
  parser.add_argument("--devices", type=int, default=4, help="memory: devices the batch spans")
  parser.add_argument("--device_gb", type=float, default=32.0, help="memory: device memory")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # compile times are the point
  if args.what == "kernels":
    kernels()
  elif args.what == "compile":
    compile_times()
  else:
    memory(args.configs, args.devices, args.device_gb)


if __name__ == "__main__":
  main()
