"""What a run reports: the console progress line, TensorBoard (clu's writer) and metrics.jsonl."""
from __future__ import annotations

import json
import os
import time

import jax

from eesmm_jax import sharding


class _NoWriter:
  """Stands in for clu's writer where clu (and so TensorBoard output) is not installed."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def close(self):
    pass


def summary_writer(workdir: str):
  """clu's TensorBoard writer on process 0; without clu, one warning and none."""
  if not sharding.is_lead():
    return _NoWriter()
  try:
    from clu import metric_writers
  except ImportError:
    print("warning: clu is not installed, so no TensorBoard output; metrics.jsonl has every "
          "logged value", flush=True)
    return _NoWriter()
  return metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps metrics.jsonl rows up to `step`: those after it belong to steps a resume redoes."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


class MetricsLog:
  """Console progress line, TensorBoard (clu writer) and `<workdir>/metrics.jsonl`, whose rows
  after the step a run resumes from are dropped (the resume logs those steps again)."""

  def __init__(self, workdir: str, total: int, global_batch: int, num_devices: int,
               start: int = 0):
    self.lead = sharding.is_lead()
    self.writer = summary_writer(workdir)
    self.jsonl = None
    if self.lead:
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_rows_after(path, start)
      self.jsonl = open(path, "a")
    self.total, self.global_batch, self.num_devices = total, global_batch, num_devices
    self.start(start)

  def start(self, step: int):
    self.last_step, self.last_time = step, time.perf_counter()

  def write_row(self, step: int, row: dict) -> None:
    """One row to TensorBoard and metrics.jsonl (the console line is the caller's)."""
    self.writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
    if self.lead:
      self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
      self.jsonl.flush()

  def write(self, step: int, metrics: dict) -> dict:
    now = time.perf_counter()
    rate = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
    row.update(images_per_sec=rate, images_per_sec_per_device=rate / self.num_devices)
    self.write_row(step, row)
    if self.lead:
      eta = (self.total - step) * self.global_batch / max(rate, 1e-9)
      print(f"step {step:>7d}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
            f"{rate:8.1f} img/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
    return {"step": step, **row}

  def close(self):
    self.writer.close()
    if self.jsonl:
      self.jsonl.close()
