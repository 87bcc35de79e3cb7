"""Checkpoints of a run: Orbax's async manager, a restore that falls back past a bad checkpoint,
and saves that stop the run with one line when they cannot complete (`workdir.py` says why each).
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eesmm_jax import sharding


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read; the message is one line."""


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
  if sharding.is_lead():
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


def tree_bytes(tree) -> int:
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
    for d in os.listdir(self.directory) if sharding.is_lead() else ():
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
