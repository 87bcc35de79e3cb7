"""`launch/local_multiprocess.sh` stops every process when one fails or when it is signalled,
and returns only once they are gone, with an exit status that says what they did.

Most tests run the launcher over a stand-in for `python` (PYTHON=<stub>), a few lines that act
as a run would on TERM: stuck at a collective (ignores it) or saving on preemption (exits 0 a
little later). That takes seconds; the last test runs the real trainer on 2 processes.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests import FAST_COMPILE

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")

STUB = """\
#!{python}
import os, signal, sys, time
if sys.argv[1] == "-c":  # the launcher's checks (import eesmm_jax, a free port)
  exec(sys.argv[2])
  sys.exit(0)
out, i = os.environ["STUB_DIR"], os.environ["JAX_PROCESS_ID"]
def on_term(*_):
  open(os.path.join(out, f"term{{i}}"), "w").close()
  if os.environ["STUB_ON_TERM"] == "save":  # as on preemption: save, then exit 0
    time.sleep(float(os.environ.get("STUB_SAVE_S", "1")))
    open(os.path.join(out, f"saved{{i}}"), "w").close()
    sys.exit(0)
  # else: stuck at a collective, TERM changes nothing
signal.signal(signal.SIGTERM, on_term)
print("running", flush=True)
open(os.path.join(out, f"pid{{i}}"), "w").write(str(os.getpid()))
while True:
  time.sleep(0.05)
"""


def alive(pid):
  """A process that has not ended (a zombie has ended: it only waits to be reaped)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


class Launch:
  """The launcher over the stub, N processes; the pids of the processes it started."""

  def __init__(self, tmp_path, procs=2, on_term="ignore", **env):
    self.dir = tmp_path
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    self.proc = subprocess.Popen(
        [LAUNCHER, str(procs), "1", "--", "ignored"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHON": str(stub), "STUB_DIR": str(tmp_path),
             "STUB_ON_TERM": on_term, **{k: str(v) for k, v in env.items()}})
    deadline = time.time() + 60
    self.pids = []
    while len(self.pids) < procs:
      assert time.time() < deadline and self.proc.poll() is None, "the processes did not start"
      self.pids = [int((tmp_path / f"pid{i}").read_text()) for i in range(procs)
                   if (tmp_path / f"pid{i}").exists() and (tmp_path / f"pid{i}").read_text()]
      time.sleep(0.05)

  def wait(self, timeout):
    """(exit status, seconds until it returned, stderr); the launcher must be done by then."""
    start = time.time()
    out, err = self.proc.communicate(timeout=timeout)
    return self.proc.returncode, time.time() - start, err

  def marked(self, what):
    return sorted(int(f[len(what):]) for f in os.listdir(self.dir) if f.startswith(what))

  def kill_all(self):  # after a failed assertion: leave nothing behind
    for pid in self.pids:
      if alive(pid):
        os.kill(pid, signal.SIGKILL)
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


@pytest.fixture
def launch(tmp_path):
  launches = []

  def start(*args, **kw):
    launches.append(Launch(tmp_path, *args, **kw))
    return launches[-1]

  yield start
  for l in launches:
    l.kill_all()


def test_kill_minus_9_of_one_process_stops_the_others(launch):
  """They are stuck at a collective: TERM (ignored), then KILL after FAIL_GRACE_S."""
  run = launch(procs=3, on_term="ignore", FAIL_GRACE_S=2)
  os.kill(run.pids[1], signal.SIGKILL)
  status, took, err = run.wait(timeout=30)
  assert status == 128 + signal.SIGKILL, err
  assert not [pid for pid in run.pids if alive(pid)]
  assert 2 <= took < 10, err  # the grace, then at once
  assert run.marked("term") == [0, 2]  # TERM came first
  assert f"p1 (pid {run.pids[1]}) exited with status 137" in err


def test_a_process_that_exits_0_does_not_stop_the_others(launch):
  run = launch(procs=2, on_term="save", STUB_SAVE_S=0, FAIL_GRACE_S=60)
  os.kill(run.pids[0], signal.SIGTERM)  # saves and exits 0 (finished, or preempted alone)
  time.sleep(1)
  assert run.proc.poll() is None and alive(run.pids[1])
  os.kill(run.pids[1], signal.SIGKILL)
  status, took, err = run.wait(timeout=30)
  assert status == 137 and took < 10, err  # nothing left to stop: at once


def test_sigterm_to_the_launcher_waits_for_the_processes_to_save(launch):
  run = launch(procs=2, on_term="save", STUB_SAVE_S=3, TERM_GRACE_S=60)
  run.proc.send_signal(signal.SIGTERM)
  status, took, err = run.wait(timeout=60)
  # Returned once both had saved and exited 0 (preemption: the same command resumes), not before.
  assert status == 0, err
  assert run.marked("saved") == [0, 1] and took >= 3
  assert not [pid for pid in run.pids if alive(pid)]
  assert "every process exited 0" in err


def test_ctrl_c_saves_and_a_second_one_kills(launch):
  run = launch(procs=2, on_term="save", STUB_SAVE_S=60, TERM_GRACE_S=300)
  run.proc.send_signal(signal.SIGINT)
  deadline = time.time() + 30  # the launcher passes TERM on (seconds on a loaded machine)
  while run.marked("term") != [0, 1] and time.time() < deadline:
    time.sleep(0.05)
  assert run.proc.poll() is None and run.marked("term") == [0, 1]  # asked to save, saving
  run.proc.send_signal(signal.SIGINT)
  status, took, err = run.wait(timeout=30)
  assert status == 137 and took < 10, err
  assert not [pid for pid in run.pids if alive(pid)] and run.marked("saved") == []


def test_a_process_that_does_not_stop_is_killed_after_the_grace(launch):
  run = launch(procs=2, on_term="ignore", TERM_GRACE_S=2)
  run.proc.send_signal(signal.SIGTERM)
  status, took, err = run.wait(timeout=30)
  assert status == 137 and 2 <= took < 10, err
  assert not [pid for pid in run.pids if alive(pid)]
  assert "killing the processes still running" in err


def test_the_grace_periods_must_be_numbers(tmp_path):
  out = subprocess.run([LAUNCHER, "2", "1", "--", "x"], capture_output=True, text=True,
                       env={**os.environ, "TERM_GRACE_S": "5m"})
  assert out.returncode == 2 and "TERM_GRACE_S" in out.stderr


# ----------------------------------------------------------------------------- the real run
def test_real_run_kill_minus_9_then_sigterm(tmp_path):
  """2 processes of the trainer: kill -9 of one stops the other within the grace (not at JAX's
  heartbeat, ~80 s later); SIGTERM to the launcher makes both save and exit 0."""
  data = tmp_path / "images"
  data.mkdir()
  rng = np.random.default_rng(0)
  for i in range(40):
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(data / f"{i:02d}.png")
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "XLA_FLAGS_EXTRA": FAST_COMPILE}  # the launcher sets the device count

  def start(workdir):
    cmd = [LAUNCHER, "2", "1", "--", "--config", os.path.join(ROOT, "configs/demo.py"),
           "--workdir", str(workdir), "--config.data.dataset=folder",
           f"--config.data.data_dir={data}", "--config.batch_size=8",
           "--config.total_steps=100000", "--config.log_every=1", "--config.picture_every=0",
           "--config.checkpoint_every=100000", "--config.model.embed_dim=16",
           "--config.model.num_heads=(1,2)", "--config.optim.warmup_epochs=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**env, "FAIL_GRACE_S": "3"})
    lines = []  # drained all along: a full pipe would block the processes' logging
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.time() + 600  # startup and compile: minutes on a loaded 2-core machine
    while not (workdir / "metrics.jsonl").exists():  # training: both in the step's collectives
      assert time.time() < deadline and proc.poll() is None, "".join(lines)[-3000:]
      time.sleep(0.2)
    pids = [int(m) for m in re.findall(r"^\S+: p\d is pid (\d+)$", "".join(lines), re.M)]
    assert len(pids) == 2, "".join(lines)[-3000:]
    return proc, pids, reader, lines

  proc, pids, _, lines = start(tmp_path / "killed")
  try:
    os.kill(pids[1], signal.SIGKILL)
    start_wait = time.time()
    proc.wait(timeout=60)
    assert proc.returncode == 137 and time.time() - start_wait < 30, "".join(lines)[-3000:]
    assert not [pid for pid in pids if alive(pid)]
  finally:
    for pid in pids:
      if alive(pid):
        os.kill(pid, signal.SIGKILL)

  workdir = tmp_path / "preempted"
  proc, pids, reader, lines = start(workdir)
  try:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    reader.join(timeout=60)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert not [pid for pid in pids if alive(pid)]
    assert out.count("preempted") >= 1 and os.listdir(workdir / "checkpoints"), out[-3000:]
  finally:
    for pid in pids:
      if alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_paper_scale_study_runs_the_protocol_through_a_given_launcher(tmp_path):
  """The paper-scale study (not run here) runs its six trainer commands in order, each into its
  own workdir, through $LAUNCHER; here a stand-in records them."""
  log = tmp_path / "calls"
  stub = tmp_path / "launcher"
  stub.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
  stub.chmod(0o755)
  out = subprocess.run([os.path.join(ROOT, "launch", "study_paper_scale.sh"), str(tmp_path / "w"),
                        "/data"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LAUNCHER": str(stub)})
  calls = log.read_text().splitlines()
  assert len(calls) == 6, out.stderr
  assert calls[0].startswith("--config configs/simmim_swin_base.py:192 --workdir ")
  assert "configs/eesmm_swin_base_192.py --config.optim.epochs=200" in calls[2]
  assert all(f"--config.init_from={tmp_path}/w/{pre} --workdir {tmp_path}/w/ft_{pre}" in call
             for pre, call in zip(("simmim_b192_100ep", "eesmm2_b192_100ep",
                                   "eesmm2_b192_200ep"), calls[3:]))
  assert all(c.endswith("--config.data.data_dir=/data") for c in calls)
  # No eval.json was written by the stand-in: the summary says which one is missing.
  assert out.returncode != 0 and "eval.json" in out.stderr
