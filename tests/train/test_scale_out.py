"""Scale-out: several processes, checkpoints across device counts, fp16 loss scaling, FSDP.

The multi-process test runs the CLI through `launch/local_multiprocess.sh` (N processes with
gloo CPU collectives on this machine), which is how CI tests multi-host code.
"""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.dynamic_scale import DynamicScale
from PIL import Image

from eesmm_jax import step as step_lib
from eesmm_jax import train
from tests import FAST_COMPILE
from tests.train.test_train import ROOT, losses, tiny_config

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def assert_same_losses(a, b, steps):
  a, b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
  for step in steps:
    np.testing.assert_allclose(a[step]["loss"], b[step]["loss"], atol=1e-5, rtol=0,
                               err_msg=f"step {step}")


# ----------------------------------------------------------------------------- several processes
def launch(procs, devices, workdir, data_dir, timeout=900):
  cmd = [LAUNCHER, str(procs), str(devices), "--", "--config",
         os.path.join(ROOT, "configs/demo.py"), "--workdir", str(workdir),
         "--config.data.dataset=folder", f"--config.data.data_dir={data_dir}",
         "--config.batch_size=16", "--config.total_steps=4", "--config.log_every=1",
         "--config.picture_every=0", "--config.checkpoint_every=2",
         "--config.model.embed_dim=16", "--config.model.num_heads=(1,2)",
         "--config.optim.warmup_epochs=0"]
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},  # the launcher sets it
         "XLA_FLAGS_EXTRA": FAST_COMPILE}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_two_processes_equal_one_process_and_resume_across_them(tmp_path):
  """2 processes x 2 devices see the same global batches as 1 x 4, and give the same losses;
  the 1 x 4 run's checkpoint resumes on 2 processes (restore from several processes)."""
  data = tmp_path / "images"
  data.mkdir()
  rng = np.random.default_rng(0)
  for i in range(40):
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(data / f"{i:02d}.png")
  (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # skipped and counted

  one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
  launch(1, 4, one, data)
  out = launch(2, 2, two, data)
  assert "[p1]" in out.stdout + out.stderr
  rows = losses(two)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(r["bad_images"] == 1 for r in rows)
  assert_same_losses(losses(one), rows, [1, 2, 3, 4])
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]

  # Saved by 1 process x 4 devices at step 2, resumed by 2 processes x 2 devices.
  shutil.copytree(one / "checkpoints" / "2", resumed / "checkpoints" / "2")
  launch(2, 2, resumed, data)
  assert [r["step"] for r in losses(resumed)] == [3, 4]
  assert_same_losses(losses(one), losses(resumed), [3, 4])


def test_launcher_fails_clearly():
  out = subprocess.run([LAUNCHER, "2"], capture_output=True, text=True)
  assert out.returncode == 2 and "usage" in out.stderr
  # One process fails (no --workdir): the launcher reports it and stops the other.
  out = subprocess.run([LAUNCHER, "2", "1", "--", "--config",
                        os.path.join(ROOT, "configs/demo.py")],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "exited with status" in out.stderr


# ----------------------------------------------------------------------------- device counts
@pytest.mark.parametrize("saved_on,resumed_on,fsdp", [(4, 2, False), (2, 4, True)])
def test_checkpoint_restores_on_another_device_count(tmp_path, saved_on, resumed_on, fsdp):
  config = tiny_config(total_steps=4, fsdp=fsdp)
  devices = jax.devices()
  with jax.default_matmul_precision("highest"):
    train.pretrain(config, str(tmp_path / "straight"), devices=devices[:saved_on])
    split = str(tmp_path / "split")
    train.pretrain(config, split, devices=devices[:saved_on], stop_after=2)
    state = train.pretrain(config, split, devices=devices[:resumed_on])
  assert all(len(x.sharding.device_set) == resumed_on for x in jax.tree_util.tree_leaves(state))
  assert [r["step"] for r in losses(split)] == [1, 2, 3, 4]
  assert_same_losses(losses(tmp_path / "straight"), losses(split), [1, 2, 3, 4])


def test_fsdp_equals_replicated(tmp_path):
  results = {}
  with jax.default_matmul_precision("highest"):
    for fsdp in (False, True):
      results[fsdp] = train.pretrain(tiny_config(total_steps=3, fsdp=fsdp),
                                               str(tmp_path / str(fsdp)))
  qkv = lambda s: s.params["encoder"]["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert "data" in tuple(qkv(results[True]).sharding.spec)
  assert tuple(qkv(results[False]).sharding.spec) in ((), (None, None))
  # The optimizer's moments are sharded like the params.
  mu = [x for x in jax.tree_util.tree_leaves(results[True].opt_state)
        if getattr(x, "shape", None) == qkv(results[True]).shape]
  assert mu and all("data" in tuple(x.sharding.spec) for x in mu)
  assert_same_losses(losses(tmp_path / "False"), losses(tmp_path / "True"), [1, 2, 3])
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 results[False].params, results[True].params)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5


# ----------------------------------------------------------------------------- fp16
def test_fp16_overflow_skips_the_step_and_halves_the_scale():
  """A step whose fp16 gradients overflow leaves params and optimizer state as they were, says
  so in its metrics and halves the loss scale; the next finite step updates again."""
  def loss_fn(params, images, rng, train_):
    # The forward in fp16, as the model runs with dtype float16.
    loss = jnp.mean((params["w"].astype(jnp.float16) * images.astype(jnp.float16)) ** 2)
    return loss.astype(jnp.float32), {"loss_components": loss[None].astype(jnp.float32)}

  tx = optax.adam(1e-2)
  params = {"w": jnp.ones((4,), jnp.float32)}
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                           dynamic_scale=DynamicScale(scale=2.0 ** 15),
                           skipped_in_a_row=jnp.zeros((), jnp.int32))
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, lambda _: 1e-2, accum_steps=1))

  # The forward is finite (100^2 < 65504); the scaled gradient 2^15 * 2 * 100 / 8 is not.
  big = jnp.full((2, 4), 100.0)
  after, metrics = step(state, big)
  assert int(metrics["finite"]) == 0 and int(metrics["skipped_in_a_row"]) == 1
  assert float(metrics["loss_scale"]) == 2.0 ** 14
  np.testing.assert_array_equal(after.params["w"], params["w"])
  for a, b in zip(jax.tree_util.tree_leaves(after.opt_state),
                  jax.tree_util.tree_leaves(state.opt_state)):
    np.testing.assert_array_equal(a, b)
  assert int(after.step) == 1  # the data moves on

  after2, metrics = step(after, jnp.full((2, 4), 0.5))
  assert int(metrics["finite"]) == 1 and int(metrics["skipped_in_a_row"]) == 0
  assert float(metrics["loss_scale"]) == 2.0 ** 14
  assert not np.array_equal(after2.params["w"], params["w"])
