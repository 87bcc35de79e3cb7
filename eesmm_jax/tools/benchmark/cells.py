"""One JAX cell of the benchmark: the trainer's own step, compiled, warmed up and timed, and the
device facts every cell records."""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import jax

from eesmm_jax import metrics as metrics_lib
from eesmm_jax import plan
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.tools import flops

IMAGENET_TRAIN = 1_281_167
EPOCHS = 800


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


# ----------------------------------------------------------------------------- the cell


def jax_step(backbone: str, img_size: int, window: int, num_mix: int, batch: int, dtype: str,
             data: str = "device", data_dir: Optional[str] = None,
             attention: Optional[str] = None, remat: str = "none"):
  """The trainer's own step, compiled: its plan, state (with the fp16 loss scale) and jitted step
  (`step.jit_train_step`), at SimMIM's AdamW recipe (`flops.step_config`). Returns (config, plan, state, a uint8 device batch, the
  lowered and the compiled step, compile seconds)."""
  config = flops.step_config(backbone, img_size, window, num_mix, batch, dtype,
                             "synthetic" if data == "device" else data, data_dir, remat)
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
  seconds (FLOPs per image: `flops.step_flops`, the project's one count)."""
  config, p, state, images, lowered, compiled, compile_time = jax_step(
      backbone, img_size, window, num_mix, batch, dtype, data, data_dir, attention, remat)
  mesh, data_sharding = p.mesh, p.data_sharding

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

  def chained(steps: int) -> float:
    """Seconds per step of `steps` steps dispatched back to back between two device syncs:
    what a loop that never waits gets (the per-step times above include each sync)."""
    jax.block_until_ready(holder["state"])
    t = time.perf_counter()
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], next_images())
    jax.block_until_ready((holder["state"], metrics))
    holder["loss"] = metrics["loss"]
    return (time.perf_counter() - t) / steps

  one_step.chained = chained

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
    cell = dict(compile_time_s=compile_time, flops_per_image=flops.step_flops(config) / batch,
                peak_bytes=peak, peak_bytes_source=source, loss=loss,
                finite=math.isfinite(loss), loss_scale=loss_scale, remat=remat,
                **throughput_fields(batch, times, mesh.size))
    if loop:
      cell["loop_images_per_sec"], cell["loop_host_ms_per_step"] = loop_images_per_sec(
          config, len(times) + warmup)
      cell["loop_vs_step"] = cell["loop_images_per_sec"] / cell["images_per_sec"]
    return cell

  return one_step, finish


def loop_images_per_sec(config, steps: int) -> tuple[float, dict]:
  """(images/s, host ms per step) of the whole trainer loop (`train.pretrain`: input,
  host-to-device transfer, step, finiteness checks and logging) over `steps` steps after the
  first (which compiles), from its own log rows; checkpoints and pictures only at the end."""
  from eesmm_jax import train  # only here: the benchmark itself builds on the core
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.total_steps = 1 + steps
    config.log_every = max(1, steps // 3)
    config.checkpoint_every = config.total_steps
    config.picture_every = 0
    config.data.synthetic_examples = config.batch_size * config.total_steps
    # The cells' compile times are real compiles: no persistent cache turned on from here.
    config.compilation_cache_dir = ""
  with tempfile.TemporaryDirectory() as workdir:
    train.pretrain(config, workdir)
    steps, seconds = metrics_lib.timed_seconds(workdir, config.batch_size)
    host = metrics_lib.host_ms_per_step(workdir)
  if not steps:
    raise RuntimeError(f"the trainer loop logged no step after the first in "
                       f"{config.total_steps} steps")
  return steps * config.batch_size / seconds, host
