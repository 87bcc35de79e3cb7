"""A run's hold on its workdir (eesmm_jax/workdir.py): one writer, a corrupt checkpoint skipped,
a save that cannot complete stopped at the save, a resume under a changed config, Ctrl-C, and a
metrics log without repeated steps. Each case failed before workdir.py existed."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

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
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("second: ignored")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 130, out.stderr[-2000:]
  assert out.stdout.splitlines()[-1] == "first: stop requested"
  assert "Ctrl-C: stopping at the next step boundary" in out.stdout
  assert out.stderr.strip().splitlines()[-1] == (
      "Ctrl-C again: aborted without a checkpoint; the same command resumes from the last one "
      "saved")


def test_two_ctrl_c_while_the_step_compiles_exit_130_at_once_without_a_crash(tmp_path):
  """Python runs signal handlers only between bytecodes, so a handler waits out a compile: the
  second Ctrl-C used to land when XLA returned, and the exit under XLA's threads segfaulted."""
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  # XLA's default optimisation, no compilation cache: a compile of several seconds.
  environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  cmd = [x.replace("depths=(2, 2)", "depths=(2, 4)") for x in cli(tmp_path)]
  proc = subprocess.Popen(cmd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=environ, cwd=ROOT)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                            daemon=True)
  reader.start()
  deadline = time.time() + 600
  while not any(x.startswith("compiling the train step") for x in lines):
    assert proc.poll() is None and time.time() < deadline, "".join(lines)
    time.sleep(0.01)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  try:
    code = proc.wait(timeout=60)
  finally:
    proc.kill()
  took = time.time() - sent
  reader.join(timeout=10)
  err = proc.stderr.read()
  out = "".join(lines)
  assert code == 130, (code, out[-2000:], err[-3000:])
  assert took < 3, took
  assert "compiled the train step" not in out  # it was still compiling
  assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
  assert "Ctrl-C again: aborted without a checkpoint" in err


# ----------------------------------------------------------------------------------------------
# A corrupt record: config.json, metrics.jsonl.


def test_a_corrupt_config_json_is_refused_with_the_way_out(four_steps, tmp_path):
  run = copy_of(four_steps, tmp_path)
  text = (run / "config.json").read_text()
  (run / "config.json").write_text(text[: len(text) // 2])  # torn
  with pytest.raises(workdir.CorruptRecord, match=rf"^{run}/config.json is not valid JSON "
                     r"\(truncated\?\): the checkpoints beside it are intact; delete it to "
                     r"resume with the current config .*, or restore it$"):
    train.pretrain(tiny_config(total_steps=6, checkpoint_every=2), str(run))
  assert steps_saved(run) == [2, 4]  # nothing touched
  os.remove(run / "config.json")  # the way out it names
  state = train.pretrain(tiny_config(total_steps=6, checkpoint_every=2), str(run))
  assert int(state.step) == 6 and json.loads((run / "config.json").read_text())["total_steps"] == 6


def test_a_torn_last_metrics_line_is_dropped_on_resume(four_steps, tmp_path, capsys):
  run = copy_of(four_steps, tmp_path)
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss": 0.31')  # a write cut short by a full disk
  state = train.pretrain(tiny_config(total_steps=6, checkpoint_every=2), str(run))
  assert int(state.step) == 6
  assert [r["step"] for r in losses(run)] == [1, 2, 3, 4, 5, 6]
  assert (f"{run}/metrics.jsonl: dropped its last line (24 bytes), not a whole row"
          in capsys.readouterr().out)


def test_torn_and_unterminated_metrics_rows(tmp_path, capsys):
  from eesmm_jax import metrics
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": i, "loss": 1.0 / i}) for i in (1, 2, 3)]
  path.write_text(f"{rows[0]}\n{rows[1]}\n\0\0\0\0\n[1, 2]\n{rows[2]}")
  metrics._drop_rows_after(str(path), 5)
  assert path.read_text() == f"{rows[0]}\n{rows[1]}\n{rows[2]}\n"  # the next row starts a line
  assert "dropped 2 line(s) (3, 4), not a whole row" in capsys.readouterr().out
  metrics._drop_rows_after(str(path), 2)
  assert path.read_text() == f"{rows[0]}\n{rows[1]}\n"
  assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------
# An output the disk refuses stops the run at that step, with a checkpoint.


def no_space():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_metrics_jsonl_stops_with_a_checkpoint_and_resumes(tmp_path,
                                                                            monkeypatch):
  from eesmm_jax import metrics

  class FillsUp:
    """metrics.jsonl on a disk that fills up at step 3's row: half of it lands, then ENOSPC."""

    def __init__(self, f):
      self.f = f

    def write(self, text):
      if json.loads(text)["step"] >= 3:
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise no_space()
      return self.f.write(text)

    def flush(self):
      self.f.flush()

    def close(self):
      self.f.close()

  real_open = open
  monkeypatch.setattr(metrics, "open", lambda path, mode="r", **kw: FillsUp(
      real_open(path, mode, **kw)) if str(path).endswith("metrics.jsonl") and mode == "a"
      else real_open(path, mode, **kw), raising=False)
  with pytest.raises(metrics.OutputError) as e:
    train.pretrain(tiny_config(total_steps=6), str(tmp_path))
  # Step 3's row is written once step 4 is dispatched (the loop reads metrics a step behind),
  # so the run stops at step 4's boundary, with step 4's checkpoint.
  assert str(e.value) == (
      f"writing {tmp_path}/metrics.jsonl failed at step 3: No space left on device; saved a "
      f"checkpoint at step 4 in {tmp_path}/checkpoints: free space (or fix the disk) and the "
      f"same command resumes from it")
  assert steps_saved(tmp_path) == [4]
  monkeypatch.undo()
  state = train.pretrain(tiny_config(total_steps=6), str(tmp_path))
  # The torn row is dropped; steps 3 and 4 are not run again (step 4's checkpoint is the
  # resume's start), so their rows are the ones lost.
  assert int(state.step) == 6 and [r["step"] for r in losses(tmp_path)] == [1, 2, 5, 6]


def test_tensorboard_events_the_disk_refuses_stop_the_run_with_a_checkpoint(tmp_path,
                                                                           monkeypatch):
  from eesmm_jax import metrics

  class Writer(metrics._NoWriter):
    def write_scalars(self, step, scalars):
      if step == 2:
        raise no_space()

  monkeypatch.setattr(metrics, "summary_writer", lambda workdir: Writer())
  with pytest.raises(metrics.OutputError, match=rf"^writing the TensorBoard events in "
                     rf"{tmp_path}/tensorboard failed at step 2: No space left on device; saved "
                     rf"a checkpoint at step 3 in {tmp_path}/checkpoints"):
    train.pretrain(tiny_config(total_steps=6), str(tmp_path))
  assert steps_saved(tmp_path) == [3]  # step 2's row is written after step 3 is dispatched


def test_a_picture_the_disk_refuses_before_the_first_checkpoint_saves_the_state(tmp_path,
                                                                               monkeypatch):
  from PIL import Image

  def save(self, fp, *args, **kwargs):  # a few bytes land, then the disk is full
    with open(fp, "wb") as f:
      f.write(b"\x89PNG")
    raise no_space()

  monkeypatch.setattr(Image.Image, "save", save)
  with pytest.raises(workdir.metrics.OutputError, match=rf"^writing the reconstruction picture "
                     rf"in {tmp_path}/pictures failed at step 2: No space left on device; saved "
                     rf"a checkpoint at step 2 in "):
    train.pretrain(tiny_config(total_steps=6, checkpoint_every=4, picture_every=2),
                   str(tmp_path))
  assert steps_saved(tmp_path) == [2]
  assert os.listdir(tmp_path / "pictures") == []  # no half picture left under any name


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
