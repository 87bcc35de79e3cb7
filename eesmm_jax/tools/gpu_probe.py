"""One prepared GPU probe: everything this project wants to know from a GPU, in one process.

    launch/gpu_probe.sh OUT              # one H100 / H200: within 7.5 minutes
    launch/gpu_probe.sh --cpu-test OUT   # every phase on a tiny Swin on the CPU (the CI's test)

A GPU machine is at hand now and then, and briefly, so the probe is prepared and tested on the
CPU and run in one call. Phases, in order, each written to OUT/probe.json (one object per phase)
and OUT/probe.md as it ends; a phase whose estimated cost would pass the deadline is skipped with
a line saying so (and why, in its object):

  environment    the device, JAX, one large matmul's FLOP/s and one device copy's bytes/s
                 (the ceilings the step is held against)
  step           SimMIM at the preset's model and batch: the trainer's step timed over many
                 steps between two device syncs, MFU, peak memory, a census of the compiled
                 program (fusions by kind, library calls by target), the forward / backward /
                 optimizer split (the forward and the forward + backward jitted alone), and a
                 short profile of three steps (time by kind of op, device-busy fraction)
  loop           the whole trainer loop (`train.pretrain`, synthetic batches drawn on the
                 device) against the bare step, SimMIM and EESMM n = 3, with the loop's own
                 host times per step
  batch_scaling  SimMIM at batch B, 2B, 4B, ... until XLA's memory analysis says the step does
                 not fit; EESMM n = 2 and 3 at equal batch and at equal memory (n x B images,
                 so the encoder sees as many inputs as SimMIM's)
  attention      the window attention's forms (xla, cudnn, pallas) in SimMIM's step
  flags          the XLA GPU options that bear on this step, one compile each (cuBLASLt
                 epilogues, cuDNN LayerNorm, command buffers), against the default
  input          host input rates: the synthetic source on the host and on the device, the
                 prepared-shard reader (a small shard set written first)

It needs only what a stock accelerator image has (JAX with CUDA, Flax, Optax, Orbax, numpy; no
TensorFlow); ml-collections may come as a wheel beside the checkout (launch/gpu_probe.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from eesmm_jax import metrics
from eesmm_jax import plan as plan_lib
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.tools import flops
from eesmm_jax.tools.benchmark import cells, report

PHASES = ("environment", "step", "loop", "batch_scaling", "attention", "flags", "input")

PRESETS = {
    "gpu": dict(backbone="swin_base", img_size=192, window=6, batch=96, dtype="bfloat16",
                steps=60, warmup=10, max_batch=1536, matmul=8192, copy_mib=1024,
                attention=("xla", "cudnn", "pallas"),
                flags=(("cublaslt", {"xla_gpu_enable_cublaslt": True}),
                       ("cudnn_layer_norm", {"xla_gpu_enable_cudnn_layer_norm": True}),
                       ("no_command_buffers", {"xla_gpu_enable_command_buffer": ""})),
                input_batch=96, deadline=450.0),
    # Every phase, tiny: what the CI runs (about 2 minutes on 2 CPU cores; the deadline leaves
    # room for a loaded machine, so that every phase runs).
    "cpu-test": dict(backbone="swin_nano", img_size=64, window=4, batch=6, dtype="float32",
                     steps=3, warmup=1, max_batch=6, matmul=256, copy_mib=8,
                     attention=("xla", "xla_cpu"),
                     flags=(("no_expensive_llvm_passes",
                             {"xla_llvm_disable_expensive_passes": True}),),
                     input_batch=8, deadline=300.0),
}


class Probe:
  """The phases' results, written after each, and the clock they share."""

  def __init__(self, out: str, preset: str, deadline: float):
    self.out, self.preset, self.deadline = out, preset, deadline
    self.start = time.perf_counter()
    self.results: dict = {}
    self.compile_s = 30.0 if preset == "gpu" else 5.0  # until the step phase measures one
    self.step_s = 0.05 if preset == "gpu" else 0.5
    os.makedirs(out, exist_ok=True)

  def left(self) -> float:
    return self.deadline - (time.perf_counter() - self.start)

  def run(self, name: str, estimate: float, fn: Callable[[], dict]) -> None:
    if estimate > self.left():
      why = (f"skipped: estimated {estimate:.0f} s, {max(self.left(), 0):.0f} s left of the "
             f"{self.deadline:.0f} s deadline")
      self.results[name] = {"status": why}
      print(f"[{name}] {why}", flush=True)
    else:
      print(f"[{name}] running (estimated {estimate:.0f} s)", flush=True)
      t = time.perf_counter()
      try:
        result = {"status": "ok", **fn()}
      except Exception as e:  # noqa: BLE001 - a phase's failure is its result; the next runs
        result = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        with open(os.path.join(self.out, f"{name}-error.txt"), "w") as f:
          f.write(traceback.format_exc())
      result["seconds"] = time.perf_counter() - t
      self.results[name] = result
      print(f"[{name}] {result['status']} in {result['seconds']:.1f} s", flush=True)
    self.write()

  def write(self) -> None:
    tmp = os.path.join(self.out, "probe.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"preset": self.preset, "deadline_s": self.deadline, **self.results}, f,
                indent=1, default=str)
    os.replace(tmp, os.path.join(self.out, "probe.json"))
    with open(os.path.join(self.out, "probe.md"), "w") as f:
      f.write(markdown(self.preset, self.results))


# ----------------------------------------------------------------------------- measuring


def chained_seconds(call: Callable[[], object], steps: int, warmup: int) -> float:
  """Seconds per call of `steps` calls dispatched back to back, between two device syncs (what
  a training loop that never waits sees), after `warmup` calls."""
  out = None
  for _ in range(warmup):
    out = call()
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / steps


class StepCell:
  """The trainer's step at one (method, batch, attention, options): compiled, and run chained."""

  def __init__(self, c: dict, num_mix: int, batch: int, attention: Optional[str] = None,
               options: Optional[dict] = None):
    self.config = flops.step_config(c["backbone"], c["img_size"], c["window"], num_mix, batch,
                                    c["dtype"])
    self.plan = plan_lib.pretraining(self.config, sharding.make_mesh(),
                                     attention_impl=attention or "auto")
    self.state = jax.jit(self.plan.new_state, out_shardings=self.plan.state_sharding)(
        jax.random.PRNGKey(0))
    side = self.plan.input_size
    self.images = jax.jit(lambda k: jax.random.randint(k, (batch, side, side, 3), 0, 256).astype(
        jnp.uint8), out_shardings=self.plan.data_sharding)(jax.random.key(1))
    lowered = step_lib.jit_train_step(self.plan).lower(self.state, self.images)
    t = time.perf_counter()
    self.compiled = lowered.compile(compiler_options=options or None)
    self.compile_s = time.perf_counter() - t
    self.bytes = step_lib.step_bytes(self.compiled)
    self.batch, self.num_mix = batch, num_mix

  def one(self):
    self.state, metrics = self.compiled(self.state, self.images)
    return metrics["loss"]

  def seconds(self, steps: int, warmup: int) -> float:
    return chained_seconds(self.one, steps, warmup)

  def fields(self, seconds: float, flops_per_image: Optional[float]) -> dict:
    peak = report.peak_flops(jax.devices()[0].device_kind, self.config.dtype)
    rate = self.batch / seconds
    mfu = (flops_per_image * rate / jax.device_count() / peak
           if peak and flops_per_image else None)
    return dict(method=report.method_name(self.num_mix), batch=self.batch,
                step_ms=1e3 * seconds, images_per_sec=rate, mfu=mfu,
                step_bytes=self.bytes, peak_bytes=cells.device_peak_bytes(),
                compile_s=self.compile_s)

  def free(self) -> None:
    self.state = self.images = self.compiled = None
    gc.collect()  # the next cell's buffers take this one's device memory


def flops_per_image(c: dict, num_mix: int, batch: int) -> float:
  return flops.step_flops(flops.step_config(c["backbone"], c["img_size"], c["window"], num_mix,
                                            batch, c["dtype"])) / batch


def census(hlo_text: str) -> dict:
  """What the compiled program is made of: fusions by kind, library calls by target."""
  fusions: dict = {}
  for kind in re.findall(r"\bfusion\(.*?kind=(k\w+)", hlo_text):
    fusions[kind] = fusions.get(kind, 0) + 1
  calls: dict = {}
  for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    calls[target] = calls.get(target, 0) + 1
  entry = hlo_text[hlo_text.find("ENTRY"):]
  return dict(fusions=fusions, library_calls=calls,
              entry_instructions=len(re.findall(r"^\s+\S+ = ", entry, re.M)))


def op_kind(name: str) -> str:
  n = name.lower()
  if any(s in n for s in ("cublas", "gemm", "matmul", "dot", "cudnn", "conv")):
    return "matmul / library call"
  if any(s in n for s in ("all-reduce", "all-gather", "reduce-scatter", "nccl", "collective")):
    return "collective"
  if "copy" in n or "transpose" in n:
    return "copy / transpose"
  if "fusion" in n or "triton" in n or "loop" in n or "input_" in n:
    return "fusion"
  if "custom-call" in n or "custom_call" in n:
    return "other library call"
  return "other"


def trace_summary(trace_dir: str) -> dict:
  """Time by kind of op and the device-busy fraction of a jax.profiler trace: a GPU's 'XLA
  Ops' lines, or on a CPU the events that name an HLO op."""
  from jax.profiler import ProfileData
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    return {"trace": "no trace file written"}
  data = ProfileData.from_file(max(files, key=os.path.getmtime))
  events = []
  for plane in data.planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      for e in line.events:
        if on_device and line.name == "XLA Ops":
          events.append((e.name, e.start_ns, e.duration_ns))
        elif not on_device and any(k == "hlo_op" for k, _ in e.stats):
          events.append((e.name, e.start_ns, e.duration_ns))
  if not events:
    return {"trace": f"{files[0]}: no op events found"}
  by_kind: dict = {}
  for name, _, dur in events:
    by_kind[op_kind(name)] = by_kind.get(op_kind(name), 0.0) + dur / 1e6
  spans = sorted((s, s + d) for _, s, d in events)
  busy, end = 0.0, spans[0][0]
  for s, e in spans:
    if e > end:
      busy += e - max(s, end)
      end = e
  window = spans[-1][1] - spans[0][0]
  total = sum(by_kind.values())
  return dict(ms_by_kind={k: round(v, 3) for k, v in sorted(by_kind.items())},
              share_by_kind={k: v / total for k, v in by_kind.items()},
              device_busy_fraction=busy / window if window else None, op_events=len(events),
              trace_dir=trace_dir)


# ----------------------------------------------------------------------------- the phases


def environment(c: dict) -> dict:
  info = cells.device_info()
  dtype = jnp.bfloat16 if c["dtype"] == "bfloat16" else jnp.float32
  n = c["matmul"]
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  s = chained_seconds(lambda: matmul(a), 10, 2)
  x = jnp.ones((c["copy_mib"] * 2 ** 20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v[::-1])  # reads and writes every byte once
  t = chained_seconds(lambda: copy(x), 10, 2)
  return dict(**info, matmul=f"{n}x{n} {jnp.dtype(dtype).name}", matmul_flops_per_s=2 * n ** 3 / s,
              peak_flops=report.peak_flops(info["device_kind"], c["dtype"]),
              copy_bytes=x.nbytes, copy_bytes_per_s=2 * x.nbytes / t)


def step_phase(c: dict, probe: Probe) -> dict:
  cell = StepCell(c, 1, c["batch"])
  probe.compile_s = cell.compile_s
  seconds = cell.seconds(c["steps"], c["warmup"])
  probe.step_s = seconds
  fields = cell.fields(seconds, flops_per_image(c, 1, c["batch"]))
  fields["census"] = census(cell.compiled.as_text())
  # The split: the objective's forward alone, and its forward + backward, jitted like the step.
  p, params, images = cell.plan, cell.state.params, cell.images
  rng = jax.random.key(2)
  loss = lambda prm: p.loss_fn(prm, images, rng, True)[0]
  forward, backward = jax.jit(loss), jax.jit(jax.grad(loss))
  t_f = chained_seconds(lambda: forward(params), c["steps"], c["warmup"])
  t_fb = chained_seconds(lambda: jax.tree.leaves(backward(params))[0], c["steps"], c["warmup"])
  fields["split"] = dict(forward_ms=1e3 * t_f, backward_ms=1e3 * (t_fb - t_f),
                         optimizer_and_rest_ms=1e3 * (seconds - t_fb))
  trace_dir = os.path.join(probe.out, "trace")
  with jax.profiler.trace(trace_dir):
    for _ in range(3):
      out = cell.one()
    jax.block_until_ready(out)
  fields["profile"] = trace_summary(trace_dir)
  cell.free()
  return fields


def trainer_loop(c: dict, num_mix: int, batch: int) -> dict:
  """The trainer's loop over warmup + steps steps of synthetic batches drawn on the device:
  images/s over the steps after the warm-up, from its own log rows, and its host times."""
  from eesmm_jax import train
  config = flops.step_config(c["backbone"], c["img_size"], c["window"], num_mix, batch,
                             c["dtype"])
  warmup, steps = c["warmup"], c["steps"]
  with config.unlocked():
    config.total_steps = warmup + steps
    config.log_every = max(1, warmup)
    config.checkpoint_every = config.total_steps
    config.picture_every = 0
    config.data.synthetic_examples = batch * config.total_steps
  with tempfile.TemporaryDirectory() as workdir:
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress lines: the raw log
      train.pretrain(config, workdir)
    timed, seconds = metrics.timed_seconds(workdir, batch, after=warmup)
    host = metrics.host_ms_per_step(workdir, after=warmup)
  return dict(loop_images_per_sec=timed * batch / seconds, timed_steps=timed,
              host_ms_per_step=host)


def loop_phase(c: dict) -> dict:
  out = []
  for num_mix in (1, 3):
    cell = StepCell(c, num_mix, c["batch"])
    bare = c["batch"] / cell.seconds(c["steps"], c["warmup"])
    cell.free()
    row = dict(method=report.method_name(num_mix), batch=c["batch"], bare_images_per_sec=bare,
               **trainer_loop(c, num_mix, c["batch"]))
    row["loop_vs_bare"] = row["loop_images_per_sec"] / bare
    out.append(row)
  return {"cells": out}


def memory_limit() -> Optional[int]:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def batch_scaling_phase(c: dict) -> dict:
  limit = memory_limit()
  per_image = {n: flops_per_image(c, n, c["batch"]) for n in (1, 2, 3)}
  rows = []

  def measure(num_mix, batch, comparison):
    cell = StepCell(c, num_mix, batch)
    if limit and cell.bytes and cell.bytes > 0.9 * limit:
      cell.free()
      return None
    row = dict(comparison=comparison, **cell.fields(cell.seconds(c["steps"], c["warmup"]),
                                                     per_image[num_mix]))
    cell.free()
    rows.append(row)
    return row

  batch, best = c["batch"], None
  while batch <= c["max_batch"]:
    row = measure(1, batch, "SimMIM batch sweep")
    if row is None:
      break
    best = row if best is None or row["images_per_sec"] > best["images_per_sec"] else best
    batch *= 2
  base = next(r for r in rows if r["batch"] == c["batch"])
  for n in (2, 3):
    for comparison, b in (("equal batch", c["batch"]), ("equal memory", n * c["batch"])):
      row = measure(n, b, comparison)
      if row is not None:
        row["vs_simmim_images_per_sec"] = row["images_per_sec"] / base["images_per_sec"]
  return dict(rows=rows, best_simmim_batch=best and best["batch"], memory_limit_bytes=limit)


def attention_phase(c: dict) -> dict:
  rows = []
  for impl in c["attention"]:
    try:
      cell = StepCell(c, 1, c["batch"], attention=impl)
      rows.append(dict(attention=impl, **cell.fields(cell.seconds(c["steps"], c["warmup"]),
                                                     None)))
      cell.free()
    except Exception as e:  # noqa: BLE001 - a form that does not apply here is a result
      rows.append(dict(attention=impl, status=f"failed: {type(e).__name__}: "
                                              f"{str(e).splitlines()[0][:200]}"))
  return {"rows": rows}


def flags_phase(c: dict) -> dict:
  rows = []
  for name, options in (("default", {}),) + tuple(c["flags"]):
    try:
      cell = StepCell(c, 1, c["batch"], options=options)
      rows.append(dict(flags=name, options=options,
                       **cell.fields(cell.seconds(c["steps"], c["warmup"]), None)))
      cell.free()
    except Exception as e:  # noqa: BLE001 - an option this XLA does not know is a result
      rows.append(dict(flags=name, options=options,
                       status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
  base = rows[0].get("step_ms")
  for r in rows:
    if base and r.get("step_ms"):
      r["vs_default"] = base / r["step_ms"]
  return {"rows": rows}


def input_phase(c: dict) -> dict:
  from eesmm_jax import data
  from eesmm_jax.data import shards
  b, size = c["input_batch"], c["img_size"]
  config = data.default_data_config()
  config.update(dataset="synthetic", img_size=size, synthetic_examples=10 ** 6)

  def rate(it, n=10):
    jax.block_until_ready(next(it)["image"])
    t = time.perf_counter()
    for _ in range(n):
      out = next(it)["image"]
    jax.block_until_ready(out)
    return n * b / (time.perf_counter() - t), 1e3 * (time.perf_counter() - t) / n

  host_rate, host_ms = rate(data.create_pretrain_iterator(config, b, process_index=0,
                                                          process_count=1))
  mesh = sharding.make_mesh()
  dev = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  device_rate, device_ms = rate(data.create_pretrain_iterator(config, b, sharding=dev))
  with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    stored = round(size * 4 / 3)
    source = shards.ArraySource(rng.integers(0, 256, (4 * b, stored, stored, 3), np.uint8),
                                name="probe")
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the probe's
      shards.write_shards(source, d, img_size=size, stored_size=stored, form="raw",
                          shard_size=b)
    sc = data.default_data_config()
    sc.update(dataset="shards", data_dir=d, img_size=size)
    shard_rate, shard_ms = rate(data.create_pretrain_iterator(sc, b, process_index=0,
                                                              process_count=1))
  return dict(batch=b, img_size=size, cpu_cores=len(os.sched_getaffinity(0)),
              synthetic_host=dict(images_per_sec=host_rate, ms_per_batch=host_ms),
              synthetic_device=dict(images_per_sec=device_rate, ms_per_batch=device_ms),
              shards_raw=dict(images_per_sec=shard_rate, ms_per_batch=shard_ms))


# ----------------------------------------------------------------------------- report


def _fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def markdown(preset: str, results: dict) -> str:
  lines = [f"# GPU probe ({preset})", ""]
  env = results.get("environment", {})
  if env.get("status") == "ok":
    lines += [f"{env['device']}, JAX {env['jax_version']}, {env['host']}, {env['date']}. "
              f"Matmul {env['matmul']}: {env['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s "
              f"(datasheet {_fmt(env['peak_flops'] and env['peak_flops'] / 1e12)}); device copy "
              f"{env['copy_bytes_per_s'] / 1e9:.0f} GB/s.", ""]
  lines += ["| phase | status | seconds |", "|---|---|---|"]
  lines += [f"| {k} | {v['status']} | {_fmt(v.get('seconds'))} |" for k, v in results.items()]
  step = results.get("step", {})
  if step.get("status") == "ok":
    s = step["split"]
    lines += ["", f"Step: {step['method']} at batch {step['batch']}: {step['step_ms']:.2f} ms, "
              f"{step['images_per_sec']:.0f} img/s, MFU {_fmt(step['mfu'], '.1%')}; forward "
              f"{s['forward_ms']:.2f} ms, backward {s['backward_ms']:.2f}, optimizer and rest "
              f"{s['optimizer_and_rest_ms']:.2f}; compile {step['compile_s']:.0f} s.",
              f"Census: {step['census']}", f"Profile: {step['profile']}"]
  rows = []
  for r in results.get("loop", {}).get("cells", []):
    rows.append(f"| loop | {r['method']} | {r['batch']} | {r['bare_images_per_sec']:.0f} bare, "
                f"{r['loop_images_per_sec']:.0f} loop ({r['loop_vs_bare']:.3f}) | "
                f"{r['host_ms_per_step']} |")
  for r in results.get("batch_scaling", {}).get("rows", []):
    rows.append(f"| {r['comparison']} | {r['method']} | {r['batch']} | "
                f"{r['images_per_sec']:.0f} img/s, MFU {_fmt(r['mfu'], '.1%')}, "
                f"x{_fmt(r.get('vs_simmim_images_per_sec'), '.2f')} | "
                f"{_fmt(r['step_bytes'] and r['step_bytes'] / 2 ** 20, '.0f')} MiB |")
  for phase, key in (("attention", "attention"), ("flags", "flags")):
    for r in results.get(phase, {}).get("rows", []):
      rows.append(f"| {phase} | {r[key]} | {r.get('batch', '-')} | "
                  f"{_fmt(r.get('step_ms'), '.2f')} ms {r.get('status', '')} | "
                  f"x{_fmt(r.get('vs_default'), '.3f')} |")
  if rows:
    lines += ["", "| what | cell | batch | result | more |", "|---|---|---|---|---|"] + rows
  inp = results.get("input", {})
  if inp.get("status") == "ok" and "batch" in inp:
    lines += ["", "Input at batch {batch}, {img_size} px, {cpu_cores} cores: ".format(**inp) +
              "; ".join(f"{k} {v['images_per_sec']:.0f} img/s ({v['ms_per_batch']:.2f} ms a "
                        f"batch)" for k, v in inp.items() if isinstance(v, dict))]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.gpu_probe",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
  parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
  parser.add_argument("--deadline", type=float, help="seconds (default: the preset's)")
  args = parser.parse_args(argv)
  phases = args.phases.split(",")
  unknown = sorted(set(phases) - set(PHASES))
  if unknown:
    parser.error(f"--phases: unknown {unknown}; choose from {list(PHASES)}")
  c = PRESETS[args.preset]
  probe = Probe(args.out, args.preset, args.deadline or c["deadline"])
  compiles = lambda n: n * probe.compile_s + n * (c["steps"] + c["warmup"]) * probe.step_s * 3
  estimates = {"environment": lambda: 5.0,
               "step": lambda: 3 * probe.compile_s + 5 * c["steps"] * probe.step_s + 10,
               "loop": lambda: compiles(4),
               "batch_scaling": lambda: compiles(4 + 3) + 3 * probe.compile_s,
               "attention": lambda: compiles(len(c["attention"])),
               "flags": lambda: compiles(1 + len(c["flags"])),
               "input": lambda: 10.0}
  fns = {"environment": lambda: environment(c), "step": lambda: step_phase(c, probe),
         "loop": lambda: loop_phase(c), "batch_scaling": lambda: batch_scaling_phase(c),
         "attention": lambda: attention_phase(c), "flags": lambda: flags_phase(c),
         "input": lambda: input_phase(c)}
  for name in PHASES:
    if name in phases:
      probe.run(name, estimates[name](), fns[name])
  print(f"wrote {args.out}/probe.json and probe.md in {time.perf_counter() - probe.start:.0f} s",
        flush=True)


if __name__ == "__main__":
  from eesmm_jax import cli
  cli.run_main(main)
