"""A training run's hold on its workdir, shared by pretraining and fine-tuning.

    with workdir.Run(plan, init) as run:          # lock, config.json, restore (or init), log
      state = run.state
      for step in range(run.start + 1, last + 1):
        state, metrics = train_step(state, next(batches))
        logged, periodic, stop = run.boundary(step, last, metrics)
        ...
        if run.save(state, step, periodic, stop):
          break

What it guarantees, and the choice made where there was one:
- One writer per workdir: a `flock` on `<workdir>/run.lock`, which names its holder's host and
  pid. The kernel drops the lock when its process dies, however it dies, so a kill -9 leaves
  nothing stale and the same command resumes (a pid file would need a liveness guess).
- The config a workdir's checkpoints were written under is kept in `<workdir>/config.json`. A
  resume prints every key that changed, and refuses changes that make it wrong (the model's
  shape, image size, batch size, objective, mode) unless `config.resume_allow` names them.
- Restore takes the newest checkpoint that restores. One that does not (a truncated array file,
  lost metadata) is moved to `<workdir>/bad_checkpoints/<step>` with one line saying why: kept
  for inspection, never deleted, and out of the way of the step's next save. Orbax itself,
  big_vision and MaxText restore the latest step or fail; falling back costs at most the steps
  since the save before, which a resume recomputes exactly.
- A save that cannot complete (disk full, or any I/O error, found before writing when the free
  space is short, else where Orbax reports it) stops the run with one line naming the path and
  the cause; the half-written temporary folder is removed and the previous checkpoint restores.
- SIGTERM, and Ctrl-C, stop the run at the next step boundary with a checkpoint; a second
  Ctrl-C aborts at once.
- Finiteness is checked without a device-to-host read per step (`FiniteWatch`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eesmm_jax import core

# Config keys (or groups: "objective" is every objective.* key) whose change makes a resume
# wrong: the model's shapes, the data position (step x batch size) or the loss would no longer
# be the run's. Others (lr, steps, remat, micro_batches, dtype, ...) are printed and allowed.
RESUME_FIXED = ("model.name", "model.embed_dim", "model.depths", "model.num_heads",
                "model.patch_size", "model.window_size", "img_size", "batch_size", "objective",
                "mode")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read; the message is one line."""


def _lead() -> bool:
  return jax.process_index() == 0


def _say(message: str) -> None:
  if _lead():
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# One writer per workdir.


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/run.lock` (process 0 of a run holds it)."""

  def __init__(self, workdir: str):
    self.file = None
    if not _lead():
      return
    path = os.path.join(workdir, "run.lock")
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        f.close()
        raise
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise RuntimeError(f"--workdir {workdir!r} is in use by a run ({holder}): one run writes "
                         f"a workdir at a time; wait for it or stop it, or use another --workdir")
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    f.flush()
    self.file = f

  def release(self) -> None:
    if self.file:
      self.file.truncate(0)
      self.file.close()  # closing drops the flock
      self.file = None


# ----------------------------------------------------------------------------------------------
# The config a workdir was written under.


def flat_config(config) -> dict:
  """{'model.embed_dim': 128, ...}, as JSON reads it back (tuples become lists)."""
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from walk(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}", v
  return json.loads(json.dumps(dict(walk(config.to_dict(), "")), default=str))


def write_json_atomically(path: str, value) -> None:
  """Written beside and renamed: a kill leaves the old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def record_config(workdir: str, config) -> None:
  """Writes `<workdir>/config.json`: the config the checkpoints from now on are written under."""
  if _lead():
    write_json_atomically(os.path.join(workdir, "config.json"),
                          dict(sorted(flat_config(config).items())))


def check_resume_config(workdir: str, config, step: int) -> None:
  """Compares `config` with the one the workdir's checkpoints were written under: prints the
  keys that changed, and refuses a change of a RESUME_FIXED key not named in
  `config.resume_allow`. A workdir from before config.json was kept is resumed as it is."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = flat_config(config)
  changed = sorted(k for k in set(saved) | set(current)
                   if saved.get(k) != current.get(k) and k != "resume_allow")
  if not changed:
    return
  _say(f"resuming {workdir} at step {step} with changed config: " + "; ".join(
      f"{k} {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}" for k in changed))
  allowed = {k.strip() for k in (config.get("resume_allow") or "").split(",") if k.strip()}
  refused = [k for k in changed if {k, k.split(".")[0]} & set(RESUME_FIXED)
             and not {k, k.split(".")[0]} & allowed]
  if refused:
    raise ValueError(
        f"the checkpoint at step {step} in {workdir} was written with other values of "
        f"{', '.join(refused)} (see config.json there); resuming under them would not continue "
        f"that run: use the old values, another --workdir, or "
        f"--config.resume_allow={','.join(refused)} to resume anyway")


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Async Orbax saves into <workdir>/checkpoints, keeping the last `keep`. A save is written to
  a temporary directory and renamed when complete, so a kill never leaves a half checkpoint
  that a restart would pick up."""
  return ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{"['params']['encoder']['norm']['scale']": shape}: `keystr` with simple keys spells dict
  keys and dataclass fields alike, so a saved checkpoint's metadata and the state compare."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_checkpoint_fits(metadata, state_shapes, where: str) -> None:
  """Refuses a checkpoint of another model or shape before anything is loaded."""
  saved, wanted = _leaf_shapes(metadata), _leaf_shapes(state_shapes)
  for key, shape in wanted.items():
    if key not in saved:
      raise ValueError(f"the checkpoint {where} does not fit this config: it has no {key} "
                       f"(the model expects shape {shape}); it was written by another model "
                       f"or objective: use another --workdir, or the config that wrote it")
    if saved[key] != shape:
      raise ValueError(f"the checkpoint {where} does not fit this config: first mismatch at "
                       f"{key}: checkpoint shape {saved[key]}, model expects {shape}")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise ValueError(f"the checkpoint {where} does not fit this config: it holds "
                     f"{extra[:5]} that the model does not have")


def _first_line(e: BaseException) -> str:
  """An exception's cause in one line (TensorStore's messages run over many)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  text = text.split(" See full TensorStore details")[0]
  return text if len(text) <= 300 else text[:297] + "..."


def _set_aside(manager, step: int, why: str) -> None:
  """Moves an unrestorable checkpoint to <workdir>/bad_checkpoints/<step>, saying so."""
  directory = str(manager.directory)
  workdir = os.path.dirname(directory)
  if _lead():
    dest = os.path.join(workdir, "bad_checkpoints", str(step))
    suffix = 1
    while os.path.exists(dest):
      dest, suffix = os.path.join(workdir, "bad_checkpoints", f"{step}.{suffix}"), suffix + 1
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.rename(os.path.join(directory, str(step)), dest)
    print(f"skipped the checkpoint at step {step} in {directory}: it does not restore ({why}); "
          f"moved to {dest}, trying the one before", flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
  manager.reload()


def restore_or_init(manager, state_shapes, state_sharding, init,
                    on_resume: Callable[[int], None] = lambda step: None):
  """The newest checkpoint that restores, onto this run's shardings (which also reshards one
  saved on another number of devices, or with(out) FSDP); else `init()`.

  A checkpoint of another model is an error (its older ones would be too); an unreadable one is
  set aside and the one before tried. `on_resume(step)` runs before a checkpoint is loaded.
  """
  where = os.path.dirname(str(manager.directory))
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      state_shapes, state_sharding)
  tried = []
  for step in sorted(manager.all_steps(), reverse=True):
    tried.append(step)
    try:
      metadata = manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata: corrupt
      _set_aside(manager, step, f"metadata unreadable: {_first_line(e)}")
      continue
    if metadata is None or not _leaf_shapes(metadata):
      _set_aside(manager, step, "its metadata (_METADATA) is missing")
      continue
    check_checkpoint_fits(metadata, state_shapes, f"at step {step} in {where}")
    on_resume(step)
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - the arrays do not read back: corrupt
      _set_aside(manager, step, _first_line(e))
      continue
    logging.info("resumed from %s at step %d", manager.directory, int(state.step))
    return state
  if tried:
    raise CheckpointError(f"none of the checkpoints in {manager.directory} restores (steps "
                          f"{tried}, each moved to {where}/bad_checkpoints): move them back "
                          f"or away; the same command then starts from step 0")
  return init()


def last_good(manager) -> str:
  step = manager.latest_step()
  if step is None:
    return "No checkpoint was saved yet."
  return f"The last good checkpoint (step {step}) is kept in {manager.directory}."


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


class Checkpoints:
  """The manager, with saves that stop the run when they cannot complete: before writing when
  the disk cannot hold one more checkpoint, else as soon as Orbax reports the failed write (at a
  step boundary, or at the next save, which waits for the one before)."""

  def __init__(self, manager, state_bytes: int):
    self.manager, self.state_bytes = manager, state_bytes
    self.directory = str(manager.directory)
    self.pending = None  # the step of a save that may still be writing
    self.failed = False

  def _failed(self, step, e: BaseException) -> CheckpointError:
    self.failed = True
    try:
      self.manager.wait_until_finished()  # an earlier save still in flight completes
    except Exception:  # noqa: BLE001 - its error is this one, or reported with it
      pass
    for d in os.listdir(self.directory) if _lead() else ():
      if "orbax-checkpoint-tmp" in d:  # the half-written save: never restored, only in the way
        shutil.rmtree(os.path.join(self.directory, d), ignore_errors=True)
    if isinstance(e, OSError) and e.strerror:
      cause = e.strerror
    elif "No space left on device" in str(e):  # TensorStore's message, many lines long
      cause = "No space left on device"
    else:
      cause = _first_line(e)
    self.manager.reload()
    return CheckpointError(f"saving the checkpoint at step {step} to {self.directory} failed: "
                           f"{cause}. {last_good(self.manager)} The same command resumes from "
                           f"it.")

  def check(self, wait: bool = False) -> None:
    """Raises the failure of the pending asynchronous save (`wait`: once it is done)."""
    if self.pending is None:
      return
    try:
      if wait:
        self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - any failed write
      raise self._failed(self.pending, e) from None
    if wait:
      self.pending = None

  def _check_space(self, step: int) -> None:
    """Refuses a save that cannot fit before writing anything: Orbax writes a new checkpoint
    before it deletes the oldest, about as large as the last one (or the state's arrays)."""
    done = [int(d) for d in os.listdir(self.directory) if d.isdigit()]
    need = max(self.state_bytes, _dir_bytes(os.path.join(self.directory, str(max(done))))
               if done else 0)
    free = shutil.disk_usage(self.directory).free
    if free < 1.1 * need:
      raise self._failed(step, OSError(
          errno.ENOSPC, f"No space left on device: {free / 2**20:.1f} MiB free, a checkpoint "
          f"takes about {need / 2**20:.1f} MiB"))

  def save(self, state, step: int, force: bool = False) -> None:
    self.check(wait=True)  # Orbax's save would wait for it too
    self._check_space(step)
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001 - any failed write
      raise self._failed(step, e) from None
    self.pending = step

  def close(self, quiet: bool = False) -> None:
    """Waits for a pending save; `quiet` (the run is already failing): raises nothing more."""
    try:
      if not self.failed:
        self.check(wait=True)
    except Exception:  # noqa: BLE001
      if not quiet:
        raise
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - a failed save's error, already reported
        if not (quiet or self.failed):
          raise


# ----------------------------------------------------------------------------------------------
# Stopping at a step boundary.


class Preemption:
  """SIGTERM or Ctrl-C (or JAX's preemption notice on several processes) -> stop at a step
  boundary with a checkpoint; a second Ctrl-C aborts at once.

  Several processes must stop at the same step, so there we use JAX's preemption sync point,
  which agrees on the step through the distributed runtime; one process catches the signals.
  """

  def __init__(self):
    self.requested = threading.Event()
    self.label = "preempted (SIGTERM)"
    self.multiprocess = jax.process_count() > 1
    self.previous = {}
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self.previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, sig, frame):
    if sig == signal.SIGINT and self.requested.is_set():
      raise KeyboardInterrupt  # the second Ctrl-C
    if sig == signal.SIGINT:
      self.label = "stopped (Ctrl-C)"
      print("\nCtrl-C: stopping at the next step boundary with a checkpoint (Ctrl-C again "
            "aborts now)", flush=True)
    self.requested.set()

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested.is_set()

  def close(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


class FiniteWatch:
  """Checks that steps were finite without a device-to-host read per step: the few scalars of
  each step stay on the device until `check`, at log, checkpoint and preemption steps.

  A non-finite step leaves params and optimizer state untouched (`core.make_train_step`), so
  running on to the next check changes nothing that is kept; the check comes before any save,
  so a non-finite step is never saved, and it names the first bad step. fp32/bf16 stop on it;
  fp16 skips it (dynamic loss scaling) and stops after `max_skipped` in a row.
  """
  KEYS = ("finite", "loss", "grad_norm", "skipped_in_a_row", "loss_scale")

  def __init__(self, manager, max_skipped: int, fp16: bool):
    self.manager, self.max_skipped, self.fp16 = manager, max_skipped, fp16
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, {k: metrics[k] for k in self.KEYS if k in metrics}))

  def check(self) -> None:
    rows, self.pending = jax.device_get(self.pending), []
    for step, m in rows:
      if not m["finite"] and not self.fp16:
        raise core.NonFiniteError(
            f"step {step}: the loss or the gradients are not finite (loss {float(m['loss'])}, "
            f"grad norm {float(m['grad_norm'])}); stopping. {last_good(self.manager)} Try a "
            f"lower optim.base_lr, or dtype 'float32'.")
      if m["skipped_in_a_row"] > self.max_skipped:
        raise core.NonFiniteError(
            f"step {step}: {int(m['skipped_in_a_row'])} fp16 steps in a row overflowed (loss "
            f"scale now {float(m['loss_scale']):g}): the loss itself is not finite, not just "
            f"the fp16 range. {last_good(self.manager)} Try dtype 'bfloat16' or 'float32', or "
            f"a lower lr.")


# ----------------------------------------------------------------------------------------------
# Metrics.


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
  if not _lead():
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
    self.lead = _lead()
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


# ----------------------------------------------------------------------------------------------
# The run.


class Run:
  """Opens a planned run's workdir: lock, config check, restore (or `init()`), metrics log,
  signals; `close` (or leaving the `with`) finishes pending saves and releases them all."""

  def __init__(self, plan, init: Callable[[], core.TrainState]):
    config, self.workdir = plan.config, plan.workdir
    self.config, self.total = config, plan.total_steps
    self.lock = WorkdirLock(self.workdir)
    self.checkpoints = self.log = self.preemption = None
    try:
      manager = checkpoint_manager(self.workdir, config.keep_checkpoints)
      self.checkpoints = Checkpoints(manager, _tree_bytes(plan.state_shapes))
      resumed = []

      def on_resume(step):
        check_resume_config(self.workdir, config, step)
        resumed.append(step)

      self.state = restore_or_init(manager, plan.state_shapes, plan.state_sharding, init,
                                   on_resume)
      self.start = int(self.state.step)
      if self.start > self.total:
        raise ValueError(f"the checkpoint in {self.workdir} is at step {self.start}, past "
                         f"config.total_steps={self.total}: raise total_steps (or optim.epochs) "
                         f"to train on, or use another --workdir")
      if self.start == self.total:
        _say(f"{self.workdir} is already at step {self.start} of {self.total}: nothing to "
             f"train")
      record_config(self.workdir, config)
      self.log = MetricsLog(self.workdir, self.total, config.batch_size, plan.mesh.size,
                            self.start)
      self.preemption = Preemption()
      self.watch = FiniteWatch(manager, config.max_skipped_steps, config.dtype == "float16")
    except BaseException:
      self.close(quiet=True)
      raise

  def boundary(self, step: int, last: int, metrics: dict) -> tuple[bool, bool, bool]:
    """After `step`: (log it, save periodically, stop: preempted). Whenever any holds, the
    steps since the previous boundary are checked for finiteness: the loop's only reads of
    device values."""
    self.watch.add(step, metrics)
    logged = step % self.config.log_every == 0 or step == last
    periodic = step % self.config.checkpoint_every == 0 or step == last
    preempted = self.preemption.reached(step)
    if logged or periodic or preempted:
      self.watch.check()
      self.checkpoints.check()
    return logged, periodic, preempted

  def save(self, state, step: int, periodic: bool, preempted: bool) -> bool:
    """Saves when `periodic` or when preempted; True when the run must stop (preemption)."""
    if preempted:
      self.checkpoints.save(state, step, force=True)
      _say(f"{self.preemption.label}: saved a checkpoint at step {step} in "
           f"{self.checkpoints.directory}; the same command resumes from it")
      return True
    if periodic:
      self.checkpoints.save(state, step)
    return False

  def close(self, quiet: bool = False) -> None:
    """Saves already started finish; one cut short by a kill is never restored. `quiet`: the
    run is already failing with its own error, which a pending save's must not replace."""
    try:
      if self.checkpoints:
        self.checkpoints.close(quiet)
    finally:
      for part in (self.log, self.preemption):
        if part:
          part.close()
      self.lock.release()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(quiet=exc_type is not None)
