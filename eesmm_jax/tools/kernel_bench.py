"""Where the step's kernels, compile time and memory go, beside PyTorch.

  python -m eesmm_jax.tools.kernel_bench kernels   # Linear, LayerNorm, head, patches, attention
  python -m eesmm_jax.tools.kernel_bench profile [--size 224/7]   # the step's time by kind of op
  python -m eesmm_jax.tools.kernel_bench compile   # the train step's compile time, by part
  python -m eesmm_jax.tools.kernel_bench memory eesmm_swin_base_192 simmim_swin_base:224 ...

`kernels`: forward and forward + backward medians (20 calls after one) at cpu-small's SimMIM 192/6
shapes (swin_mini: stage-1 tokens [12, 48, 48, 64] through fc1's 64 -> 256 and LayerNorm; the
head's input [12, 6, 6, 512] to 3 * 32 * 32 channels; the patch embedding of [12, 192, 192, 3]
to 64 channels; stage-1 window attention, 768 windows of 36 tokens and 2 heads, and of 49 tokens
as at 224/7), each JAX form's largest difference from the first, and PyTorch's own modules on the
same arrays (2 threads). `profile`: the cpu-small SimMIM step at `--size` (default 192/6; the
benchmark's own, both frameworks) traced for 3 steps after 2, each executed XLA thunk and each
aten op (self time) put in one of `KINDS`. `compile`: XLA's compile time of the swin_micro
SimMIM step at 64/2, batch 4, on one device: the loss alone, its gradient, the step with SGD, the
step as the trainer builds it (AdamW, clipping, non-finite steps kept out), and that step with
AdamW over one flattened vector (`optax.flatten`; its weight-decay mask then sees one vector, not
the parameter tree, so it is a different optimizer: a compile-time comparison only).
`memory`: a config's per-device need at its batch on `--devices` devices, from XLA's memory
analysis of its step compiled at 6 and 12 images on one device and extrapolated linearly in the
images (shapes only: nothing is allocated), and the fewest `micro_batches` that fit
`--device_gb`. Numbers and their reading: docs/performance.md and the configs' docstrings.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import time

import flax.linen as nn
if __name__ == "__main__":  # before JAX and TensorFlow allocate (tools/allocator.py says why)
  from eesmm_jax.tools import allocator
  allocator.setup()

import jax
import jax.numpy as jnp
import numpy as np

from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.models import swin
from eesmm_jax.ops import xla_cpu


def _median_ms(call) -> float:
  """Median ms of 20 calls after one; `call` must block (jax.block_until_ready, torch eager)."""
  from eesmm_jax.tools.benchmark.cells import timed_steps
  return statistics.median(timed_steps(call, steps=20, warmup=1)) * 1e3


def _layer_norms():
  def flax_ln(x, s, b):
    return nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": s, "bias": b}}, x)

  def two_pass(x, s, b):  # centred variance, written out
    xc = x - x.mean(-1, keepdims=True)
    return xc * jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + 1e-5) * s + b

  def own_backward(x, s, b):  # xla_cpu.CpuLayerNorm: every sum a matmul
    return xla_cpu.layer_norm_cpu(x, s, b, 1e-5)

  return {"flax nn.LayerNorm": flax_ln, "two-pass jnp": two_pass,
          "own backward (ours)": own_backward}


def _heads():
  from eesmm_jax.models.decoders import pixel_shuffle

  def conv(z, k, b):
    y = jax.lax.conv_general_dilated(z, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return pixel_shuffle(y + b, 32, 1)

  def matmul(z, k, b):  # swin.PatchConv at p = 1
    return pixel_shuffle(_patch_matmul(z, k) + b, 32, 1)

  return {"1x1 conv + shuffle": conv, "matmul + shuffle": matmul}


def _patch_matmul(x, k):
  """swin.PatchConv's computation: patches flattened, one matmul."""
  return swin.PatchConv(k.shape[-1], k.shape[0]).apply(
      {"params": {"kernel": k, "bias": jnp.zeros(k.shape[-1])}}, x)


def _patch_embeds():
  def conv(x, k):  # flax nn.Conv's computation
    return jax.lax.conv_general_dilated(x, k, k.shape[:2], "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  return {"4x4 conv, stride 4": conv, "patches @ W (ours)": _patch_matmul}


def _linears():
  def dense(x, w, b):  # flax nn.Dense's own dot, contracting every leading axis in backward
    return jnp.dot(x, w) + b

  def flat(x, w, b):  # tokens merged into one axis first
    return xla_cpu.token_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) + b

  def bias_matmul(x, w, b):  # xla_cpu.CpuDense: also the bias gradient as ones @ g
    return xla_cpu.add_bias(xla_cpu.token_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))), b)

  return {"x @ W + b": dense, "tokens flat": flat, "bias grad matmul (ours)": bias_matmul}


def _attentions():
  """Window attention at stage 1 of the step (768 windows of 36 or 49 tokens, 2 heads of 32),
  from the qkv projection's output [windows, N, 3, heads, head_dim] and the bias [nW, heads, N,
  N]: the einsum layouts (autodiff), and `xla_cpu.window_attention_cpu` (its own backward)."""
  def core(q, k, v, bias, spec, out_spec):  # spec: the layout of q, k and v
    (nw, h, n, _), b, kv_spec = bias.shape, q.shape[0], spec.replace("n", "m")
    attn = jnp.einsum(f"{spec},{kv_spec}->bhnm", q * q.shape[-1] ** -0.5, k)
    attn = jax.nn.softmax(attn.reshape(b // nw, nw, h, n, n) + bias, axis=-1)
    return jnp.einsum(f"bhnm,{kv_spec}->{out_spec}", attn.reshape(b, h, n, n), v)

  def heads_minor(qkv, bias):  # attention_impl='xla': [b, N, heads, d], no transpose
    x = core(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, "bnhd", "bnhd")
    return x.reshape(x.shape[0], x.shape[1], -1)

  def heads_major(qkv, bias):  # q, k, v each transposed to [b, heads, N, d]
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    x = core(q, k, v, bias, "bhnd", "bnhd")
    return x.reshape(x.shape[0], x.shape[1], -1)

  def one_transpose(qkv, bias):  # the reference's permute(2, 0, 3, 1, 4), then [b, h, N, d]
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    x = core(q, k, v, bias, "bhnd", "bhnd").transpose(0, 2, 1, 3)
    return x.reshape(x.shape[0], x.shape[1], -1)

  def own_backward(qkv, bias):  # attention_impl='xla_cpu'
    return xla_cpu.window_attention_cpu(qkv, bias, qkv.shape[-1] ** -0.5)

  return {"heads minor (einsums)": heads_minor, "q, k, v transposed": heads_major,
          "one qkv transpose": one_transpose, "own backward (ours)": own_backward}


def _torch_attention(qkv, bias):
  """timm's WindowAttention core on the same arrays (its permute, bmm, softmax, transpose)."""
  b, n, _, h, d = qkv.shape
  q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
  attn = (q * d ** -0.5) @ k.transpose(-2, -1)
  attn = (attn.view(b // bias.shape[0], bias.shape[0], h, n, n) + bias).view(b, h, n, n)
  return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d)


def kernels() -> None:
  import torch
  torch.set_num_threads(2)
  block = jax.block_until_ready
  rng = np.random.default_rng(0)
  x = rng.standard_normal((12, 48, 48, 64), np.float32)
  images = rng.standard_normal((12, 192, 192, 3), np.float32)
  patch_kernel = (rng.standard_normal((4, 4, 3, 64)) * 0.1).astype(np.float32)
  z = rng.standard_normal((12, 6, 6, 512), np.float32)
  k = (rng.standard_normal((1, 1, 512, 3072)) * 0.02).astype(np.float32)
  qkv = rng.standard_normal((768, 36, 3, 2, 32), np.float32)
  bias = rng.standard_normal((64, 2, 36, 36), np.float32)
  qkv49 = rng.standard_normal((768, 49, 3, 2, 32), np.float32)  # 224/7's windows
  bias49 = rng.standard_normal((64, 2, 49, 49), np.float32)
  w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
  cases = [("Linear", _linears(), (x, w, np.zeros(256, np.float32))),
           ("LayerNorm", _layer_norms(), (x, np.ones(64, np.float32), np.zeros(64, np.float32))),
           ("head", _heads(), (z, k, np.zeros(3072, np.float32))),
           ("patches", _patch_embeds(), (images, patch_kernel)),
           ("attention", _attentions(), (qkv, bias)),
           ("attn 49", _attentions(), (qkv49, bias49))]
  for title, forms, args in cases:
    args = [jnp.asarray(a) for a in args]
    first = None
    for name, f in forms.items():
      forward = jax.jit(f)
      grad = jax.jit(jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(),
                              argnums=tuple(range(len(args)))))
      out = forward(*args)
      first = out if first is None else first
      print(f"{title:9s} {name:20s} forward {_median_ms(lambda: block(forward(*args))):7.2f} ms  "
            f"forward+backward {_median_ms(lambda: block(grad(*args))):7.2f} ms  "
            f"max diff {float(jnp.abs(out - first).max()):.1e}", flush=True)

  xt = torch.tensor(x.reshape(12, 48 * 48, 64), requires_grad=True)
  images_t = torch.tensor(images.transpose(0, 3, 1, 2).copy(), requires_grad=True)
  patch_embed = torch.nn.Conv2d(3, 64, 4, 4)
  linear = torch.nn.Linear(64, 256)
  ln = torch.nn.LayerNorm(64)
  zt = torch.tensor(z.transpose(0, 3, 1, 2).copy(), requires_grad=True)
  head = torch.nn.Sequential(torch.nn.Conv2d(512, 3072, 1), torch.nn.PixelShuffle(32))
  qkv_t = torch.tensor(qkv, requires_grad=True)
  bias_t = torch.tensor(bias, requires_grad=True)
  qkv49_t, bias49_t = (torch.tensor(a, requires_grad=True) for a in (qkv49, bias49))
  for title, module, t in (("Linear", linear, xt), ("LayerNorm", ln, xt), ("head", head, zt),
                           ("patches", patch_embed, images_t),
                           ("attention", lambda t: _torch_attention(t, bias_t), qkv_t),
                           ("attn 49", lambda t: _torch_attention(t, bias49_t), qkv49_t)):
    print(f"{title:9s} {'torch':20s} forward {_median_ms(lambda: module(t)):7.2f} ms  "
          f"forward+backward {_median_ms(lambda: (module(t) ** 2).sum().backward()):7.2f} ms")


# The kinds a step's time is split into, for both frameworks.
KINDS = ("matmuls", "reductions", "copies and transposes", "elementwise", "optimizer")
_MOVES = {"parameter", "bitcast", "copy", "transpose", "slice", "concatenate", "pad", "broadcast",
          "reshape", "constant", "iota", "dynamic-slice", "dynamic-update-slice", "gather",
          "tuple", "get-tuple-element"}


def _xla_kinds(hlo: str) -> dict[str, str]:
  """Each instruction of a compiled module's text -> its kind: what its fused computation does
  (a dot or convolution: matmuls; else a reduce: reductions; only data movement: copies; else
  elementwise), or 'optimizer' where the op is not part of the model's forward or backward (its
  op_name has no jvp: the AdamW update, clipping, the non-finite check)."""
  bodies, name, ops = {}, None, set()
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      name, ops = head.group(1), set()
      bodies[name] = ops
    elif name:
      op = re.search(r"= \S+ ([\w\-]+)\(", line)
      if op:
        ops.add(op.group(1))
  kinds = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if not m:
      continue
    called = re.search(r"calls=%([\w.\-]+)", line)
    ops = bodies.get(called.group(1), set()) if called else {m.group(2)}
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name and "jvp(" not in op_name.group(1):
      kinds[m.group(1)] = "optimizer"
    elif ops & {"dot", "convolution"}:
      kinds[m.group(1)] = "matmuls"
    elif ops & {"reduce", "reduce-window"}:
      kinds[m.group(1)] = "reductions"
    elif ops <= _MOVES:
      kinds[m.group(1)] = "copies and transposes"
    else:
      kinds[m.group(1)] = "elementwise"
  return kinds


def _torch_kind(op: str) -> str:
  """An aten op (torch.profiler's name) -> its kind, by the same split as `_xla_kinds`."""
  name = op.split("::")[-1]
  if name.startswith("_foreach") or name in ("_fused_adamw_", "addcdiv_", "addcmul_", "lerp_"):
    return "optimizer"
  if re.search(r"mm|matmul|linear|conv|bmm|baddbmm", name):
    return "matmuls"
  if re.search(r"norm|softmax|sum|mean|max|min|argsort|sort", name):
    return "reductions"
  if re.search(r"copy|clone|cat|roll|pad|permute|transpose|index|gather|scatter|repeat|shuffle|"
               r"contiguous|view|reshape|unsqueeze|select|slice|expand|fill|zero|empty|as_strided"
               r"|unbind|split|stack|flatten", name):
    return "copies and transposes"
  return "elementwise"


def profile(steps: int = 3, cell: tuple = ("swin_mini", 192, 6)) -> None:
  """Per-kind time of one cpu-small SimMIM step (`cell`: backbone, img, window): XLA's thunks
  (jax.profiler) against PyTorch eager's aten ops (torch.profiler, self time), after warm-up."""
  import collections
  import glob
  import gzip
  import json
  import tempfile

  import torch
  from eesmm_jax.tools.benchmark import cells as bench
  from eesmm_jax.tools.benchmark import torch_ref

  torch.set_num_threads(2)
  *_, state, images, _, compiled, _ = bench.jax_step(*cell, num_mix=1, batch=12, dtype="float32")
  kinds = _xla_kinds(compiled.as_text())
  holder = {"state": state}

  def run_jax():
    holder["state"], metrics = compiled(holder["state"], images)
    jax.block_until_ready((holder["state"], metrics))

  for _ in range(2):
    run_jax()
  jax_ms = collections.Counter()
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        run_jax()
      jax_wall = (time.perf_counter() - start) / steps * 1e3
    with gzip.open(glob.glob(f"{out}/**/perfetto_trace.json.gz", recursive=True)[0]) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  for e in events:  # one complete event per executed thunk, named as its HLO instruction
    if e.get("ph") == "X" and e["name"] in kinds:
      jax_ms[kinds[e["name"]]] += e["dur"] / 1e3 / steps
  del holder, state, compiled

  run_torch = torch_ref.torch_step(*cell, batch=12, dtype="float32", mode="eager")
  for _ in range(2):
    run_torch()
  torch_ms = collections.Counter()
  # kineto writes its start/stop lines to fd 2 whatever KINETO_LOG_LEVEL says: muted for the
  # profiled steps only (an error there still raises, and prints once fd 2 is back).
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      start = time.perf_counter()
      for _ in range(steps):
        run_torch()
      torch_wall = (time.perf_counter() - start) / steps * 1e3
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  for avg in prof.key_averages():
    if avg.key.startswith("aten::"):
      torch_ms[_torch_kind(avg.key)] += avg.self_cpu_time_total / 1e3 / steps

  rows = [(kind, jax_ms[kind], torch_ms[kind]) for kind in KINDS]
  rows += [("all ops", sum(jax_ms.values()), sum(torch_ms.values())),
           ("step (wall, profiled)", jax_wall, torch_wall)]
  print(f"{'kind':24s} {'JAX ms/step':>12s} {'torch ms/step':>14s} {'JAX / torch':>12s}")
  for kind, j, t in rows:
    print(f"{kind:24s} {j:12.1f} {t:14.1f} {j / t if t else float('nan'):12.2f}", flush=True)


def compile_times() -> None:
  import optax
  from eesmm_jax import plan as plan_lib
  from eesmm_jax.tools.flops import BACKBONES
  from eesmm_jax.config import pretrain_config

  c = pretrain_config()
  c.img_size, c.batch_size, c.total_steps, c.data.dataset = 64, 4, 100, "synthetic"
  c.optim.warmup_epochs = 0.0
  c.model.update(name="swin_tiny", window_size=2, **BACKBONES["swin_micro"])
  p = plan_lib.pretraining(c, sharding.make_mesh(jax.devices()[:1]))
  images = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.uint8, sharding=p.data_sharding)
  loss = lambda params, x: p.loss_fn(params, x, jax.random.key(0), True)[0]

  def step_with(tx=None):
    q = p
    if tx is not None:
      q = dataclasses.replace(p, tx=tx)
      shapes = jax.eval_shape(q.new_state, jax.random.key_data(jax.random.key(0)))
      q = dataclasses.replace(q, state_shapes=shapes,
                              state_sharding=sharding.state_shardings(shapes, q.mesh, False))
    return step_lib.jit_train_step(q).lower(q.state_shapes, images)

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
  from eesmm_jax import plan as plan_lib
  gib = 2 ** 30

  def config(spec: str):
    name, *arg = spec.split(":")
    return importlib.import_module(f"eesmm_jax.configs.{name}").get_config(*arg)

  def need(spec: str, images: int) -> tuple[int, int]:
    c = config(spec)
    c.batch_size, c.data.dataset = images, "synthetic"
    p = plan_lib.pretraining(c, sharding.make_mesh(jax.devices()[:1]))
    batch = jax.ShapeDtypeStruct((images, c.img_size, c.img_size, 3), jnp.uint8,
                                 sharding=p.data_sharding)
    m = step_lib.jit_train_step(p).lower(p.state_shapes, batch).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes

  for spec in configs:
    c = config(spec)
    per_device, n = c.batch_size // devices, c.objective.num_mix
    (args6, temps6), (args12, temps12) = need(spec, 6), need(spec, 12)
    # Per image: its pixels (an argument) and its activations (temporaries); the rest is fixed.
    pixels, per_image = (args12 - args6) / 6, (temps12 - temps6) / 6
    fixed = args6 + temps6 - 6 * (pixels + per_image)  # params, optimizer state, workspace
    total = lambda k: fixed + per_device * pixels + per_image * per_device / k
    fit = step_lib.fewest_micro_batches(fixed + per_device * pixels, per_image * per_device, 1,
                                        device_gb * gib, lambda k: (per_device // n) % k == 0)
    print(f"{spec}: {per_device} images per device need {total(1) / gib:.1f} GiB "
          f"({fixed / gib:.2f} GiB params, optimizer state and workspace, "
          f"{per_image / 2 ** 20:.0f} MiB of activations per image); "
          + (f"micro_batches={fit} fits {device_gb:g} GB ({total(fit) / gib:.1f} GiB)"
             if fit else f"no micro_batches fits {device_gb:g} GB"), flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("kernels", "profile", "compile", "memory"))
  parser.add_argument("configs", nargs="*", help="memory: config modules, name[:arg]")
  parser.add_argument("--devices", type=int, default=4, help="memory: devices the batch spans")
  parser.add_argument("--device_gb", type=float, default=32.0, help="memory: device memory")
  parser.add_argument("--size", default="192/6", help="profile: the cpu-small cell, img/window")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # compile times are the point
  if args.what == "kernels":
    kernels()
  elif args.what == "profile":
    from eesmm_jax.tools.benchmark.runner import parse_size
    profile(cell=("swin_mini", *parse_size(args.size)))
  elif args.what == "compile":
    compile_times()
  else:
    memory(args.configs, args.devices, args.device_gb)


if __name__ == "__main__":
  main()
