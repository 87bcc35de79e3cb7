"""The timing tool end to end on the cpu-small preset, shrunk to a few cells that take seconds."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from eesmm_jax import plan
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.tools import flops
from eesmm_jax.tools.benchmark import report, runner
from tests import xla_flags

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

REQUIRED = ("method", "num_mix", "backbone", "img_size", "window_size", "batch_size",
            "images_per_sec", "step_time_s", "flops_per_image", "peak_bytes", "peak_bytes_source",
            "device", "compile_time_s", "device_hours_per_epoch", "mfu")


def test_peak_table_matches_device_names():
  assert report.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert report.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert report.peak_flops("Tesla V100-SXM2-32GB", "float16") == 125e12
  assert report.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert report.peak_flops("cpu", "float32") is None


def test_flops_count_the_trainers_step_whatever_the_mesh_and_the_forms():
  """`flops.step_flops`, the one counter: the trainer's step lowered for one CPU device with the
  portable forms, so a mesh of 4 devices, the XLA:CPU forms or the compiled program's count
  (which on a GPU misses the cuBLAS matmuls) change nothing."""
  config = flops.step_config("swin_micro", 64, 2, num_mix=1, batch=8)
  counted = flops.step_flops(config)
  assert 1e8 < counted < 1e11
  # The same step lowered by hand on 4 devices with the portable forms: the same count.
  p = plan.pretraining(config, sharding.make_mesh(jax.devices()[:4]), impl="xla",
                       attention_impl="xla")
  images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.uint8, sharding=p.data_sharding)
  lowered = step_lib.jit_train_step(p).lower(p.state_shapes, images)
  assert lowered.cost_analysis()["flops"] == pytest.approx(counted, rel=1e-9)
  # The XLA:CPU forms count their sums as matmuls: a different number, which the counter avoids.
  q = plan.pretraining(config, sharding.make_mesh(jax.devices()[:1]), impl="xla_cpu",
                       attention_impl="xla_cpu")
  images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.uint8, sharding=q.data_sharding)
  cpu_forms = step_lib.jit_train_step(q).lower(q.state_shapes, images).cost_analysis()["flops"]
  assert cpu_forms != pytest.approx(counted, rel=1e-4)
  # EESMM n = 2 over the same 8 images: about half the encoder's work.
  assert 0.45 < flops.step_flops(flops.step_config("swin_micro", 64, 2, 2, 8)) / counted < 0.8


def test_flops_fall_back_to_the_compiled_cpu_program_without_a_lowered_count(monkeypatch):
  config = flops.step_config("swin_micro", 64, 2, num_mix=2, batch=8)
  lowered_count = flops.step_flops(config)
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  compiled_count = flops.step_flops(config)
  # XLA's optimisations change the count a little (fusion drops or adds elementwise work).
  assert compiled_count == pytest.approx(lowered_count, rel=0.1)


def test_cpu_small_preset_writes_sane_tables(tmp_path):
  out = tmp_path / "timing"
  # A subprocess: timm must be imported before TensorFlow, which other tests may have loaded.
  # Two simulated CPU devices (conftest's 8 compile slower): batch 4 = n x devices for n = 2.
  cmd = [sys.executable, "-m", "eesmm_jax.tools.benchmark", "--preset", "cpu-small", "--out", str(out),
         "--backbones", "swin_micro", "--sizes", "64/2", "--methods", "simmim,eesmm2",
         "--batch", "4", "--steps", "2",
         "--warmup", "1", "--torch", "eager"]  # --loop: test_core's TF-free cell
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                             "XLA_FLAGS": xla_flags(2)})
  assert proc.returncode == 0, proc.stderr[-3000:]

  cells = json.loads((out / "timing.json").read_text())
  assert [(c["impl"], c["num_mix"]) for c in cells] == [
      ("jax", 1), ("jax", 2), ("torch-eager", 1)]
  for c in cells:
    assert c["status"] == "ok", c["status"]
    assert set(REQUIRED) <= set(c), set(REQUIRED) - set(c)
    assert c["img_size"] == 64 and c["window_size"] == 2 and c["batch_size"] == 4
    assert c["step_time_s"] > 0 and len(c["step_times_s"]) == 2
    assert c["images_per_sec"] == pytest.approx(4 / c["step_time_s"])
    assert c["images_per_sec_per_device"] == pytest.approx(c["images_per_sec"] / c["num_devices"])
    assert c["device_hours_per_epoch"] == pytest.approx(
        1_281_167 / c["images_per_sec_per_device"] / 3600)
    assert c["mfu"] is None  # CPUs have no entry in the peak table
    assert c["finite"]
  simmim, eesmm, torch_row = cells
  assert simmim["loss_scale"] is None and eesmm["loss_scale"] is None  # float32: no loss scale
  # XLA's FLOPs: a tiny Swin at 64 px is O(0.1) GFLOPs per image; n = 2 halves the encoder
  # (0.70 here: at 4 images per step the optimizer and decoder weigh more than at Swin-B sizes).
  assert simmim["flops_per_image"] == pytest.approx(
      flops.step_flops(flops.step_config("swin_micro", 64, 2, 1, 4)) / 4, rel=1e-9)
  assert 0.45 < eesmm["flops_per_image"] / simmim["flops_per_image"] < 0.8
  assert torch_row["flops_per_image"] == simmim["flops_per_image"]
  assert simmim["num_devices"] == 2 and torch_row["num_devices"] == 1
  for c in (simmim, eesmm):
    assert c["peak_bytes"] > 0 and c["peak_bytes_source"].startswith("xla")
    assert "loop_images_per_sec" not in c  # only with --loop
  assert eesmm["speedup_vs_simmim"] == pytest.approx(
      eesmm["images_per_sec"] / simmim["images_per_sec"])
  assert simmim["ratio_vs_torch_eager_simmim"] > 0
  # cpu-small interleaves: each cell in its own process, a step of each in turn.
  assert all(c["timing"].startswith("interleaved") for c in cells)

  table = (out / "timing.md").read_text()
  assert "| swin_micro | 64/2 | EESMM n=2 | jax |" in table
  assert "paper GPU-h/ep" in table and "Units:" in table
  with Image.open(out / "timing.png") as png:
    assert png.size[0] > 100 and png.size[1] > 50


def test_profile_sorts_xla_thunks_and_aten_ops_into_the_same_kinds():
  """`kernel_bench profile` compares JAX and PyTorch by kind of op: each executed instruction of
  a compiled step must land in the kind it is, whatever XLA named it."""
  import re

  import jax
  import jax.numpy as jnp
  from eesmm_jax.tools import kernel_bench

  def step(x, w):
    def loss(w):
      h = jnp.tanh(x @ w)
      return jnp.sum(jnp.transpose(h) @ h) + jnp.sum(h, axis=0).max()
    return w - 0.1 * jax.grad(loss)(w)  # the update: outside the model's jvp

  hlo = jax.jit(step).lower(jnp.ones((32, 16)), jnp.ones((16, 8))).compile().as_text()
  kinds = kernel_bench._xla_kinds(hlo)
  entry = hlo[hlo.index("\nENTRY "):]
  by_op = {m.group(2): kinds[m.group(1)] for m in re.finditer(
      r'%([\w.\-]+) = .*?op_name="([^"]+)"', entry)}
  assert by_op["jit(step)/jvp()/dot_general"] == "matmuls"
  assert by_op["jit(step)/jvp()/reduce_max"] == "reductions"
  assert by_op["jit(step)/jvp()/tanh"] == "elementwise"
  assert by_op["jit(step)/transpose(jvp())/broadcast_in_dim"] == "copies and transposes"
  assert by_op["jit(step)/sub"] == "optimizer"
  # The same kinds for PyTorch's aten ops, by name.
  expect = {"aten::addmm": "matmuls", "aten::bmm": "matmuls", "aten::convolution_backward":
            "matmuls", "aten::native_layer_norm_backward": "reductions", "aten::_softmax":
            "reductions", "aten::copy_": "copies and transposes", "aten::roll":
            "copies and transposes", "aten::gelu_backward": "elementwise", "aten::add":
            "elementwise", "aten::_foreach_mul_": "optimizer"}
  assert {op: kernel_bench._torch_kind(op) for op in expect} == expect


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch 0: must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--methods", "simmim,foo"], "--methods: 'foo' is unknown; choose from"),
    (["--sizes", "100/7"], "--sizes 100/7 (swin_mini): "),
    (["--batch", "13", "--methods", "eesmm2"], "--batch 13: EESMM n=2 needs a multiple of n x "),
])
def test_bad_flags_are_refused_in_one_line_before_anything_compiles(flags, message, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self: compiled.append(self))
  with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    runner.run(["--out", "unused", "--torch", "none"] + flags)
  assert "\n" not in str(e.value) and compiled == []


@pytest.mark.parametrize("bad", ["224x7", "224", "224/0", "a/7"])
def test_a_malformed_size_is_refused_naming_it(bad):
  """--sizes (and kernel_bench --size) take img/window: anything else stops with one line that
  names the value, before anything compiles."""
  with pytest.raises(SystemExit, match=f"size '{bad}' is not img/window"):
    runner.resolve(runner.parse_args(["--sizes", f"192/6,{bad}", "--out", "unused"]))


def test_interleaved_cells_time_in_their_own_processes_and_a_failure_stays_in_its_cell():
  """`_interleaved` (cpu-small's timing): each cell's worker process answers one timed step per
  round; a cell that fails to build reports its error and the others still finish."""
  args = runner.parse_args(["--out", "unused", "--steps", "3", "--warmup", "1"])
  grid = runner.resolve(args)
  job = dict(framework="torch", impl="torch-eager", num_mix=1, remat="none", img_size=64,
             window=2, batch=2, grid=grid, args=args)
  good, bad = runner._interleaved([dict(job, backbone="swin_micro"),
                                      dict(job, backbone="no_such_swin")], steps=3)
  assert good["finite"] and len(good["step_times_s"]) == 3 and good["step_time_s"] > 0
  assert bad == {"status": "error: KeyError: 'no_such_swin'"}


def test_cells_timed_in_turn_in_one_process(tmp_path):
  """--no-interleave (the gpu preset's timing): the cells run in this process, one after
  another."""
  out = tmp_path / "timing"
  cmd = [sys.executable, "-m", "eesmm_jax.tools.benchmark", "--out", str(out), "--no-interleave",
         "--backbones", "swin_micro", "--sizes", "64/2", "--methods", "simmim", "--batch", "2",
         "--steps", "2", "--warmup", "1", "--torch", "none"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": xla_flags(1)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  (cell,) = json.loads((out / "timing.json").read_text())
  assert cell["status"] == "ok" and len(cell["step_times_s"]) == 2
  assert cell["timing"].startswith("in turn")
  assert "Cells timed in turn" in (out / "timing.md").read_text()
