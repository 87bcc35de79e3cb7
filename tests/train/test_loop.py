"""The trainer's loop: it never makes a batch on the training thread, reads a logged step's
metrics only after the next step is dispatched, compiles nothing after step 1, and reports
the host's time per step; the synthetic source it reads is drawn on the mesh."""
import json
import os
import threading

import jax
import numpy as np
import pytest

from eesmm_jax import data, metrics, train
from eesmm_jax import step as step_lib
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


def test_the_loop_dispatches_before_it_reads_and_compiles_nothing_after_step_1(
    tmp_path, monkeypatch):
  events, lock = [], threading.Lock()

  def note(*event):
    with lock:
      events.append(event)

  real_compile = step_lib.compile_train_step

  def compile_recording(*args):
    compiled = real_compile(*args)

    def step(state, images):
      out = compiled(state, images)
      note("dispatched")
      return out
    return step

  real_iterator = data.create_pretrain_iterator

  def iterator_recording(*args, **kw):
    for batch in real_iterator(*args, **kw):
      note("made", threading.current_thread().name)
      yield batch

  real_write = metrics.MetricsLog.write

  def write_recording(self, step, row):
    note("row", step)
    return real_write(self, step, row)

  monkeypatch.setattr(step_lib, "compile_train_step", compile_recording)
  monkeypatch.setattr(data, "create_pretrain_iterator", iterator_recording)
  monkeypatch.setattr(metrics.MetricsLog, "write", write_recording)
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: note("compiled") if name.endswith("backend_compile_duration")
      else None)
  try:
    train.pretrain(tiny_config(total_steps=6, log_every=1, picture_every=3), str(tmp_path))
  finally:
    jax.monitoring.clear_event_listeners()
  with lock:
    order = list(events)
  dispatched = [i for i, e in enumerate(order) if e == ("dispatched",)]
  # Nothing compiles from step 1 to the last step (the picture at step 3 included); after it,
  # the final save has Orbax copy each device's replica once (its own small programs).
  assert ("compiled",) not in order[dispatched[0]:dispatched[-1]]
  assert {e[1] for e in order if e[0] == "made"} == {"eesmm-input"}
  rows = {e[1]: i for i, e in enumerate(order) if e[0] == "row"}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  for k in (2, 4, 5):  # logged only: read after step k + 1 is dispatched
    assert rows[k] > dispatched[k]
  for k in (1, 3):  # the first step and a picture step: read at once, before the next
    assert rows[k] < dispatched[k]
  logged = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  for key in ("host_make_ms", "host_put_ms", "host_wait_ms", "host_dispatch_ms",
              "host_boundary_ms"):
    assert all(np.isfinite(r[key]) and r[key] >= 0 for r in logged if "loss" in r)


def test_synthetic_batches_drawn_on_the_mesh_equal_the_host_ones_and_resume():
  config = tiny_config().data
  config.img_size = 16
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  on_mesh = data.create_pretrain_iterator(config, 16, 3, sharding=sharding)
  first = next(on_mesh)
  assert first["image"].sharding == sharding and first["image"].dtype == np.uint8
  halves = [data.create_pretrain_iterator(config, 16, 3, process_index=p, process_count=2)
            for p in (0, 1)]
  host = [next(h) for h in halves]
  np.testing.assert_array_equal(np.asarray(first["image"]),
                                np.concatenate([h["image"] for h in host]))
  np.testing.assert_array_equal(np.asarray(first["label"]),
                                np.concatenate([h["label"] for h in host]))
  # In distribution what the per-row NumPy draws were: uniform bytes, labels in [0, 1000).
  pixels = np.asarray(first["image"])
  assert pixels.shape == (16, 16, 16, 3) and pixels.min() == 0 and pixels.max() == 255
  assert abs(pixels.mean() - 127.5) < 2.0
  assert 0 <= np.asarray(first["label"]).min() and np.asarray(first["label"]).max() < 1000
  # A function of (seed, step): step 4 from a fresh start at 4 equals the stream's next.
  np.testing.assert_array_equal(np.asarray(next(on_mesh)["image"]), np.asarray(next(
      data.create_pretrain_iterator(config, 16, 4, sharding=sharding))["image"]))
