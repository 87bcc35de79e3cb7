"""Timing tables: SimMIM vs EESMM train steps, in JAX and in the PyTorch reference.

    python -m eesmm_jax.tools.benchmark --preset cpu-small --out /tmp/timing     # ~5 min on 2 cores
    python -m eesmm_jax.tools.benchmark --preset gpu --out /tmp/timing           # the paper's sizes
    python -m eesmm_jax.tools.benchmark --preset gpu --methods eesmm2 --backbones swin_base \\
        --sizes 224/7 --torch none --out /tmp/one_cell                     # one cell

Grid: method (SimMIM = EESMM n=1, EESMM n=2, n=3) x backbone x image/window size. Every cell
trains on the same `--batch` images per step (SimMIM: that many encoder inputs, EESMM: batch / n
blends), so images/s compare methods directly. Per cell: compile time, the median of `--steps`
timed steps after `--warmup` (each step ends in `block_until_ready`), images/s (and per device),
XLA's FLOPs per image (of the step as lowered, before optimisation: the compiled GPU program's
count misses the matmuls that became cuBLAS calls), MFU against `PEAK_FLOPS` (null where the
device is not in the table, e.g. CPUs), peak memory and its source, and GPU-hours per ImageNet
epoch and per 800 epochs.

How cells share the machine (`--interleave`, recorded as `timing` in every cell): the cells of
one backbone and size each run in a process of their own and are timed a step of each in turn
(cpu-small), or one after another in this process (gpu).

Data: by default one batch of random images lives on the device and every step reuses it, so the
input pipeline is not timed; `--data cifar10` (or imagenet2012 / folder with `--data_dir`) feeds
the real tf.data pipeline and its host-to-device copy inside the timed step instead.

The PyTorch reference (`--torch eager,compile`) is SimMIM's step as microsoft/SimMIM runs it:
timm's Swin with a mask token, a 1x1 Conv2d + PixelShuffle head, the masked L1 loss, gradient
clipping at 5 and AdamW, at the same batch, resolution and dtype (torch.autocast for bf16/fp16).
There is no PyTorch EESMM, so each torch row is the SimMIM baseline of its (backbone, size).

`--out DIR` writes timing.json (one object per cell), timing.md (the table, the paper's numbers
beside ours with their units) and timing.png (images/s bars); all three are rewritten after every
cell, so a run stopped by `--time_budget` or a timeout still leaves its finished cells.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
import traceback
from typing import Any, Callable, Optional

if __name__ == "__main__":  # before JAX and TensorFlow allocate (tools/allocator.py says why)
  from eesmm_jax.tools import allocator
  allocator.setup()

import jax

from eesmm_jax import ops, plan
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.config import pretrain_config
from eesmm_jax.models import swin

IMAGENET_TRAIN = 1_281_167
EPOCHS = 800

# Dense peak FLOP/s per device by compute dtype (vendor datasheets; no sparsity). float32 on
# Ampere and newer GPUs is TF32 (JAX's default matmul precision there).
PEAK_FLOPS = {
    "V100": {"float16": 125e12, "bfloat16": None, "float32": 15.7e12},
    "A100": {"float16": 312e12, "bfloat16": 312e12, "float32": 156e12},
    "H100 PCIe": {"float16": 756e12, "bfloat16": 756e12, "float32": 378e12},
    "H100": {"float16": 989e12, "bfloat16": 989e12, "float32": 495e12},
    "H200": {"float16": 989e12, "bfloat16": 989e12, "float32": 495e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12},
}

# The paper's timing numbers, Swin backbones, in its own units (Sec. 4.2: "GPU hours per epoch";
# Table 1: total pretraining hours for 800 epochs, EESMM on four 32 GB V100s). The two do not
# agree (363 h / 800 = 0.45 h of wall time per epoch, i.e. 1.8 GPU-hours on 4 GPUs), which is why
# we print them as given. EESMM's numbers are for 224 px and n = 2; there are none for n = 3.
PAPER = {
    ("swin_base", 192, 1): {"gpu_h_per_epoch": 2.0, "hours_800": 1609},
    ("swin_base", 224, 1): {"gpu_h_per_epoch": 2.8, "hours_800": None},
    ("swin_base", 224, 2): {"gpu_h_per_epoch": 0.47, "hours_800": 363},
    ("swin_large", 192, 1): {"gpu_h_per_epoch": 3.5, "hours_800": 2821},
    ("swin_large", 224, 1): {"gpu_h_per_epoch": 5.6, "hours_800": None},
    ("swin_large", 224, 2): {"gpu_h_per_epoch": 0.29, "hours_800": None},
}

# Backbones beyond swin.VARIANTS: 4-stage Swins small enough for two CPU cores at 192/224 px
# (stride 32, so SimMIM's 32-px mask blocks and head are unchanged). cpu-small uses swin_mini:
# at width 32 the full-resolution pixel work (masks, blend, loss, pixel shuffle) is a third of
# the step, which no method shortens; at 64 the encoder dominates as it does in Swin-B.
BACKBONES = {
    **swin.VARIANTS,
    "swin_micro": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "swin_mini": dict(embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
}

PRESETS = {
    "cpu-small": dict(backbones=("swin_mini",), sizes=((192, 6), (224, 7)), methods=(1, 2, 3),
                      batch=12, steps=6, warmup=2, dtype="float32", torch=("eager",),
                      time_budget=0, interleave=True),
    # One H100/H200/A100 (bf16) or V100 (fp16). Swin-B's 10 cells took about 14 min on an
    # H200 (launch/benchmark_gpu.sh); --time_budget skips (and lists) the cells past it.
    "gpu": dict(backbones=("swin_base", "swin_large"), sizes=((192, 6), (224, 7)),
                methods=(1, 2, 3), batch={"swin_base": 96, "swin_large": 48}, steps=10,
                warmup=2, dtype="auto", torch=("eager", "compile"), time_budget=0,
                interleave=False),
}

METHOD_NAMES = {"simmim": 1, "eesmm2": 2, "eesmm3": 3}


def method_name(n: int) -> str:
  return "SimMIM" if n == 1 else f"EESMM n={n}"


# ----------------------------------------------------------------------------- the device


def cpu_model() -> str:
  """The host CPU's model as the system names it (/proc/cpuinfo), else what platform knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict:
  from eesmm_jax.tools import allocator
  dev = jax.devices()[0]
  return dict(device=f"{jax.device_count()} x {dev.device_kind}", device_kind=dev.device_kind,
              platform=dev.platform, num_devices=jax.device_count(),
              host=f"{cpu_model()}, {os.cpu_count()} CPU cores",
              allocator=allocator.describe(),  # in every cell: the CPU malloc it ran under
              jax_version=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Per-device dense peak for the compute dtype, or None ('unknown': CPUs, unlisted chips).
  The longest matching name wins ('H100 PCIe' before 'H100')."""
  kind = device_kind.upper()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.upper() in kind:
      return PEAK_FLOPS[name].get(dtype)
  return None


def auto_dtype() -> str:
  """bf16 where it is fast (TPU, Ampere and newer), fp16 on older GPUs, float32 on CPU."""
  dev = jax.devices()[0]
  if dev.platform == "tpu":
    return "bfloat16"
  if dev.platform == "gpu":
    cc = getattr(dev, "compute_capability", None)
    return "bfloat16" if cc is None or float(cc) >= 8.0 else "float16"
  return "float32"


def device_peak_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def timed_steps(step: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls after `warmup` untimed ones; `step` must block."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return times


def throughput_fields(batch: int, times: list[float], num_devices: int) -> dict:
  step_time = statistics.median(times)
  rate = batch / step_time
  gpu_h = IMAGENET_TRAIN / rate / 3600 * num_devices
  return dict(step_time_s=step_time, step_times_s=times, images_per_sec=rate,
              images_per_sec_per_device=rate / num_devices, device_hours_per_epoch=gpu_h,
              device_hours_800_epochs=gpu_h * EPOCHS)


# ----------------------------------------------------------------------------- JAX cell


def cell_config(backbone: str, img_size: int, window: int, num_mix: int, batch: int, dtype: str,
                data: str = "device", data_dir: Optional[str] = None, remat: str = "none"):
  """A cell's pretraining config: SimMIM's AdamW recipe at the cell's model, size and batch."""
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
  config.data.dataset = data if data != "device" else "synthetic"
  config.data.data_dir = data_dir
  # The schedule's length and shape: the lr's value does not change the step's cost.
  config.total_steps = 1000
  config.optim.warmup_epochs = 0.0
  return config


def flops_per_image(lowered, batch: int, config=None, impls: Optional[dict] = None
                    ) -> Optional[float]:
  """XLA's count of the whole step before optimisation (before SPMD partitioning, so for the
  global batch) per image: the same on every backend and mesh. The compiled program's count is
  not: on a GPU it misses the matmuls that became cuBLAS calls (an H200 counted 5.3 of Swin-B
  192/6 SimMIM's 69 GFLOPs per image), and on a mesh it counts replicated work per device.

  Backends behind the PJRT C API (JAX 0.11's CUDA plugin) have no cost analysis before
  compilation (`lowered.cost_analysis()` is None: every cell of the 2026-11-28 H200
  run), so with `config` the same step is traced again for one CPU device and counted there,
  with the encoder's forms `impls` (its `impl` and `attention_impl`; None: 'auto' for the CPU).
  None where that fails too (a cuDNN custom call has no CPU lowering)."""
  cost = lowered.cost_analysis()
  if not cost and config is not None:
    p = plan.pretraining(config, sharding.make_mesh(jax.devices("cpu")[:1]), **(impls or {}))
    state = jax.eval_shape(p.new_state, jax.random.PRNGKey(0))
    images = jax.ShapeDtypeStruct((batch, p.input_size, p.input_size, 3),
                                  jax.numpy.uint8, sharding=p.data_sharding)
    try:
      cost = step_lib.jit_train_step(p).lower(state, images).cost_analysis()
    except Exception as e:  # e.g. no CPU lowering for a GPU-only custom call
      print(f"no FLOP count: the step does not lower for the CPU ({type(e).__name__})",
            flush=True)
      return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch if cost and "flops" in cost else None


def jax_step(backbone: str, img_size: int, window: int, num_mix: int, batch: int, dtype: str,
             data: str = "device", data_dir: Optional[str] = None,
             attention: Optional[str] = None, remat: str = "none"):
  """The trainer's own step, compiled: its plan, state (with the fp16 loss scale) and jitted step
  (`core`), at SimMIM's AdamW recipe. Returns (config, plan, state, a uint8 device batch, the
  lowered and the compiled step, compile seconds)."""
  config = cell_config(backbone, img_size, window, num_mix, batch, dtype, data, data_dir, remat)
  p = plan.pretraining(config, sharding.make_mesh(), attention_impl=attention or "auto")
  state = jax.jit(p.new_state, out_shardings=p.state_sharding)(jax.random.PRNGKey(0))
  # uint8 pixels, as the trainer's input sends them (the step normalises them first); from
  # prepared shards at their stored size (p.input_size), cropped to img_size in the step.
  side = p.input_size
  images = jax.jit(lambda k: jax.random.randint(k, (batch, side, side, 3), 0, 256)
                   .astype(jax.numpy.uint8), out_shardings=p.data_sharding)(jax.random.key(1))
  step_fn = step_lib.jit_train_step(p)

  lowered = step_fn.lower(state, images)
  t = time.perf_counter()
  compiled = lowered.compile()
  return config, p, state, images, lowered, compiled, time.perf_counter() - t


def jax_cell(backbone: str, img_size: int, window: int, num_mix: int, batch: int, dtype: str,
             warmup: int, data: str = "device", data_dir: Optional[str] = None,
             attention: Optional[str] = None, remat: str = "none", loop: bool = False):
  """The trainer's own step (`jax_step`), compiled and run `warmup` times. Returns (one_step,
  finish): a call that runs one step, and one that makes the cell's fields from the timed steps'
  seconds."""
  config, p, state, images, lowered, compiled, compile_time = jax_step(
      backbone, img_size, window, num_mix, batch, dtype, data, data_dir, attention, remat)
  mesh, data_sharding = p.mesh, p.data_sharding
  impls = dict(impl=p.encoder.impl, attention_impl=p.encoder.attention_impl)  # the FLOP recount's

  if data == "device":
    next_images = lambda: images
  else:
    from eesmm_jax import data as data_lib
    batches = data_lib.create_pretrain_iterator(config.data, batch)
    next_images = lambda: sharding.global_batch_from_local(next(batches)["image"], data_sharding)

  holder = {"state": state}
  peak_before = device_peak_bytes()

  def one_step():
    holder["state"], metrics = compiled(holder["state"], next_images())
    jax.block_until_ready((holder["state"], metrics))
    holder["loss"] = metrics["loss"]

  timed_steps(one_step, 0, warmup)

  def finish(times: list[float]) -> dict:
    loss = float(holder["loss"])
    scale = holder["state"].dynamic_scale  # float16: the trainer's dynamic loss scale
    loss_scale = None if scale is None else float(scale.scale)
    peak_after = device_peak_bytes()
    if peak_after is not None and (peak_before is None or peak_after > peak_before):
      # The process's high-water mark rose during this cell, so it is this cell's peak.
      peak, source = peak_after, "device memory_stats peak_bytes_in_use"
    else:
      peak, source = step_lib.step_bytes(compiled), "xla memory_analysis (args + outputs + temps)"
    holder.clear()
    gc.collect()
    flops = flops_per_image(lowered, batch, config, impls)
    cell = dict(compile_time_s=compile_time, flops_per_image=flops,
                peak_bytes=peak, peak_bytes_source=source, loss=loss,
                finite=math.isfinite(loss), loss_scale=loss_scale, remat=remat,
                **throughput_fields(batch, times, mesh.size))
    if loop:
      cell["loop_images_per_sec"] = loop_images_per_sec(config, len(times) + warmup)
      cell["loop_vs_step"] = cell["loop_images_per_sec"] / cell["images_per_sec"]
    return cell

  return one_step, finish


def loop_images_per_sec(config, steps: int) -> float:
  """Images/s of the whole trainer loop (`train.pretrain`: input, host-to-device
  transfer, step, finiteness checks and logging) over `steps` steps after the first (which
  compiles), from the rates its own log wrote; checkpoints and pictures only at the end."""
  import tempfile

  from eesmm_jax import train  # only here: the benchmark itself builds on the core
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.total_steps = 1 + steps
    config.log_every = max(1, steps // 3)
    config.checkpoint_every = config.total_steps
    config.picture_every = 0
    config.data.synthetic_examples = config.batch_size * config.total_steps
  with tempfile.TemporaryDirectory() as workdir:
    train.pretrain(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  # Each row's rate covers the steps since the previous row (from the end of step 1 on); a row
  # at step 1 (which compiles) or one repeating a step adds no timed steps.
  seconds, last = 0.0, 1
  for row in rows:
    if row["step"] > last:
      seconds += (row["step"] - last) * config.batch_size / row["images_per_sec"]
      last = row["step"]
  if last == 1:
    raise RuntimeError(f"the trainer loop logged no step after the first: steps "
                       f"{[row['step'] for row in rows]} of {config.total_steps}")
  return (last - 1) * config.batch_size / seconds


# ----------------------------------------------------------------------------- PyTorch cell


def torch_step(backbone: str, img_size: int, window: int, batch: int, dtype: str, mode: str,
               mask_ratio: float = 0.6, mask_patch: int = 32) -> Callable[[], float]:
  """microsoft/SimMIM's train step on timm's Swin: eager, or `torch.compile` of forward + loss
  (backward and AdamW stay eager, as SimMIM's loop around a compiled model would run). Returns
  the step: a call that runs one and returns its loss (after the device finished it)."""
  import torch
  from timm.models.swin_transformer import SwinTransformer as TimmSwin

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cfg = BACKBONES[backbone]
  encoder = TimmSwin(img_size=img_size, window_size=window, embed_dim=cfg["embed_dim"],
                     depths=cfg["depths"], num_heads=cfg["num_heads"], num_classes=0,
                     drop_path_rate=0.0)
  stride = 4 * 2 ** (len(cfg["depths"]) - 1)
  width = encoder.num_features

  class SimMIM(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = encoder
      self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 1, cfg["embed_dim"]))
      torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
      self.decoder = torch.nn.Sequential(torch.nn.Conv2d(width, 3 * stride ** 2, 1),
                                         torch.nn.PixelShuffle(stride))

    def forward(self, x, mask):
      z = self.encoder.patch_embed(x)                       # timm >= 0.9: NHWC
      w = mask.unsqueeze(-1).type_as(z)
      z = z * (1 - w) + self.mask_token * w
      z = self.encoder.norm(self.encoder.layers(z))
      x_rec = self.decoder(z.permute(0, 3, 1, 2))
      m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()
      loss = (torch.abs(x - x_rec) * m).sum() / (m.sum() + 1e-5) / 3
      return loss

  model = SimMIM().to(dev)
  decay = [p for n, p in model.named_parameters()
           if p.ndim > 1 and "relative_position_bias_table" not in n and "mask_token" not in n]
  no_decay = [p for n, p in model.named_parameters()
              if not (p.ndim > 1 and "relative_position_bias_table" not in n
                      and "mask_token" not in n)]
  opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
  forward = torch.compile(model) if mode == "compile" else model
  amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
  x = torch.randn(batch, 3, img_size, img_size, device=dev)
  blocks = (img_size // mask_patch) ** 2
  num_masked = math.ceil(blocks * mask_ratio)
  scale = mask_patch // 4

  def one_step():
    # SimMIM's mask generator, drawn on the device (JAX draws its masks inside the step too).
    order = torch.rand(batch, blocks, device=dev).argsort(1).argsort(1)
    mask = (order < num_masked).view(batch, img_size // mask_patch, img_size // mask_patch)
    mask = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).int()
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
      loss = forward(x, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    return loss.detach().item()  # waits for the step (CUDA included)

  return one_step


def torch_cell(backbone: str, img_size: int, window: int, batch: int, dtype: str, mode: str,
               warmup: int):
  """`torch_step` after its first step (eager: one step; compile: tracing, inductor's codegen
  and one step, which give the compile time) and `warmup` - 1 more: (one_step, finish), as
  `jax_cell`."""
  import torch
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  one_step = torch_step(backbone, img_size, window, batch, dtype, mode)
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  loss = one_step()  # eager: the first step; compile: tracing + inductor codegen + first step
  first = time.perf_counter() - t
  timed_steps(one_step, 0, max(warmup - 1, 0))

  def finish(times: list[float]) -> dict:
    peak, source = None, "unavailable on CPU"
    if dev.type == "cuda":
      peak, source = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
      torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return dict(compile_time_s=max(first - statistics.median(times), 0.0), flops_per_image=None,
                peak_bytes=peak, peak_bytes_source=source, loss=loss,
                finite=math.isfinite(loss), device=f"1 x {name}", device_kind=name,
                num_devices=1, **throughput_fields(batch, times, 1))

  return one_step, finish


# ----------------------------------------------------------------------------- reports


def with_derived(cells: list[dict]) -> list[dict]:
  """MFU, the ratios measured in this run, and the paper's numbers, per cell."""
  jax_rows = {(c["backbone"], c["img_size"], c["num_mix"], c.get("remat", "none")): c
              for c in cells if c["framework"] == "jax" and c["status"] == "ok"}
  torch_rows = {(c["backbone"], c["img_size"], c["impl"]): c
                for c in cells if c["framework"] == "torch" and c["status"] == "ok"}
  for c in cells:
    key = (c["backbone"], c["img_size"])
    c["paper"] = PAPER.get(key + (c["num_mix"],))
    if c["status"] != "ok":
      continue
    remat = c.get("remat", "none")
    simmim = jax_rows.get(key + (1, remat))
    if c["framework"] == "torch" and simmim:
      c["flops_per_image"] = simmim["flops_per_image"]  # same model and step: XLA's count
    peak = peak_flops(c["device_kind"], c["dtype"])
    c["peak_flops_per_device"] = peak
    c["mfu"] = (c["flops_per_image"] * c["images_per_sec_per_device"] / peak
                if peak and c["flops_per_image"] else None)
    if c["framework"] == "jax":
      c["speedup_vs_simmim"] = (c["images_per_sec"] / simmim["images_per_sec"]
                                if simmim else None)
      plain = jax_rows.get(key + (c["num_mix"], "none"))
      if remat != "none" and plain:  # what rematerialisation costs and saves
        c["step_time_vs_no_remat"] = c["step_time_s"] / plain["step_time_s"]
        c["peak_bytes_vs_no_remat"] = (c["peak_bytes"] / plain["peak_bytes"]
                                       if c["peak_bytes"] and plain["peak_bytes"] else None)
      for impl in ("torch-eager", "torch-compile"):
        ref = torch_rows.get(key + (impl,))
        c[f"ratio_vs_{impl.replace('-', '_')}_simmim"] = (
            c["images_per_sec"] / ref["images_per_sec"] if ref else None)
  return cells


def _fmt(v, spec: str, none: str = "-") -> str:
  return none if v is None else format(v, spec)


def markdown(cells: list[dict], meta: dict, command: str) -> str:
  lines = [
      "# Train-step timing: SimMIM vs EESMM (JAX) and the PyTorch SimMIM reference",
      "",
      f"Device: **{meta['device']}** ({meta['platform']}), host {meta['host']}, "
      f"allocator {meta.get('allocator', '-')}, "
      f"JAX {meta['jax_version']}, {meta['date']}.  ",
      f"Command: `{command}`  ",
      f"Cells timed {cells[0]['timing'] if cells else '-'}.",
      "",
      "Units: step time is the median of the timed steps (after warm-up, each ending in "
      "`block_until_ready` / `cuda.synchronize`); img/s counts *images* (an EESMM blend of n "
      "images counts n); GFLOPs/img is XLA's count of the step before optimisation (forward + "
      "backward + AdamW, the same on every backend and mesh); MFU uses "
      "the per-device dense peak of the compute dtype ('-' = device not in the table, e.g. "
      "CPUs); device-h = device-hours = wall hours x devices, for 1,281,167 images per epoch. "
      "The paper's 'GPU-h/ep' is Sec. 4.2's 'GPU hours per epoch' and 'h/800 ep' is Table 1's "
      "total pretraining hours (4 x V100 32 GB for EESMM); the two are not in the same unit "
      "(see docs/performance.md). Torch rows run SimMIM only; their GFLOPs are XLA's count of the "
      "same SimMIM step.",
      "",
      "| backbone | img/win | method | impl | dtype | batch | step ms | img/s | img/s/dev "
      "| GFLOPs/img | MFU | peak MiB | compile s | device-h/ep | device-h/800 ep "
      "| paper GPU-h/ep | paper h/800 ep |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in cells:
    head = (f"| {c['backbone']} | {c['img_size']}/{c['window_size']} | "
            f"{method_name(c['num_mix'])} | {c['impl']} | {c['dtype']} | {c['batch_size']} ")
    paper = c.get("paper") or {}
    tail = (f"| {_fmt(paper.get('gpu_h_per_epoch'), 'g')} "
            f"| {_fmt(paper.get('hours_800'), 'g')} |")
    if c["status"] != "ok":
      lines.append(head + f"| {c['status']} " + "| " * 9 + tail)
      continue
    mem = (f"{c['peak_bytes'] / 2 ** 20:.0f} ({'dev' if 'device' in c['peak_bytes_source'] or 'cuda' in c['peak_bytes_source'] else 'xla'})"
           if c["peak_bytes"] else "-")
    lines.append(
        head + f"| {c['step_time_s'] * 1e3:.1f} | {c['images_per_sec']:.2f} "
        f"| {c['images_per_sec_per_device']:.2f} "
        f"| {_fmt(c['flops_per_image'] and c['flops_per_image'] / 1e9, '.2f')} "
        f"| {_fmt(c.get('mfu') and 100 * c['mfu'], '.1f')}{'%' if c.get('mfu') else ''} "
        f"| {mem} | {c['compile_time_s']:.1f} | {c['device_hours_per_epoch']:.3g} "
        f"| {c['device_hours_800_epochs']:.4g} " + tail)

  lines += ["", "Ratios measured in this run (images/s over images/s):", "",
            "| backbone | img/win | method | impl | vs JAX SimMIM | vs torch eager SimMIM "
            "| vs torch.compile SimMIM | step time vs no remat | peak memory vs no remat "
            "| loop vs step |", "|---|---|---|---|---|---|---|---|---|---|"]
  for c in cells:
    if c["framework"] == "jax" and c["status"] == "ok":
      lines.append(f"| {c['backbone']} | {c['img_size']}/{c['window_size']} "
                   f"| {method_name(c['num_mix'])} | {c['impl']} "
                   f"| {_fmt(c.get('speedup_vs_simmim'), '.3f')} "
                   f"| {_fmt(c.get('ratio_vs_torch_eager_simmim'), '.3f')} "
                   f"| {_fmt(c.get('ratio_vs_torch_compile_simmim'), '.3f')} "
                   f"| {_fmt(c.get('step_time_vs_no_remat'), '.3f')} "
                   f"| {_fmt(c.get('peak_bytes_vs_no_remat'), '.3f')} "
                   f"| {_fmt(c.get('loop_vs_step'), '.3f')} |")
  lines += ["", "Peak memory source: 'dev' = the device allocator's high-water mark "
            "(memory_stats / torch.cuda), 'xla' = the compiled step's arguments + outputs + "
            "temporaries (XLA memory_analysis, where the device reports no statistics).", ""]
  return "\n".join(lines)


def bar_chart(cells: list[dict], path: str, title: str) -> None:
  """images/s per cell as horizontal bars (PIL only, no plotting dependency)."""
  from PIL import Image, ImageDraw

  ok = [c for c in cells if c["status"] == "ok"]
  colours = {("jax", 1): (70, 110, 180), ("jax", 2): (220, 120, 40), ("jax", 3): (60, 160, 80),
             ("torch", 1): (150, 150, 150)}
  row_h, left, right, top = 22, 330, 140, 40
  width = 1000
  img = Image.new("RGB", (width, top + row_h * max(len(ok), 1) + 30), "white")
  draw = ImageDraw.Draw(img)
  draw.text((10, 10), title, fill="black")
  best = max((c["images_per_sec"] for c in ok), default=1.0)
  for i, c in enumerate(ok):
    y = top + i * row_h
    label = (f"{c['backbone']} {c['img_size']}/{c['window_size']} {method_name(c['num_mix'])} "
             f"[{c['impl']}]")
    draw.text((10, y + 4), label, fill="black")
    length = (width - left - right) * c["images_per_sec"] / best
    draw.rectangle([left, y + 2, left + length, y + row_h - 4],
                   fill=colours[(c["framework"], c["num_mix"] if c["framework"] == "jax" else 1)])
    draw.text((left + length + 6, y + 4), f"{c['images_per_sec']:.1f} img/s", fill="black")
  draw.text((10, top + row_h * max(len(ok), 1) + 8),
            "images per second (median step), higher is better", fill="black")
  img.save(path)


def write_outputs(out: str, cells: list[dict], meta: dict, command: str) -> None:
  os.makedirs(out, exist_ok=True)
  cells = with_derived(cells)
  with open(os.path.join(out, "timing.json"), "w") as f:
    json.dump(cells, f, indent=1)
  with open(os.path.join(out, "timing.md"), "w") as f:
    f.write(markdown(cells, meta, command))
  bar_chart(cells, os.path.join(out, "timing.png"), f"Train-step throughput, {meta['device']}")


# ----------------------------------------------------------------------------- the grid


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.benchmark", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
  p.add_argument("--out", required=True, help="directory for timing.json, .md, .png")
  p.add_argument("--methods", help=f"comma list of {sorted(METHOD_NAMES)} (default: preset's)")
  p.add_argument("--backbones", help=f"comma list of {sorted(BACKBONES)}")
  p.add_argument("--sizes", help="comma list of img/window, e.g. 192/6,224/7")
  p.add_argument("--batch", type=int, help="images per step, a multiple of n x devices")
  p.add_argument("--steps", type=int, help="timed steps per cell (the median is reported)")
  p.add_argument("--warmup", type=int, help="untimed steps after compilation")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
  p.add_argument("--torch", help="comma list of eager,compile; 'none' skips PyTorch")
  p.add_argument("--data", default="device",
                 help="'device' (one random batch kept on the device: no input pipeline) or a "
                      "dataset of eesmm_jax.data (cifar10, imagenet2012, folder, synthetic, "
                      "shards)")
  p.add_argument("--data_dir", help="TFDS data_dir, image folder or shard directory for --data")
  p.add_argument("--attention", default="auto", choices=("auto",) + ops.ATTENTION_IMPLS,
                 help="JAX attention (eesmm_jax.ops): auto (its own backward on a CPU, XLA "
                      "einsums elsewhere), xla (einsums, autodiff), xla_cpu, cudnn (cuDNN's "
                      "fused kernel where it applies: GPU, Ampere+, 16-bit, even window area) or "
                      "pallas (the fused Pallas kernel)")
  p.add_argument("--remat", default="none",
                 help="comma list of model.remat values (none, full, dots): one JAX cell each")
  p.add_argument("--loop", action="store_true",
                 help="also time the whole trainer loop on each JAX cell "
                      "(loop_images_per_sec beside images_per_sec)")
  p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                 help="time the cells of each backbone and size together, a step of each in "
                      "turn, each cell in its own process (default: the preset's; cpu-small "
                      "does, gpu does not: a GPU's step times hold still, and every process "
                      "would hold its own device memory)")
  p.add_argument("--time_budget", type=float,
                 help="seconds; cells that would start after it are skipped (0 = no limit)")
  return p.parse_args(argv)


def parse_size(text: str) -> tuple[int, int]:
  """'224/7' -> (224, 7): an image size and a window, for --sizes and kernel_bench --size."""
  img, _, window = text.strip().partition("/")
  if not (img.isdigit() and window.isdigit() and int(img) > 0 and int(window) > 0):
    raise SystemExit(f"size {text!r} is not img/window with two positive integers, e.g. 224/7")
  return int(img), int(window)


def resolve(args: argparse.Namespace) -> dict:
  preset = dict(PRESETS[args.preset])
  if args.methods:
    preset["methods"] = tuple(METHOD_NAMES[m.strip()] for m in args.methods.split(","))
  if args.backbones:
    preset["backbones"] = tuple(b.strip() for b in args.backbones.split(","))
    for b in preset["backbones"]:
      if b not in BACKBONES:
        raise SystemExit(f"unknown backbone {b!r}; choose from {sorted(BACKBONES)}")
  if args.sizes:
    preset["sizes"] = tuple(parse_size(s) for s in args.sizes.split(","))
  for key in ("batch", "steps", "warmup", "dtype", "time_budget", "interleave"):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  if args.torch:
    preset["torch"] = () if args.torch == "none" else tuple(args.torch.split(","))
  if preset["dtype"] == "auto":
    preset["dtype"] = auto_dtype()
  return preset


def _cell(framework: str, impl: str, num_mix: int, remat: str, backbone: str, img_size: int,
          window: int, batch: int, grid: dict, args: argparse.Namespace):
  """(one_step, finish) of one cell of the grid, compiled and warmed up."""
  if framework == "jax":
    return jax_cell(backbone, img_size, window, num_mix, batch, grid["dtype"], grid["warmup"],
                    args.data, args.data_dir,
                    None if args.attention == "auto" else args.attention, remat, args.loop)
  return torch_cell(backbone, img_size, window, batch, grid["dtype"], impl.split("-")[1],
                    grid["warmup"])


def _error(e: BaseException) -> str:
  traceback.print_exc()
  return f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _worker(job: dict, conn) -> None:
  """One cell in a process of its own (--interleave): compile and warm it up, then time one step
  per 'step' message; 'finish' answers with the cell's fields. Every answer is a message: a
  failure is sent as {'status': 'error: ...'} and ends the worker."""
  # Several workers share the device: none may take most of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  try:
    one_step, finish = _cell(**job)
    conn.send("ready")
    times = []
    while (message := conn.recv()) == "step":
      t = time.perf_counter()
      one_step()
      times.append(time.perf_counter() - t)
      conn.send("ok")
    conn.send(finish(times))
  except Exception as e:  # the parent records it; the other cells go on
    conn.send({"status": _error(e)})


def _interleaved(jobs: list[dict], steps: int) -> list[dict]:
  """Time `jobs` (cells of one backbone and size) in rounds, each cell in its own process: a
  round times one step of every cell, in turn, the order reversed every other round.

  On a shared machine a step's time drifts by tens of per cent within minutes, so cells timed
  one after another compare their minutes as much as their steps; here each cell sees the same
  minutes. And no cell runs in a heap another framework has carved up: JAX steps timed after
  PyTorch's in one process spent 70-330 ms each in page faults (docs/performance.md)."""
  import multiprocessing

  context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited JAX state
  results, live = [None] * len(jobs), []

  def ask(conn, process, message=None):
    try:
      if message is not None:
        conn.send(message)
      return conn.recv()
    except (EOFError, OSError):  # killed (out of memory?) or crashed
      process.join(timeout=5)
      return {"status": f"error: worker exited with code {process.exitcode}"}

  for i, job in enumerate(jobs):
    ours, theirs = context.Pipe()
    process = context.Process(target=_worker, args=(job, theirs), daemon=True)
    process.start()
    theirs.close()
    # Ready (compiled and warmed up) before the next starts: compiles would slow each other.
    if (reply := ask(ours, process)) == "ready":
      live.append((i, ours, process))
    else:
      results[i] = reply
  for r in range(steps):
    for i, conn, process in (live if r % 2 == 0 else live[::-1]):
      if results[i] is None and (reply := ask(conn, process, "step")) != "ok":
        results[i] = reply
  for i, conn, process in live:
    if results[i] is None:
      results[i] = ask(conn, process, "finish")
    process.join(timeout=60)
  return results


def run(argv=None) -> list[dict]:
  args = parse_args(argv)
  grid = resolve(args)
  if grid["torch"] and not grid["interleave"]:
    # timm (through torchvision) must be imported before TensorFlow, which the trainer's input
    # pipeline imports: the other order segfaults inside torchvision's import.
    import timm.models.swin_transformer  # noqa: F401
  meta = device_info()
  command = "python -m eesmm_jax.tools.benchmark " + " ".join(argv if argv is not None else
                                                         __import__("sys").argv[1:])
  print(f"{meta['device']}, {grid}", flush=True)
  start = time.perf_counter()
  cells: list[dict] = []
  last_cost = 0.0
  jax_impl = "jax" + (f"-{args.attention}" if args.attention != "auto" else "")
  timing = ("interleaved: a step of each cell in turn, each cell in its own process"
            if grid["interleave"] else "in turn: each cell's steps together, one process")
  for backbone in grid["backbones"]:
    batch = grid["batch"][backbone] if isinstance(grid["batch"], dict) else grid["batch"]
    for img_size, window in grid["sizes"]:
      jobs = [("jax", jax_impl + (f"-remat-{r}" if r != "none" else ""), n, r)
              for n in grid["methods"] for r in args.remat.split(",")]
      jobs += [("torch", f"torch-{mode}", 1, "none") for mode in grid["torch"]]
      group = [dict(framework=framework, impl=impl, method=method_name(n), num_mix=n,
                    backbone=backbone, img_size=img_size, window_size=window, batch_size=batch,
                    encoder_inputs_per_step=batch // n, dtype=grid["dtype"],
                    data=args.data if framework == "jax" else "device", timing=timing, **meta)
               for framework, impl, n, remat in jobs]
      specs = [dict(framework=framework, impl=impl, num_mix=n, remat=remat, backbone=backbone,
                    img_size=img_size, window=window, batch=batch, grid=grid, args=args)
               for framework, impl, n, remat in jobs]
      elapsed = time.perf_counter() - start
      if grid["interleave"]:
        if grid["time_budget"] and elapsed + last_cost > grid["time_budget"]:
          results = [{"status": f"skipped: --time_budget {grid['time_budget']:.0f} s"}] * len(jobs)
        else:
          t = time.perf_counter()
          results = _interleaved(specs, grid["steps"])
          last_cost = time.perf_counter() - t
      for i, (cell, spec) in enumerate(zip(group, specs)):
        if grid["interleave"]:
          cell.update(results[i])
          cell.setdefault("status", "ok")
        elif grid["time_budget"] and (time.perf_counter() - start + last_cost
                                      > grid["time_budget"]):
          cell["status"] = f"skipped: --time_budget {grid['time_budget']:.0f} s"
        else:
          t = time.perf_counter()
          try:
            one_step, finish = _cell(**spec)
            cell.update(finish(timed_steps(one_step, grid["steps"], 0)))
            cell["status"] = "ok"
          except Exception as e:  # an OOM or unsupported cell must not lose the others
            cell["status"] = _error(e)
          last_cost = time.perf_counter() - t
        cells.append(cell)
        if cell["status"] == "ok":
          print(f"{backbone} {img_size}/{window} {cell['method']:10s} {cell['impl']:13s} "
                f"{cell['step_time_s'] * 1e3:9.1f} ms/step {cell['images_per_sec']:9.2f} img/s "
                f"compile {cell['compile_time_s']:.1f} s", flush=True)
        else:
          print(f"{backbone} {img_size}/{window} {cell['method']} {cell['impl']}: "
                f"{cell['status']}", flush=True)
        write_outputs(args.out, cells, meta, command)
  print(open(os.path.join(args.out, "timing.md")).read())
  return cells


def main(argv=None) -> int:
  """Exit status 1 when any cell failed (the tables are written first); skipped cells are not
  failures."""
  failed = [c for c in run(argv) if c["status"].startswith("error")]
  for c in failed:
    print(f"failed: {c['backbone']} {c['img_size']}/{c['window_size']} {c['method']} "
          f"{c['impl']}: {c['status']}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  from eesmm_jax import cli
  raise SystemExit(cli.run_main(main))
