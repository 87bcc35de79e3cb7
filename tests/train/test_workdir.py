"""A run's hold on its workdir (eesmm_jax/workdir.py): one writer, a corrupt checkpoint skipped,
a save that cannot complete stopped at the save, a resume under a changed config, Ctrl-C, and a
metrics log without repeated steps. Each case failed before workdir.py existed."""

import errno
import json
import os
import signal
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from eesmm_jax import checkpoints, train, workdir
from tests.train.test_reliability import ROOT, cli, env, run_until
from tests.train.test_train import losses, tiny_config

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier


def steps_saved(path):
  with ocp.CheckpointManager(os.path.join(path, "checkpoints")) as mngr:
    return mngr.all_steps()


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
  path = tmp_path_factory.mktemp("four") / "run"
  train.pretrain(tiny_config(total_steps=4, checkpoint_every=2), str(path))
  assert steps_saved(path) == [2, 4]
  return path


def copy_of(run, tmp_path):
  import shutil
  dest = tmp_path / "run"
  shutil.copytree(run, dest)
  return dest


# ----------------------------------------------------------------------------------------------
# 2: one writer per workdir; a killed holder leaves no stale lock.


def test_a_second_run_on_a_held_workdir_is_refused_with_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from eesmm_jax import workdir; "
       "lock = workdir.WorkdirLock(sys.argv[1]); print('held', flush=True); time.sleep(600)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=rf"--workdir '{tmp_path}' is in use by a run \(host "
                       rf"\S+, pid {holder.pid}\): one run writes a workdir at a time"):
      train.pretrain(tiny_config(total_steps=1), str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")
  finally:
    holder.kill()  # kill -9: the kernel drops the lock with the process
    holder.wait()
  workdir.WorkdirLock(str(tmp_path)).release()  # free again, nothing stale to clean up


# ----------------------------------------------------------------------------------------------
# 3: a corrupt latest checkpoint is set aside and the one before restored.


def test_a_truncated_checkpoint_is_skipped_kept_aside_and_the_one_before_resumed(
    four_steps, tmp_path, capsys):
  run = copy_of(four_steps, tmp_path)
  arrays = run / "checkpoints" / "4" / "default" / "ocdbt.process_0" / "d"
  biggest = max(arrays.iterdir(), key=lambda f: f.stat().st_size)
  os.truncate(biggest, 100)
  state = train.pretrain(tiny_config(total_steps=6, checkpoint_every=2), str(run))
  out = capsys.readouterr().out
  assert int(state.step) == 6
  line = [x for x in out.splitlines() if x.startswith("skipped the checkpoint at step 4")]
  assert len(line) == 1 and "it does not restore (" in line[0] and "bad_checkpoints/4" in line[0]
  assert (run / "bad_checkpoints" / "4" / "default").is_dir()  # kept, not deleted
  assert steps_saved(run) == [2, 4, 6]  # step 4 was recomputed from step 2 and saved anew
  assert [r["step"] for r in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_without_metadata_is_called_corrupt_not_another_model(
    four_steps, tmp_path, capsys):
  run = copy_of(four_steps, tmp_path)
  os.remove(run / "checkpoints" / "4" / "default" / "_METADATA")
  os.remove(run / "checkpoints" / "2" / "default" / "_METADATA")
  with pytest.raises(workdir.CheckpointError, match=r"none of the checkpoints in .* restores "
                     r"\(steps \[4, 2\], each moved to .*bad_checkpoints\)"):
    train.pretrain(tiny_config(total_steps=6), str(run))
  out = capsys.readouterr().out
  assert out.count("its metadata (_METADATA) is missing") == 2
  assert "another model" not in out
  assert sorted(os.listdir(run / "bad_checkpoints")) == ["2", "4"]


# ----------------------------------------------------------------------------------------------
# 6: a save that cannot complete stops the run at that save, in one line.


def test_disk_full_stops_at_the_save_and_the_previous_checkpoint_restores(
    tmp_path, monkeypatch):
  real, calls = checkpoints.shutil.disk_usage, []

  def disk_usage(path):  # full from the second save on
    calls.append(path)
    return real(path)._replace(free=1000) if len(calls) > 1 else real(path)

  monkeypatch.setattr(checkpoints.shutil, "disk_usage", disk_usage)
  with pytest.raises(workdir.CheckpointError) as e:
    train.pretrain(tiny_config(total_steps=8, checkpoint_every=2), str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"saving the checkpoint at step 4 to {tmp_path}/checkpoints failed: "
                            f"No space left on device")
  assert "The last good checkpoint (step 2) is kept" in message
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]
  monkeypatch.undo()  # space freed: the same command resumes from step 2
  state = train.pretrain(tiny_config(total_steps=8, checkpoint_every=2), str(tmp_path))
  assert int(state.step) == 8 and steps_saved(tmp_path) == [4, 6, 8]


def test_an_io_error_during_a_save_stops_the_run_naming_path_and_cause(tmp_path, monkeypatch):
  real = ocp.CheckpointManager.save

  def failing(self, step, *a, **kw):
    if step == 4:  # as Orbax raises it: the cause inside a longer message
      os.makedirs(os.path.join(self.directory, "4.orbax-checkpoint-tmp-123"))
      raise ValueError(f"Error writing in OCDBT database at {self.directory}/4: "
                       f"{os.strerror(errno.EIO)} [os_error_code=5]\n(details)")
    return real(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
  with pytest.raises(workdir.CheckpointError, match=r"^saving the checkpoint at step 4 to "
                     r".*/checkpoints failed: Error writing in OCDBT database .*Input/output "
                     r"error.*The last good checkpoint \(step 2\)[^\n]*$"):
    train.pretrain(tiny_config(total_steps=8, checkpoint_every=2), str(tmp_path))
  assert steps_saved(tmp_path) == [2]


# ----------------------------------------------------------------------------------------------
# 9: the config a workdir was written under; total_steps below the step reached.


def test_a_resume_under_a_changed_batch_size_is_refused_unless_allowed(four_steps, tmp_path,
                                                                       capsys):
  run = copy_of(four_steps, tmp_path)
  saved = json.loads((run / "config.json").read_text())
  assert saved["batch_size"] == 16 and saved["model.depths"] == [2, 2]
  with pytest.raises(ValueError, match=r"written with other values of batch_size \(see "
                     r"config.json there\).*--config.resume_allow=batch_size"):
    train.pretrain(tiny_config(total_steps=6, batch_size=32), str(run))
  assert ("changed config: batch_size 16 -> 32; checkpoint_every 2 -> 100; total_steps 4 -> 6"
          in capsys.readouterr().out)
  state = train.pretrain(
      tiny_config(total_steps=6, batch_size=32, resume_allow="batch_size"), str(run))
  assert int(state.step) == 6
  assert json.loads((run / "config.json").read_text())["batch_size"] == 32


def test_total_steps_below_the_step_reached_is_an_error_and_equal_says_so(four_steps, tmp_path,
                                                                          capsys):
  run = copy_of(four_steps, tmp_path)
  with pytest.raises(ValueError, match=r"is at step 4, past config.total_steps=3: raise "
                     r"total_steps"):
    train.pretrain(tiny_config(total_steps=3), str(run))
  train.pretrain(tiny_config(total_steps=4), str(run))
  assert "is already at step 4 of 4: nothing to train" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 9: metrics.jsonl holds each step once after a resume.


def test_metrics_of_steps_a_resume_recomputes_are_not_repeated(four_steps, tmp_path):
  run = copy_of(four_steps, tmp_path)
  import shutil
  shutil.rmtree(run / "checkpoints" / "4")  # as if killed before step 4's save completed
  train.pretrain(tiny_config(total_steps=4, checkpoint_every=2), str(run))
  assert [r["step"] for r in losses(run)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# 9: Ctrl-C saves at the next step boundary; the first step's time is measured before logging.


def test_ctrl_c_saves_at_the_next_step_and_the_command_resumes(tmp_path):
  code, out = run_until(tmp_path, lambda s: "step       3/10" in s, signal.SIGINT)
  assert code == 0, out[-2000:]
  assert "Ctrl-C: stopping at the next step boundary" in out
  assert "stopped (Ctrl-C): saved a checkpoint at step" in out
  step = int(out.split("saved a checkpoint at step ")[1].split()[0])
  assert step >= 3 and step in steps_saved(tmp_path)
  lines = out.splitlines()
  first = [i for i, x in enumerate(lines) if x.startswith("first step ran in ")]
  assert first and first[0] < lines.index(next(x for x in lines if x.startswith("step       1/")))
  again = subprocess.run(cli(tmp_path), capture_output=True, text=True, env=env(), cwd=ROOT,
                         timeout=600)
  assert again.returncode == 0 and "step      10/10" in again.stdout


def test_a_second_ctrl_c_aborts_at_once():
  # In a process of its own: the handlers are installed only on a main thread, and the second
  # Ctrl-C must end that process.
  script = """
import os, signal, time
from eesmm_jax import workdir
preemption = workdir.Preemption()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("first: stop requested" if preemption.reached(1) else "first: ignored", flush=True)
try:
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)
  print("second: ignored")
except KeyboardInterrupt:
  print("second: KeyboardInterrupt")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
  assert out.stdout.splitlines()[-2:] == ["first: stop requested",
                                          "second: KeyboardInterrupt"], out.stderr[-2000:]
  assert "Ctrl-C: stopping at the next step boundary" in out.stdout


# ----------------------------------------------------------------------------------------------
# 8: reading a source never writes into it.


def test_finetuning_from_a_folder_without_checkpoints_creates_nothing_there(tmp_path):
  import jax

  from eesmm_jax import finetune
  from eesmm_jax import step as step_lib
  from tests.train.test_finetune import tiny_config as finetune_config
  source = tmp_path / "not_a_run"
  source.mkdir()
  (source / "notes.txt").write_text("x")
  config = finetune_config(str(tmp_path), init_from=str(source))
  with pytest.raises(ValueError, match=r"holds no checkpoint \(no checkpoints/<step>\)"):
    finetune.initial_params(config, step_lib.create_encoder(config, num_classes=10),
                            jax.random.key(0))
  assert os.listdir(source) == ["notes.txt"]
