"""What happens when things go wrong: kills, preemption, bad configs, non-finite losses and
checkpoints of another model. Each case ends with a clear message and nothing lost."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eesmm_jax import convert, data, plan, train
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from tests import xla_flags
from tests.train.test_train import ROOT, losses, saved_params, tiny_config

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

CLI_FLAGS = ["--config.img_size=32", "--config.model.patch_size=2", "--config.model.window_size=4",
             "--config.model.embed_dim=16", "--config.model.depths=(2, 2)",
             "--config.model.num_heads=(1, 2)", "--config.objective.mask_patch_size=8",
             "--config.batch_size=8", "--config.data.dataset=synthetic",
             "--config.data.synthetic_examples=8", "--config.optim.warmup_epochs=1",
             "--config.total_steps=10", "--config.log_every=1", "--config.checkpoint_every=2",
             "--config.picture_every=0"]


def cli(workdir):
  return [sys.executable, "-m", "eesmm_jax.main", "--config",
          os.path.join(ROOT, "configs/demo.py"), "--workdir", str(workdir)] + CLI_FLAGS


def env():
  return {**os.environ, "XLA_FLAGS": xla_flags(1)}


def run_until(workdir, predicate, sig):
  """Starts the CLI and sends `sig` as soon as predicate(stdout so far) holds."""
  proc = subprocess.Popen(cli(workdir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env(), cwd=ROOT)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                            daemon=True)
  reader.start()
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if predicate("".join(lines)):
      proc.send_signal(sig)
      break
    time.sleep(0.002)
  proc.wait(timeout=600)
  reader.join(timeout=60)
  return proc.returncode, "".join(lines)


def saving(workdir):
  """True while orbax is writing a checkpoint (its temporary directory exists)."""
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any("tmp" in d for d in os.listdir(ckpts))


def last_losses(workdir):
  """Step -> loss, the last logged value of each step (a resumed run logs some twice)."""
  return {r["step"]: r["loss"] for r in losses(workdir)}


def test_kill_minus_9_three_times_then_resume_equals_an_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  done = subprocess.run(cli(straight), capture_output=True, text=True, env=env(), cwd=ROOT,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]

  # 1: mid-run, between checkpoints.
  code, out = run_until(killed, lambda s: "step       3/10" in s, signal.SIGKILL)
  assert code == -signal.SIGKILL
  # 2: during a checkpoint save (async: its temporary directory is on disk).
  code, _ = run_until(killed, lambda s: saving(killed) and "step       5/10" in s,
                      signal.SIGKILL)
  assert code == -signal.SIGKILL
  # A half-written checkpoint is never picked up: the latest is a finished one, and restores.
  with ocp.CheckpointManager(killed / "checkpoints") as mngr:
    latest = mngr.latest_step()
    assert latest is not None and latest % 2 == 0
    mngr.restore(latest)
  # 3: right after the first resumed step.
  code, _ = run_until(killed, lambda s: "step       7/10" in s or "step       8/10" in s,
                      signal.SIGKILL)
  assert code == -signal.SIGKILL
  finish = subprocess.run(cli(killed), capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=600)
  assert finish.returncode == 0, finish.stderr[-2000:]

  for a, b in zip(jax.tree_util.tree_leaves(saved_params(straight)),
                  jax.tree_util.tree_leaves(saved_params(killed))):
    np.testing.assert_array_equal(a, b)
  assert last_losses(killed) == last_losses(straight)


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
  code, out = run_until(tmp_path, lambda s: "step       3/10" in s, signal.SIGTERM)
  assert code == 0, out[-2000:]
  assert "preempted (SIGTERM): saved a checkpoint at step" in out
  step = int(out.split("saved a checkpoint at step ")[1].split()[0])
  assert step >= 3 and str(step) in os.listdir(tmp_path / "checkpoints")
  again = subprocess.run(cli(tmp_path), capture_output=True, text=True, env=env(), cwd=ROOT,
                         timeout=600)
  assert again.returncode == 0 and "step      10/10" in again.stdout


# ----------------------------------------------------------------------------------------------
# Configs are refused before anything compiles.

BAD_CONFIGS = [
    ({"img_size": 36}, r"config.img_size / config.model: .*does not tile.*img_size must be one of"),
    ({"objective.mask_patch_size": 12}, r"img_size must be a multiple of mask_patch_size 12"),
    ({"objective.mask_patch_size": 5}, r"mask_patch_size must be a positive multiple of the "
                                       r"model's patch size 2, got 5"),
    ({"objective.mask_ratio": 0.0}, r"mask_ratio must lie strictly between 0 and 1, got 0.0"),
    ({"objective.mask_ratio": 1.2}, r"mask_ratio must lie strictly between 0 and 1, got 1.2"),
    ({"objective.num_mix": 0}, r"objective.num_mix must be an integer >= 1, got 0"),
    ({"batch_size": 18}, r"config.batch_size=18 must be divisible by num_mix x devices = 2 x 8"),
    ({"data.dataset": "imagenet2013"}, r"unknown dataset 'imagenet2013'"),
    ({"model.name": "swin_huge"}, r"config.model.name='swin_huge' is unknown; choose one of"),
    ({"data.dataset": "imagenet2012"}, r"'imagenet2012' needs config.data_dir"),
    ({"optim.warmup_epochs": 10.0, "total_steps": 2},
     r"warmup_epochs=10.0 is invalid: .*the warm-up cannot outlast the run"),
    ({"objective.head": "merge"}, r"objective.head must be one of \('split', 'subtract'\)"),
    ({"dtype": "float64"}, r"config.dtype must be one of"),
    ({"init_from": "/nonexistent.pth"}, r"config.init_from='/nonexistent.pth' does not exist"),
    # Values everything else divides by: a ZeroDivisionError, or an internal name, before.
    ({"batch_size": 0}, r"^config.batch_size must be a positive integer .*got 0$"),
    ({"batch_size": -16}, r"^config.batch_size must be a positive integer .*got -16$"),
    ({"img_size": 0}, r"^config.img_size must be a positive integer, got 0$"),
    ({"model.patch_size": 0}, r"^config.model.patch_size must be a positive integer, got 0$"),
    ({"picture_every": -1}, r"^config.picture_every must be >= 0 .*got -1$"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS,
                         ids=[",".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_refused_with_a_clear_error(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    plan.pretraining(tiny_config(**overrides), sharding.make_mesh(), str(tmp_path))


def init_from_sources(tmp_path):
  """Paths that exist but are no weights to start from, each with what its refusal says."""
  empty = tmp_path / "empty"
  empty.mkdir()
  run = tmp_path / "run"
  (run / "checkpoints" / "4" / "default").mkdir(parents=True)
  converted = tmp_path / "converted"
  (converted / "params").mkdir(parents=True)
  (converted / "model.json").write_text('{"img_size": 32, "patch_')  # torn
  (tmp_path / "notes.pth").write_text("not a checkpoint\n")
  (tmp_path / "empty.pth").write_bytes(b"")
  return [
      (empty, r"holds no checkpoint \(no checkpoints/<step>\) and no model.json: give a .pth, "
              r"a `convert to-flax` directory \(model.json\), or a pretraining / fine-tuning "
              r"workdir"),
      (run / "checkpoints", rf"looks like a checkpoints folder .*give the workdir that holds "
                            rf"it, '{run}'"),
      (run / "checkpoints" / "4", rf"looks like one checkpoint .*give the workdir, '{run}'"),
      (converted, r"has a model.json that is not valid JSON \(truncated\?\)"),
      (tmp_path / "notes.pth", r"is not a PyTorch checkpoint"),
      (tmp_path / "empty.pth", r"is an empty file"),
  ]


def test_init_from_that_exists_but_holds_no_weights_is_refused_while_planning(tmp_path):
  for path, message in init_from_sources(tmp_path):
    with pytest.raises(ValueError, match=rf"^config.init_from='{path}' {message}"):
      plan.pretraining(tiny_config(init_from=str(path)), sharding.make_mesh(),
                       str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # refused before the workdir was even made


def test_command_line_errors_are_one_line_with_the_exit_status(tmp_path):
  """A user error after start-up: `error: <message>` alone on stderr, no traceback, exit 2
  for a config value (1 for others), before anything compiles; the traceback on request."""
  empty = tmp_path / "empty"
  empty.mkdir()
  cmd = cli(tmp_path / "run") + [f"--config.init_from={empty}"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [f"error: config.init_from='{empty}' holds no checkpoint (no "
                    f"checkpoints/<step>) and no model.json: give a .pth, a `convert to-flax` "
                    f"directory (model.json), or a pretraining / fine-tuning workdir "
                    f"(checkpoints/<step>)"]
  assert "Traceback" not in out.stderr and "compiling" not in out.stdout

  zero = subprocess.run(cli(tmp_path / "run") + ["--config.img_size=0"], capture_output=True,
                        text=True, env={**env(), "EESMM_TRACEBACK": "1"}, cwd=ROOT, timeout=600)
  assert zero.returncode == 2
  assert "Traceback" in zero.stderr and "ZeroDivisionError" not in zero.stderr
  assert zero.stderr.rstrip().splitlines()[-1] == ("error: config.img_size must be a positive "
                                                   "integer, got 0")


def test_cli_sorts_errors_into_one_line_and_exit_status(capsys):
  from eesmm_jax import cli, metrics, workdir

  def status_of(error):
    with pytest.raises(SystemExit) as e:
      cli.run_main(lambda: (_ for _ in ()).throw(error))
    return e.value.code

  assert status_of(ValueError("config.x must be >= 1, got 0")) == 2
  assert capsys.readouterr().err == "error: config.x must be >= 1, got 0\n"
  assert status_of(convert.ConversionError("shape mismatch")) == 2
  assert status_of(workdir.WorkdirInUse("in use")) == 1
  assert status_of(workdir.CorruptRecord("torn")) == 1
  assert status_of(metrics.OutputError("disk full")) == 1
  assert status_of(step_lib.NonFiniteError("nan")) == 1
  assert status_of(FileNotFoundError(2, "No such file or directory", "x.pth")) == 1
  assert status_of(KeyboardInterrupt()) == 130
  capsys.readouterr()
  assert status_of(ValueError("first\nsecond")) == 2
  assert capsys.readouterr().err == "error: first (more with EESMM_TRACEBACK=1)\n"
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    cli.run_main(lambda: 1 // 0)


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"--workdir .*a_file/run' is not writable"):
    plan.pretraining(tiny_config(), sharding.make_mesh(), str(blocker / "run"))


# ----------------------------------------------------------------------------------------------
# Non-finite losses.


def poison_batches(monkeypatch, from_step, until_step=None):
  """Batches from_step..until_step (1-based) are NaN once normalised, as a corrupt input or a
  blow-up would be. Pixels are uint8 (no NaN), so a poisoned batch is marked all 255 and the
  step's normalisation turns a marked batch into NaN."""
  real, real_normalize = data.create_pretrain_iterator, data.normalize

  def fake(config, global_batch, start_step=0, **kw):
    for i, batch in enumerate(real(config, global_batch, start_step, **kw), start=start_step + 1):
      if i >= from_step and (until_step is None or i <= until_step):
        batch = {**batch, "image": np.full_like(batch["image"], 255)}
      yield batch

  def normalize(images):
    return jnp.where(jnp.all(images == 255), jnp.nan, real_normalize(images))

  monkeypatch.setattr(data, "create_pretrain_iterator", fake)
  monkeypatch.setattr(data, "normalize", normalize)


def test_float32_run_stops_at_a_non_finite_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  poison_batches(monkeypatch, from_step=3)
  with pytest.raises(step_lib.NonFiniteError, match=r"step 3: the loss or the gradients are not "
                     r"finite .*last good checkpoint \(step 2\)"):
    train.pretrain(tiny_config(total_steps=6, checkpoint_every=2), str(tmp_path))
  with ocp.CheckpointManager(tmp_path / "checkpoints") as mngr:
    assert mngr.all_steps() == [2]


def test_float16_skips_a_non_finite_step_and_stops_after_too_many(tmp_path, monkeypatch):
  poison_batches(monkeypatch, from_step=4, until_step=4)
  state = train.pretrain(tiny_config(total_steps=6, dtype="float16"),
                                   str(tmp_path / "one"))
  rows = losses(tmp_path / "one")
  # The first steps may overflow too, while the scale comes down from 2^16 (as torch's
  # GradScaler does); the poisoned step must be skipped and halve the scale, and later steps run.
  assert rows[3]["finite"] == 0 and rows[3]["loss_scale"] == rows[2]["loss_scale"] / 2
  assert rows[-1]["finite"] == 1 and rows[-1]["skipped_in_a_row"] == 0
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))

  poison_batches(monkeypatch, from_step=2)
  with pytest.raises(step_lib.NonFiniteError, match=r"step \d+: 4 fp16 steps in a row overflowed .*No checkpoint was saved yet"):
    train.pretrain(tiny_config(total_steps=8, dtype="float16", max_skipped_steps=3),
                             str(tmp_path / "many"))


# ----------------------------------------------------------------------------------------------
# Checkpoints of another model.


def test_resuming_another_models_checkpoint_names_the_first_mismatch(tmp_path):
  train.pretrain(tiny_config(total_steps=1), str(tmp_path))
  with pytest.raises(ValueError, match=r"does not fit this config: first mismatch at params/"
                     r"\S+: checkpoint shape \(.*32.*\), model expects \(.*48.*\)"):
    train.pretrain(tiny_config(total_steps=2, **{"model.embed_dim": 24,
                                                           "model.num_heads": (2, 4)}),
                             str(tmp_path))


def test_init_from_another_models_weights_names_the_parameter_and_shapes(tmp_path):
  import torch
  other = tiny_config(**{"model.embed_dim": 24, "model.num_heads": (2, 4)})
  encoder = step_lib.create_encoder(other, num_classes=0, use_mask_token=True)
  params = encoder.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  state = convert.flax_to_torch(params, encoder, layout="timm")
  torch.save({k: torch.tensor(np.asarray(v)) for k, v in state.items()},
             tmp_path / "other.pth")
  with pytest.raises(convert.ConversionError, match=r"shape mismatch for .*checkpoint \(.*24.*\)"
                     r".*model expects \(.*16.*\)"):
    train.pretrain(tiny_config(total_steps=1, init_from=str(tmp_path / "other.pth")),
                             str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")
