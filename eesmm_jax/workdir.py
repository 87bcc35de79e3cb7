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
- An output the disk refuses (metrics.jsonl, TensorBoard events, a picture: ENOSPC, EIO) stops
  the run at the next step boundary with a checkpoint, in one line (`metrics.OutputError`; a
  logged step's row is written once the following step is dispatched, so that boundary may be
  the following step's); a
  torn last line of metrics.jsonl is dropped on resume, saying so.
- A corrupt config.json is refused with the way out, not rebuilt (`read_recorded_config`).
- SIGTERM, and Ctrl-C, stop the run at the next step boundary with a checkpoint; a second
  Ctrl-C aborts at once, in any phase, compilation included (exit status 130).
- Finiteness is checked without a device-to-host read per step (`FiniteWatch`).
"""
from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import signal
import socket
import sys
import threading
from typing import Callable

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from eesmm_jax import checkpoints, data, metrics, sharding, step as step_lib
from eesmm_jax.checkpoints import CheckpointError  # noqa: F401  (raised through Run)

# Config keys (or groups: "objective" is every objective.* key) whose change makes a resume
# wrong: the model's shapes, the data position (step x batch size) or the loss would no longer
# be the run's. Others (lr, steps, remat, micro_batches, dtype, ...) are printed and allowed.
RESUME_FIXED = ("model.name", "model.embed_dim", "model.depths", "model.num_heads",
                "model.patch_size", "model.window_size", "img_size", "batch_size", "objective",
                "mode")


# ----------------------------------------------------------------------------------------------
# One writer per workdir.


class CorruptRecord(RuntimeError):
  """A file the workdir keeps about its run does not read back (the file and the way out named)."""


class WorkdirInUse(RuntimeError):
  """Another run holds the workdir (its host and pid named)."""


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/run.lock` (process 0 of a run holds it)."""

  def __init__(self, workdir: str):
    self.file = None
    if not sharding.is_lead():
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
      raise WorkdirInUse(f"--workdir {workdir!r} is in use by a run ({holder}): one run writes "
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
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return json.loads(json.dumps(flat, default=str))


def write_json_atomically(path: str, value) -> None:
  """Written beside and renamed: a kill leaves the old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def record_config(workdir: str, config) -> None:
  """Writes `<workdir>/config.json`: the config the checkpoints from now on are written under."""
  if sharding.is_lead():
    write_json_atomically(os.path.join(workdir, "config.json"),
                          dict(sorted(flat_config(config).items())))


def read_recorded_config(path: str) -> dict:
  """config.json as written by `record_config`; a corrupt one (a torn write from before writes
  were atomic, a disk error, an edit) is refused with the way out. It is not rebuilt from the
  current config: it is the record of what the checkpoints were written under, and the resume
  check compares against exactly that, so only a person can say which config it was."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
    saved = None
  if not isinstance(saved, dict):
    raise CorruptRecord(
        f"{path} is not valid JSON (truncated?): the checkpoints beside it are intact; delete "
        f"it to resume with the current config (unchecked against theirs), or restore it")
  return saved


def check_resume_config(workdir: str, config, step: int) -> None:
  """Compares `config` with the one the workdir's checkpoints were written under: prints the
  keys that changed, and refuses a change of a RESUME_FIXED key not named in
  `config.resume_allow`. A workdir from before config.json was kept is resumed as it is."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  saved = read_recorded_config(path)
  current = flat_config(config)
  changed = sorted(k for k in set(saved) | set(current)
                   if saved.get(k) != current.get(k) and k != "resume_allow")
  if not changed:
    return
  sharding.say(f"resuming {workdir} at step {step} with changed config: " + "; ".join(
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
# The data a workdir's run started on.

DATA_RECORD, DATA_NAMES = "data.json", "data_names.txt.gz"


def record_data(workdir: str, record: dict, names) -> None:
  """Writes `<workdir>/data.json` (and a folder's listing beside it, gzipped) when absent or
  changed: what the checkpoints from now on were trained on (`data.describe`)."""
  if not sharding.is_lead():
    return
  path = os.path.join(workdir, DATA_RECORD)
  try:
    with open(path, encoding="utf-8") as f:
      if json.load(f) == record:
        return
  except (OSError, ValueError):
    pass
  names_path = os.path.join(workdir, DATA_NAMES)
  if names is not None:
    tmp = f"{names_path}.tmp{os.getpid()}"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
      f.write("\n".join(names))
    os.replace(tmp, names_path)
  elif os.path.exists(names_path):
    os.remove(names_path)
  write_json_atomically(path, record)


def recorded_classes(workdir: str):
  """The class names a workdir's run trained on (its data.json), or None."""
  try:
    with open(os.path.join(workdir, DATA_RECORD), encoding="utf-8") as f:
      return json.load(f).get("classes")
  except (OSError, ValueError, AttributeError):
    return None


def _recorded_names(workdir: str):
  try:
    with gzip.open(os.path.join(workdir, DATA_NAMES), "rt", encoding="utf-8") as f:
      text = f.read()
  except (OSError, EOFError):
    return None
  return text.split("\n") if text else []


def data_change(workdir: str, record: dict, names) -> str:
  """'' when the data is the one recorded in the workdir (or nothing is recorded), else what
  changed, in words: images added and removed for a folder, else the record's fields."""
  path = os.path.join(workdir, DATA_RECORD)
  if not os.path.exists(path):
    return ""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    saved = None
  if not isinstance(saved, dict):  # derived from the data: rebuilt below, after a line
    sharding.say(f"{path} does not read back (truncated?): recording the current data anew")
    return ""
  if saved.get("digest") == record["digest"]:
    return ""
  old = _recorded_names(workdir) if names is not None else None
  if old is not None:
    old_set, new_set = set(old), set(names)
    added, removed = len(new_set - old_set), len(old_set - new_set)
    if added or removed:
      return f"{record['what']}: {added} images added, {removed} removed"
  if saved.get("what") != record["what"]:
    return f"the data was {saved.get('what')}, now {record['what']}"
  return (f"{record['what']}: {saved.get('num_examples')} examples then, "
          f"{record['num_examples']} now" if saved.get("num_examples") != record["num_examples"]
          else f"{record['what']}: its content changed")


def check_resume_data(workdir: str, config, record: dict, names, step: int) -> None:
  """Refuses to resume on data other than the run's (the order of every later step would
  differ from the original run's) unless `config.resume_allow` names 'data'."""
  change = data_change(workdir, record, names)
  if not change:
    return
  line = (f"{change} since step {step}: the data order from here differs from the original "
          f"run")
  allowed = {k.strip() for k in (config.get("resume_allow") or "").split(",")}
  if "data" in allowed:
    sharding.say(f"{line} (resume_allow names data: resuming anyway)")
    return
  raise ValueError(f"{line}; restore the data, use another --workdir, or "
                   f"--config.resume_allow=data to resume anyway")


# ----------------------------------------------------------------------------------------------
# Stopping at a step boundary.


class Preemption:
  """SIGTERM or Ctrl-C (or JAX's preemption notice on several processes) -> stop at a step
  boundary with a checkpoint; a second Ctrl-C aborts at once, in any phase.

  Python runs its signal handlers on the main thread, between bytecodes: while that thread is
  inside a long C++ call (XLA compiling, a restore), a handler waits for the call to return, and
  an exception raised from it lands wherever the call returns (after the compile, an exit from
  inside XLA's threads ended in a segmentation fault). So the signals are read by a thread of
  their own, through `signal.set_wakeup_fd`, which the interpreter writes at C level as a signal
  arrives: the first Ctrl-C is acknowledged at once, the second flushes one line and leaves with
  `os._exit(130)` (no interpreter shutdown under running C++ threads; the workdir's lock goes
  with the process, and the last finished checkpoint is what the same command resumes from).

  Several processes must stop at the same step, so there we use JAX's preemption sync point,
  which agrees on the step through the distributed runtime; one process catches the signals.
  """

  def __init__(self):
    self.requested = threading.Event()
    self.label = "preempted (SIGTERM)"
    self.multiprocess = jax.process_count() > 1
    self.previous = {}
    self.pipe = self.watcher = None
    self.previous_wakeup_fd = -1
    if self.multiprocess or threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._python_handler)
    read, write = os.pipe()
    os.set_blocking(write, False)  # the interpreter's C handler must never block on it
    self.previous_wakeup_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    self.pipe = (read, write)
    self.watcher = threading.Thread(target=self._watch, name="signal watcher", daemon=True)
    self.watcher.start()

  def _watch(self):
    read = self.pipe[0]
    while True:
      try:
        received = os.read(read, 64)
      except OSError:
        return
      if not received:  # the write end closed: `close`
        return
      for sig in received:
        if sig in (signal.SIGINT, signal.SIGTERM):
          self._on_signal(sig)

  def _python_handler(self, sig, frame):
    # The watcher has seen this signal already (the wakeup fd is written before this runs);
    # without a watcher this handler is the only one.
    if self.watcher is None:
      self._on_signal(sig)

  def _on_signal(self, sig):
    if sig == signal.SIGINT and self.requested.is_set():
      self.abort()
    if sig == signal.SIGINT:
      self.label = "stopped (Ctrl-C)"
      print("\nCtrl-C: stopping at the next step boundary with a checkpoint (Ctrl-C again "
            "aborts now)", flush=True)
    self.requested.set()

  @staticmethod
  def abort():
    """The second Ctrl-C: one line, then out at once with 130, as a shell reports SIGINT."""
    try:
      sys.stdout.flush()
      print("Ctrl-C again: aborted without a checkpoint; the same command resumes from the last "
            "one saved", file=sys.stderr, flush=True)
    finally:
      os._exit(130)

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested.is_set()

  def close(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
    self.previous = {}
    if self.pipe:
      signal.set_wakeup_fd(self.previous_wakeup_fd)
      read, write = self.pipe
      os.close(write)  # the watcher reads the end of the pipe and returns
      self.watcher.join(timeout=5)
      os.close(read)
      self.pipe = None


class FiniteWatch:
  """Checks that steps were finite without a device-to-host read per step: the few scalars of
  each step stay on the device until `check`, at log, checkpoint and preemption steps.

  A non-finite step leaves params and optimizer state untouched (`step.make_train_step`), so
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

  def check(self, everything: bool = True) -> None:
    """Reads and checks the steps added since the last check; all but the last unless
    `everything` (which a save needs)."""
    keep = 0 if everything else 1
    rows = jax.device_get(self.pending[:len(self.pending) - keep])
    self.pending = self.pending[len(self.pending) - keep:]
    for step, m in rows:
      if not m["finite"] and not self.fp16:
        raise step_lib.NonFiniteError(
            f"step {step}: the loss or the gradients are not finite (loss {float(m['loss'])}, "
            f"grad norm {float(m['grad_norm'])}); stopping. {checkpoints.last_good(self.manager)} Try a "
            f"lower optim.base_lr, or dtype 'float32'.")
      if m["skipped_in_a_row"] > self.max_skipped:
        raise step_lib.NonFiniteError(
            f"step {step}: {int(m['skipped_in_a_row'])} fp16 steps in a row overflowed (loss "
            f"scale now {float(m['loss_scale']):g}): the loss itself is not finite, not just "
            f"the fp16 range. {checkpoints.last_good(self.manager)} Try dtype 'bfloat16' or 'float32', or "
            f"a lower lr.")


# ----------------------------------------------------------------------------------------------
# The run.


class Run:
  """Opens a planned run's workdir: lock, config check, restore (or `init()`), metrics log,
  signals; `close` (or leaving the `with`) finishes pending saves and releases them all."""

  def __init__(self, plan, init: Callable[[], step_lib.TrainState]):
    config, self.workdir = plan.config, plan.workdir
    self.config, self.total = config, plan.total_steps
    # Signals first: restoring, initialising and compiling can take minutes, and a Ctrl-C there
    # is handled as in the loop (a second one aborts at once).
    self.preemption = Preemption()
    self.checkpoints = self.log = self.lock = None
    self.multiprocess, self.synced = jax.process_count() > 1, False
    try:
      self.lock = WorkdirLock(self.workdir)
      manager = checkpoints.checkpoint_manager(self.workdir, config.keep_checkpoints)
      self.checkpoints = checkpoints.Checkpoints(manager, checkpoints.tree_bytes(plan.state_shapes))
      resumed = []
      data_record, data_names = data.describe(config.data, plan.source)

      def on_resume(step):
        check_resume_config(self.workdir, config, step)
        check_resume_data(self.workdir, config, data_record, data_names, step)
        resumed.append(step)

      self.state = checkpoints.restore_or_init(manager, plan.state_shapes, plan.state_sharding, init,
                                   on_resume)
      self.start = int(self.state.step)
      if self.start > self.total:
        raise ValueError(f"the checkpoint in {self.workdir} is at step {self.start}, past "
                         f"config.total_steps={self.total}: raise total_steps (or optim.epochs) "
                         f"to train on, or use another --workdir")
      if self.start == self.total:
        sharding.say(f"{self.workdir} is already at step {self.start} of {self.total}: nothing to "
             f"train")
      record_config(self.workdir, config)
      record_data(self.workdir, data_record, data_names)
      self.log = metrics.MetricsLog(self.workdir, self.total, config.batch_size, plan.mesh.size,
                            self.start)
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
    self.synced = logged or periodic or preempted
    if self.synced:
      # Before a save every step is checked, the one just dispatched included; at a step that
      # is only logged, all but that one, so the check does not wait for the device.
      self.watch.check(everything=periodic or preempted)
      self.checkpoints.check()
    return logged, periodic, preempted

  def _output_failed(self) -> bool:
    """Whether an output (metrics.jsonl, TensorBoard, a picture) could not be written. Process
    0 alone writes them, so several processes learn it from process 0 at the boundaries where
    they read device values anyway (log, checkpoint, preemption), and stop at the same step."""
    failed = self.log.failure is not None
    if not self.multiprocess:
      return failed
    if not self.synced:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))

  def save(self, state, step: int, periodic: bool, preempted: bool) -> bool:
    """Saves when `periodic` or when preempted; True when the run must stop (preemption). An
    output that could not be written stops the run here, with a checkpoint of this step."""
    if self._output_failed():
      self.checkpoints.save(state, step, force=True)
      self.checkpoints.check(wait=True)  # the checkpoint the message names is on disk
      raise self.log.failure_error(f"saved a checkpoint at step {step} in "
                                   f"{self.checkpoints.directory}")
    if preempted:
      self.checkpoints.save(state, step, force=True)
      sharding.say(f"{self.preemption.label}: saved a checkpoint at step {step} in "
           f"{self.checkpoints.directory}; the same command resumes from it")
      return True
    if periodic:
      self.checkpoints.save(state, step)
    return False

  def close(self, quiet: bool = False) -> None:
    """Saves already started finish; one cut short by a kill is never restored. `quiet`: the
    run is already failing with its own error, which a pending save's must not replace. An
    output that failed after the last step's save (fine-tuning's final evaluation) is raised
    here; the checkpoints are complete."""
    try:
      if self.checkpoints:
        self.checkpoints.close(quiet)
    finally:
      try:
        if self.log:
          self.log.close()
      finally:
        if self.preemption:
          self.preemption.close()
        if self.lock:
          self.lock.release()
    if self.log and self.log.failure is not None and not quiet:
      raise self.log.failure_error(f"the checkpoints in {self.checkpoints.directory} are "
                                   f"complete (latest: step "
                                   f"{self.checkpoints.manager.latest_step()})")

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(quiet=exc_type is not None)
