"""The benchmark's grid and command line: presets and flags resolved, the cells of each backbone
and size timed in turn in this process or interleaved in processes of their own, the report
rewritten after every cell."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax

from eesmm_jax import masking, ops, plan
from eesmm_jax import step as step_lib
from eesmm_jax.tools import flops
from eesmm_jax.tools.benchmark import cells as cells_lib
from eesmm_jax.tools.benchmark import report

PRESETS = {
    "cpu-small": dict(backbones=("swin_mini",), sizes=((192, 6), (224, 7)), methods=(1, 2, 3),
                      batch=12, steps=6, warmup=2, dtype="float32", torch=("eager",),
                      time_budget=0, interleave=True),
    # One H100/H200/A100 (bf16) or V100 (fp16). Swin-B's 10 cells took about 14 min on an
    # H200 (launch/benchmark_gpu.sh); --time_budget skips (and lists) the cells past it.
    "gpu": dict(backbones=("swin_base", "swin_large"), sizes=((192, 6), (224, 7)),
                methods=(1, 2, 3), batch={"swin_base": 96, "swin_large": 48}, steps=60,
                warmup=10, dtype="auto", torch=("eager", "compile"), time_budget=0,
                interleave=False),
}

METHOD_NAMES = {"simmim": 1, "eesmm2": 2, "eesmm3": 3}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.benchmark", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
  p.add_argument("--out", required=True, help="directory for timing.json, .md, .png")
  p.add_argument("--methods", help=f"comma list of {sorted(METHOD_NAMES)} (default: preset's)")
  p.add_argument("--backbones", help=f"comma list of {sorted(flops.BACKBONES)}")
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
    names = [m.strip() for m in args.methods.split(",")]
    for m in names:
      if m not in METHOD_NAMES:
        raise SystemExit(f"--methods: {m!r} is unknown; choose from {sorted(METHOD_NAMES)}")
    preset["methods"] = tuple(METHOD_NAMES[m] for m in names)
  if args.backbones:
    preset["backbones"] = tuple(b.strip() for b in args.backbones.split(","))
    for b in preset["backbones"]:
      if b not in flops.BACKBONES:
        raise SystemExit(f"unknown backbone {b!r}; choose from {sorted(flops.BACKBONES)}")
  if args.sizes:
    preset["sizes"] = tuple(parse_size(s) for s in args.sizes.split(","))
  for key in ("batch", "steps", "warmup", "dtype", "time_budget", "interleave"):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  if args.torch:
    preset["torch"] = () if args.torch == "none" else tuple(args.torch.split(","))
  for key, least in (("batch", 1), ("steps", 1), ("warmup", 0)):
    value = getattr(args, key)
    if value is not None and value < least:
      raise SystemExit(f"--{key} {value}: must be >= {least}")
  if preset["dtype"] == "auto":
    preset["dtype"] = cells_lib.auto_dtype()
  return preset


def check_grid(grid: dict, num_devices: int) -> None:
  """Every JAX cell's config checked as the trainer checks it (sizes the model and the masks
  divide, the batch over n x devices), before anything compiles: one line naming the cell's
  flag values and what is wrong."""
  for backbone in grid["backbones"]:
    batch = grid["batch"][backbone] if isinstance(grid["batch"], dict) else grid["batch"]
    for img_size, window in grid["sizes"]:
      for n in grid["methods"]:
        config = flops.step_config(backbone, img_size, window, n, batch, grid["dtype"])
        try:
          plan.check_run_config(config)
          encoder = step_lib.create_encoder(config, num_classes=0, use_mask_token=True)
          masking.check_mask_args(img_size, config.objective.mask_patch_size,
                                  encoder.patch_size, config.objective.mask_ratio)
        except ValueError as e:
          raise SystemExit(f"--sizes {img_size}/{window} ({backbone}): {e}") from None
        if batch % (n * num_devices):
          raise SystemExit(f"--batch {batch}: {report.method_name(n)} needs a multiple of n x "
                           f"devices = {n} x {num_devices}")


def _cell(framework: str, impl: str, num_mix: int, remat: str, backbone: str, img_size: int,
          window: int, batch: int, grid: dict, args: argparse.Namespace):
  """(one_step, finish) of one cell of the grid, compiled and warmed up."""
  if framework == "jax":
    return cells_lib.jax_cell(backbone, img_size, window, num_mix, batch, grid["dtype"], grid["warmup"],
                    args.data, args.data_dir,
                    None if args.attention == "auto" else args.attention, remat, args.loop)
  from eesmm_jax.tools.benchmark import torch_ref  # PyTorch: only for its cells
  return torch_ref.torch_cell(backbone, img_size, window, batch, grid["dtype"], impl.split("-")[1],
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
  check_grid(grid, jax.device_count())
  if grid["torch"] and not grid["interleave"]:
    # timm (through torchvision) must be imported before TensorFlow, which the trainer's input
    # pipeline imports: the other order segfaults inside torchvision's import.
    import timm.models.swin_transformer  # noqa: F401
  meta = cells_lib.device_info()
  command = "python -m eesmm_jax.tools.benchmark " + " ".join(argv if argv is not None else
                                                         sys.argv[1:])
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
      group = [dict(framework=framework, impl=impl, method=report.method_name(n), num_mix=n,
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
            times = cells_lib.timed_steps(one_step, grid["steps"], 0)
            chained = getattr(one_step, "chained", None)
            chained_s = chained(grid["steps"]) if chained else None
            cell.update(finish(times))
            if chained_s:
              cell.update(chained_step_time_s=chained_s,
                          chained_images_per_sec=batch / chained_s)
            cell["status"] = "ok"
          except Exception as e:  # an OOM or unsupported cell must not lose the others
            cell["status"] = _error(e)
          last_cost = time.perf_counter() - t
        cells.append(cell)
        if cell["status"] == "ok":
          print(f"{backbone} {img_size}/{window} {cell['method']:10s} {cell['impl']:13s} "
                f"{cell['step_time_s'] * 1e3:9.1f} ms/step {cell['images_per_sec']:9.2f} img/s "
                f"compile {cell['compile_time_s']:.1f} s" + (
                    f"; chained {cell['chained_step_time_s'] * 1e3:.1f} ms/step"
                    if cell.get("chained_step_time_s") else ""), flush=True)
        else:
          print(f"{backbone} {img_size}/{window} {cell['method']} {cell['impl']}: "
                f"{cell['status']}", flush=True)
        report.write_outputs(args.out, cells, meta, command)
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
