"""The prepared GPU probe: its CPU test runs every phase and writes every phase's fields; a
phase that would pass the deadline is skipped with a line saying why."""
import json
import os
import subprocess

import pytest

from eesmm_jax.tools import gpu_probe
from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_cpu_test_preset_runs_every_phase_and_writes_its_fields(tmp_path):
  out = tmp_path / "probe"
  proc = subprocess.run([os.path.join(ROOT, "launch", "gpu_probe.sh"), "--cpu-test", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHON": "python",
                             "DEADLINE": "900"})
  assert proc.returncode == 0, proc.stdout[-2000:] + open(out / "stderr.txt").read()[-3000:]
  result = json.load(open(out / "probe.json"))
  for phase in gpu_probe.PHASES:
    assert result[phase]["status"] == "ok", (phase, result[phase])
  env = result["environment"]
  assert env["matmul_flops_per_s"] > 0 and env["copy_bytes_per_s"] > 0
  step = result["step"]
  assert step["step_ms"] > 0 and step["census"]["fusions"] and step["census"]["entry_instructions"]
  assert set(step["split"]) == {"forward_ms", "backward_ms", "optimizer_and_rest_ms"}
  assert 0 < step["profile"]["device_busy_fraction"] <= 1 and step["profile"]["ms_by_kind"]
  loops = result["loop"]["cells"]
  assert [c["method"] for c in loops] == ["SimMIM", "EESMM n=3"]
  for c in loops:
    assert c["loop_vs_bare"] > 0 and c["timed_steps"] == gpu_probe.PRESETS["cpu-test"]["steps"]
    assert {"host_make_ms", "host_wait_ms", "host_dispatch_ms"} <= set(c["host_ms_per_step"])
  scaling = result["batch_scaling"]["rows"]
  assert {(r["comparison"], r["method"]) for r in scaling} >= {
      ("SimMIM batch sweep", "SimMIM"), ("equal batch", "EESMM n=2"),
      ("equal memory", "EESMM n=3")}
  assert [r["attention"] for r in result["attention"]["rows"]] == ["xla", "xla_cpu"]
  assert all("step_ms" in r for r in result["flags"]["rows"])
  assert result["input"]["synthetic_device"]["images_per_sec"] > 0
  assert "| loop | SimMIM |" in open(out / "probe.md").read()


def test_a_phase_past_the_deadline_is_skipped_with_why(tmp_path):
  probe = gpu_probe.Probe(str(tmp_path), "cpu-test", deadline=10.0)
  probe.run("step", 60.0, lambda: pytest.fail("must not run"))
  probe.run("input", 0.0, lambda: {"x": 1})
  probe.run("flags", 0.0, lambda: 1 / 0)
  result = json.load(open(tmp_path / "probe.json"))
  assert result["step"]["status"].startswith("skipped: estimated 60 s")
  assert result["input"]["status"] == "ok" and result["input"]["x"] == 1
  assert result["flags"]["status"].startswith("failed: ZeroDivisionError")
  assert (tmp_path / "flags-error.txt").exists() and (tmp_path / "probe.md").exists()
