"""What a run reports: the console progress line, TensorBoard (clu's writer) and metrics.jsonl."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

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


def _row_step(line: str):
  """The step of a metrics.jsonl row, or None where the line is not a whole row (a torn write)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  step = row.get("step") if isinstance(row, dict) else None
  return step if isinstance(step, int) else None


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps metrics.jsonl rows up to `step`: those after it belong to steps a resume redoes.
  A line that is not a whole row (the last one, torn by a full disk or a kill mid-write) is
  dropped, with one line saying so: it is a row the resume logs again or an unreadable one."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  kept, torn = [], []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    row_step = _row_step(line)
    if row_step is None:
      torn.append(number)
    elif row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")  # the next row starts a line
  if torn:
    which = (f"its last line ({len(lines[-1])} bytes)" if torn == [len(lines)] else
             f"{len(torn)} line(s) ({', '.join(map(str, torn[:5]))}"
             f"{' ...' if len(torn) > 5 else ''})")
    sharding.say(f"{path}: dropped {which}, not a whole row (a write cut short, e.g. by a full "
                 f"disk or a kill); the resume logs its steps again")
  if kept != lines:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)


def timed_seconds(workdir: str, batch_size: int, after: int = 1) -> tuple[int, float]:
  """(steps, seconds) of a pretraining run's timed steps, from the rates its metrics.jsonl rows
  logged: each row's images/s covers the steps since the previous row. The trainer times from
  the end of its first step (which compiles), so step 1 is not among them; a step logged again
  after a resume counts once (its last row); a torn line is left out."""
  rates = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
    for line in f:
      step = _row_step(line)
      if step is not None:
        rates[step] = json.loads(line).get("images_per_sec")
  seconds, last = 0.0, after
  for step in sorted(s for s in rates if s > after and rates[s]):
    seconds += (step - last) * batch_size / rates[step]
    last = step
  return last - after, seconds


def host_ms_per_step(workdir: str, after: int = 1) -> dict:
  """{'host_make_ms': median, ...} of the host times the loop logged (`step.HostTimes`) over
  its rows after step `after`; {} when it logged none."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
    for line in f:
      step = _row_step(line)
      if step is not None and step > after and '"host_' in line:
        rows.append(json.loads(line))
  keys = sorted({k for r in rows for k in r if k.startswith("host_")})
  return {k: statistics.median(r[k] for r in rows if k in r) for k in keys}


class OutputError(RuntimeError):
  """An output of the run (metrics.jsonl, TensorBoard events, a picture) could not be written:
  the run stopped with a checkpoint (the message names the file, the cause and the step)."""


def _is_write_error(e: BaseException) -> bool:
  """An I/O error of a write: OSError (ENOSPC, EIO, ...), or TensorFlow's for its event files."""
  if isinstance(e, OSError):
    return True
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None) if tf is not None else None
  return errors is not None and isinstance(e, errors.OpError)


def _cause(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = str(getattr(e, "message", "") or e).strip()
  return text.splitlines()[0] if text else type(e).__name__


class MetricsLog:
  """Console progress line, TensorBoard (clu writer) and `<workdir>/metrics.jsonl`, whose rows
  after the step a run resumes from are dropped (the resume logs those steps again).

  A write that fails (a full disk, an I/O error) is recorded, not raised: the loop stops at its
  step boundary with a checkpoint (`workdir.Run.save`), and nothing more is written meanwhile."""

  def __init__(self, workdir: str, total: int, global_batch: int, num_devices: int,
               start: int = 0):
    self.lead = sharding.is_lead()
    self.failure = None  # (step, what, error) of the first write that failed
    self.writer = summary_writer(workdir)
    self.events = f"the TensorBoard events in {os.path.join(workdir, 'tensorboard')}"
    self.path, self.jsonl = os.path.join(workdir, "metrics.jsonl"), None
    if self.lead:
      _drop_rows_after(self.path, start)
      self.jsonl = open(self.path, "a", encoding="utf-8")
    self.total, self.global_batch, self.num_devices = total, global_batch, num_devices
    self.start(start)

  def start(self, step: int):
    self.last_step, self.last_time = step, time.perf_counter()

  def attempt(self, step: int, what: str, write: Callable[[], Any]) -> None:
    """`write()`, unless an output failed already; an I/O error it raises is recorded."""
    if self.failure is not None:
      return
    try:
      write()
    except Exception as e:  # noqa: BLE001 - sorted: only write errors are recorded
      if not _is_write_error(e):
        raise
      self.failure = (step, what, e)

  def failure_error(self, outcome: str) -> OutputError:
    """The recorded failure as one line, `outcome` saying what was kept."""
    step, what, e = self.failure
    return OutputError(f"writing {what} failed at step {step}: {_cause(e)}; {outcome}: free "
                       f"space (or fix the disk) and the same command resumes from it")

  def write_row(self, step: int, row: dict) -> None:
    """One row to TensorBoard and metrics.jsonl (the console line is the caller's)."""
    self.attempt(step, self.events,
                 lambda: self.writer.write_scalars(step, {k: v for k, v in row.items()
                                                          if k != "step"}))
    if self.lead:
      def append():
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
      self.attempt(step, self.path, append)

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
    """Flushes and closes; what a failed disk still refuses is recorded, not raised."""
    for what, close in ((self.events, self.writer.close),
                        (self.path, self.jsonl.close if self.jsonl else None)):
      if close is None:
        continue
      try:
        close()
      except Exception as e:  # noqa: BLE001 - as `attempt`, after an earlier failure too
        if not _is_write_error(e):
          raise
        if self.failure is None:
          self.failure = (self.last_step, what, e)
    self.jsonl = None
