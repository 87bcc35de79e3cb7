"""The trainer: sharding invariance, exact resume, and the CLI end to end, at a tiny size."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eesmm_jax import train
from eesmm_jax.config import pretrain_config
from tests import xla_flags

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  c = pretrain_config()
  c.img_size = 32
  c.model.name = "swin_tiny"
  c.model.patch_size = 2
  c.model.window_size = 4
  c.model.embed_dim = 16
  c.model.depths = (2, 2)
  c.model.num_heads = (1, 2)
  c.model.drop_path_rate = 0.1  # exercises the dropout rng
  c.objective.mask_patch_size = 8
  c.batch_size = 16
  c.data.dataset = "synthetic"
  c.data.synthetic_examples = 16  # one step per epoch
  c.optim.warmup_epochs = 1
  c.optim.epochs = 4
  c.log_every = 1
  c.picture_every = 0
  c.checkpoint_every = 100
  return set_keys(c, **overrides)


def set_keys(c, **overrides):
  """Sets dotted keys ('optim.warmup_epochs') of a ConfigDict, as --config.<key> flags do."""
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def saved_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    restored = mngr.restore(mngr.latest_step())
  return restored["params"]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_eight_devices_equal_one(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  config = tiny_config(total_steps=2)
  with jax.default_matmul_precision("highest"):
    one = train.pretrain(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = train.pretrain(config, str(tmp_path / "eight"))
  assert len(eight.params["encoder"]["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]
             .sharding.device_set) == 8
  for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "eight")):
    assert a["step"] == b["step"]
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5, rtol=0)
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 one.params, eight.params)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  config = tiny_config(total_steps=6)
  train.pretrain(config, straight)
  train.pretrain(config, split, stop_after=3)
  assert [r["step"] for r in losses(split)] == [1, 2, 3]
  train.pretrain(config, split)  # restores step 3 from the workdir
  a, b = saved_params(straight), saved_params(split)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert [r["loss"] for r in losses(straight)] == [r["loss"] for r in losses(split)]


def test_command_line_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "eesmm_jax.main", "--config", os.path.join(ROOT, "configs/demo.py"),
         "--workdir", str(workdir), "--config.data.dataset=synthetic",
         "--config.data.synthetic_examples=64", "--config.batch_size=16",
         "--config.total_steps=4", "--config.log_every=2", "--config.picture_every=4",
         "--config.checkpoint_every=2", "--config.model.embed_dim=24",
         "--config.optim.warmup_epochs=0"]
  env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step       4/4" in out.stdout
  rows = losses(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  assert {"step", "loss", "lr", "images_per_sec", "images_per_sec_per_device",
          "grad_norm", "loss_component_0", "loss_component_1"} <= set(rows[0])
  assert os.path.exists(workdir / "pictures" / "recon_0000004.png")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert os.listdir(workdir / "tensorboard")

  bad = subprocess.run(cmd[:6] + ["--config.objective.num_mixx=3"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
  assert bad.returncode != 0 and "num_mixx" in bad.stderr
