"""The benchmark's report: fields derived across cells (MFU, ratios measured in one run, the
paper's numbers), timing.json, timing.md and timing.png."""

from __future__ import annotations

import json
import os
from typing import Optional

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

def method_name(n: int) -> str:
  return "SimMIM" if n == 1 else f"EESMM n={n}"



def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Per-device dense peak for the compute dtype, or None ('unknown': CPUs, unlisted chips).
  The longest matching name wins ('H100 PCIe' before 'H100')."""
  kind = device_kind.upper()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.upper() in kind:
      return PEAK_FLOPS[name].get(dtype)
  return None


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


