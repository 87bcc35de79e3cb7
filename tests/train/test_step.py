"""The shared train step and its plan: TensorFlow only where tf.data runs, the data source opened
once, micro-batches equal to the unsplit step, the benchmark on the trainer's own step."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import numpy as np
from PIL import Image

from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax import train
from eesmm_jax.data import tfdata
from tests import xla_flags
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, cwd=ROOT, timeout=600,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


BLOCK_TF = """
    import sys
    # As on an image without them: `import` raises ImportError and find_spec says None.
    for name in ("tensorflow", "tensorflow_datasets", "clu"):
      sys.modules[name] = None
"""

def test_synthetic_pretraining_and_benchmark_run_without_tensorflow_or_clu(tmp_path):
  proc = run_python(BLOCK_TF + f"""
    import json, sys
    from absl.testing import flagsaver  # noqa: F401  (absl itself is allowed)
    from absl import app
    from eesmm_jax import main
    from eesmm_jax.tools.benchmark import runner
    sys.argv = ["main", "--config", "configs/demo.py", "--workdir", {str(tmp_path / "run")!r},
                "--config.data.dataset=synthetic", "--config.data.synthetic_examples=32",
                "--config.batch_size=16", "--config.total_steps=2", "--config.log_every=1",
                "--config.optim.warmup_epochs=0", "--config.picture_every=2"]
    try:
      app.run(main.main)
    except SystemExit as e:
      assert not e.code, e.code
    rows = [json.loads(l) for l in open({str(tmp_path / "run" / "metrics.jsonl")!r})]
    assert [r["step"] for r in rows] == [1, 2], rows
    status = runner.main(["--preset", "cpu-small", "--out", {str(tmp_path / "timing")!r},
                             "--backbones", "swin_micro", "--sizes", "64/2",
                             "--methods", "eesmm2", "--batch", "4", "--steps", "1",
                             "--warmup", "0", "--torch", "none", "--dtype", "float16",
                             "--loop", "--no-interleave"])  # here, where TF is blocked
    assert status == 0
    # The fp16 cell is the trainer's step, dynamic loss scale included (float32 cells carry
    # none: test_benchmark checks them); its loop mode times the whole trainer loop beside it
    # (loosely: one timed step each on a busy machine).
    (cell,) = json.load(open({str(tmp_path / "timing" / "timing.json")!r}))
    assert cell["dtype"] == "float16" and cell["loss_scale"] > 0, cell
    assert cell["loop_images_per_sec"] > 0 and 0.05 < cell["loop_vs_step"] < 10, cell
    assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")
                and sys.modules[m] is not None]
    print("ok")
  """, XLA_FLAGS=xla_flags(2))
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "clu is not installed, so no TensorBoard output" in proc.stdout
  assert (tmp_path / "run" / "pictures").is_dir()


def test_a_folder_is_listed_once_per_run(tmp_path, monkeypatch):
  for i in range(16):
    Image.fromarray(np.full((40, 40, 3), i * 15, np.uint8)).save(tmp_path / f"{i}.png")
  calls = []
  real = tfdata._list_and_check_folder
  monkeypatch.setattr(tfdata, "_list_and_check_folder",
                      lambda *a: calls.append(a) or real(*a))
  config = tiny_config(total_steps=2, **{"data.dataset": "folder",
                                         "data.data_dir": str(tmp_path)})
  train.pretrain(config, str(tmp_path / "run"))
  assert len(calls) == 1, calls


def test_a_benchmark_whose_only_cell_fails_exits_non_zero(tmp_path):
  """A cell whose data folder does not exist fails when it is built (flags are checked before:
  the grid's sizes and batch); the tables are written, exit 1."""
  proc = subprocess.run(
      [sys.executable, "-m", "eesmm_jax.tools.benchmark", "--preset", "cpu-small", "--out",
       str(tmp_path), "--backbones", "swin_micro", "--sizes", "64/2", "--methods", "eesmm2",
       "--batch", "2", "--steps", "1", "--warmup", "0", "--torch", "none", "--data", "folder",
       "--data_dir", str(tmp_path / "no_such_folder")],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "XLA_FLAGS": xla_flags(1)})
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert (tmp_path / "timing.json").exists() and "failed: swin_micro 64/2" in proc.stdout


def test_launchers_put_their_dtype_before_the_users_overrides():
  """launch/v100x4.sh and tpu_pod.sh: their default dtype follows --config, so a user's own
  --config.dtype (later on the line) wins."""
  out = subprocess.run(
      ["bash", "-c", '. launch/lib.sh; with_config_default dtype=float16 --workdir w --config '
       'c.py --config.dtype=float32; printf "%s\\n" "${ARGS[@]}"'],
      capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
  assert out == ["--workdir", "w", "--config", "c.py", "--config.dtype=float16",
                 "--config.dtype=float32"]
  for launcher in ("v100x4.sh", "tpu_pod.sh"):
    text = open(os.path.join(ROOT, "launch", launcher)).read()
    assert "with_config_default dtype=" in text and "--config.dtype=" not in text, launcher


def test_k_micro_batches_equal_the_unsplit_step():
  """4 slices of a 32-row batch on 8 devices, groups of 2 rows kept together: one update equal
  to the unsplit step's (the loss is a mean over rows and draws nothing at random)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  pass

  def loss_fn(params, batch, rng, train):
    pairs = batch.reshape(-1, 2, 3).sum(1)  # a group's two rows act together, as in a blend
    err = jnp.tanh(pairs @ params["w"]) - 1.0
    return jnp.mean(err ** 2), {"metrics": {"err": jnp.mean(err)}}

  mesh = sharding.make_mesh()
  batch = jax.device_put(np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32),
                         NamedSharding(mesh, P("data")))
  params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)}
  tx = optax.adamw(1e-2)
  state = step_lib.new_train_state(params, tx, jax.random.key_data(jax.random.key(0)), "float32")
  results = []
  for k in (1, 4):
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, lambda _: 1e-2, 1, micro_batches=k,
                                        group=2))
    new_state, metrics = step(state, batch)
    results.append((new_state.params["w"], metrics))
  (w1, m1), (w4, m4) = results
  np.testing.assert_allclose(w4, w1, atol=1e-6)
  for key in ("loss", "grad_norm", "err"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-6, atol=1e-7)


def test_micro_batched_pretraining_runs_and_bad_counts_are_refused(tmp_path):
  import pytest
  from eesmm_jax import plan
  state = train.pretrain(tiny_config(total_steps=2, micro_batches=2, batch_size=32),
                                   str(tmp_path / "run"))
  assert int(state.step) == 2
  with pytest.raises(ValueError, match=r"config.micro_batches=3 must be an integer >= 1"):
    plan.pretraining(tiny_config(micro_batches=3), sharding.make_mesh(), str(tmp_path / "bad"))


def test_a_step_too_large_for_the_stated_memory_stops_before_training(tmp_path):
  import pytest
  with pytest.raises(MemoryError, match=r"the train step needs \d+\.\d\d GiB per device .* but "
                     r"the device has 0\.00 GiB: use a smaller config\.batch_size, or "
                     r"--config\.model\.remat=full"):
    train.pretrain(tiny_config(total_steps=2, device_memory_gb=1e-4),
                             str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl") or \
      not open(tmp_path / "run" / "metrics.jsonl").read()
  assert not [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()]


def test_finiteness_checked_at_log_and_checkpoint_steps_names_the_first_bad_step(
    tmp_path, monkeypatch):
  """No read-back per step: with log_every 4 the check at step 4 finds that step 3 was the
  first non-finite one; nothing after step 2 was saved."""
  import orbax.checkpoint as ocp
  import pytest

  pass
  from tests.train.test_reliability import poison_batches
  poison_batches(monkeypatch, from_step=3)
  with pytest.raises(step_lib.NonFiniteError, match=r"^step 3: the loss or the gradients are not "
                     r"finite .*last good checkpoint \(step 2\)"):
    train.pretrain(tiny_config(total_steps=8, checkpoint_every=2, log_every=4),
                             str(tmp_path))
  with ocp.CheckpointManager(tmp_path / "checkpoints") as mngr:
    assert mngr.all_steps() == [2]


def test_background_input_keeps_order_runs_ahead_and_raises_the_input_s_error():
  made = []

  def source():
    for i in range(6):
      made.append((i, threading.current_thread().name))
      yield i
    raise ValueError("no readable image in '/data'")

  with step_lib.BackgroundInput(source(), lambda b: b * 10, size=2) as batches:
    assert [next(batches) for _ in range(3)] == [0, 10, 20]
    deadline = time.time() + 10
    while len(made) < 6 and time.time() < deadline:  # runs ahead, a bounded queue
      time.sleep(0.01)
    assert [i for i, _ in made] == list(range(6))
    assert {name for _, name in made} == {"eesmm-input"}  # never the training thread
    assert [next(batches) for _ in range(3)] == [30, 40, 50]
    with pytest.raises(ValueError, match="no readable image"):
      next(batches)
    assert batches.times()["taken"] == 6