"""Fine-tuning: the input under TFDS mocks, evaluation that counts each example once over two
processes, step-0 logits of a converted timm checkpoint, the 192/w6 -> 224/w7 move (at a tiny
size), the three modes and the command line."""
# timm (torchvision) must be imported before TensorFlow: the other order segfaults on import.
from tests import torch_ref  # noqa: I001

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from eesmm_jax import convert, finetune
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.data import finetune_input
from eesmm_jax.data import tfdata
from eesmm_jax.models import swin
from tests import xla_flags
from tests.train.test_train import set_keys

pytestmark = pytest.mark.slow  # whole runs: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4))


def tiny_config(data_dir, **overrides):
  """A 64 px, window 4, 2-stage Swin on the 10-class image folder."""
  c = finetune.finetune_config()
  c.img_size = 64
  c.model.name = "swin_tiny"
  c.model.window_size = 4
  c.model.embed_dim, c.model.depths, c.model.num_heads = TINY["embed_dim"], TINY["depths"], \
      TINY["num_heads"]
  c.model.drop_path_rate = 0.1
  c.data.dataset = "folder"
  c.data.data_dir = data_dir
  c.data.split, c.data.eval_split = "train", "test"
  c.data.prefetch = 0
  c.batch_size = 8
  c.eval_batch_size = 8
  c.optim.warmup_epochs = 1
  c.optim.epochs = 4
  c.log_every = 1
  return set_keys(c, **overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """10 classes; 16 train images, 13 test images (no batch size divides 13)."""
  root = tmp_path_factory.mktemp("classes")
  rng = np.random.default_rng(0)
  for split, n in (("train", 16), ("test", 13)):
    for i in range(n):
      d = root / split / f"c{i % 10}"
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (72, 80, 3), np.uint8)).save(d / f"{i}.png")
  return str(root)


# ----------------------------------------------------------------------------- input


@pytest.mark.parametrize("name,classes", [("imagenet2012", 1000), ("cifar10", 10),
                                          ("cifar100", 100)])
def test_finetune_pipelines_under_tfds_mock(name, classes, tmp_path):
  data = finetune_input.finetune_data_config()
  data.update(dict(dataset=name, data_dir=str(tmp_path), img_size=16, prefetch=0,
                   num_parallel_calls=1, shuffle_buffer=16, eval_split="train"))
  aug = finetune.finetune_config().aug
  with tfds.testing.mock_data(num_examples=6):
    assert finetune_input.num_classes(data) == classes
    it = finetune_input.create_finetune_iterator(data, aug, 4, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]  # crosses an epoch
    del it
    it = finetune_input.create_finetune_iterator(data, aug, 4, start_step=2, process_index=0,
                                                 process_count=1)
    resumed = next(it)
    del it
    evals = list(tfdata.create_eval_iterator(data, 4, split="train", process_index=0,
                                                     process_count=1))
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all()
    assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < classes)).all()
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  assert sum(int(b["mask"].sum()) for b in evals) == 6 and len(evals) == 2


def test_finetune_input_needs_labels(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  data = finetune_input.finetune_data_config()
  data.update(dict(dataset="folder", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="unlabelled"):
    finetune_input.num_classes(data)


# ----------------------------------------------------------------------------- evaluation


def test_eval_counts_every_example_once_over_two_processes(folder):
  config = tiny_config(folder)
  model = step_lib.create_encoder(config, num_classes=10)
  params = finetune.initial_params(config, model, jax.random.key(0))
  mesh = sharding.make_mesh()
  eval_step = jax.jit(finetune.make_eval_step(model))

  # Two processes' padded streams, joined as make_array_from_process_local_data joins them.
  per_process = [list(tfdata.create_eval_iterator(config.data, 8, "test",
                                                          process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(s) for s in per_process] == [2, 2]  # 7 and 6 examples in 8 slots each
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*per_process)]
  real = np.concatenate([b["image"][b["mask"]] for b in joined])
  assert len(real) == 13
  got = finetune.evaluate(eval_step, params, joined, NamedSharding(mesh, P("data")))

  # Reference: all 13 images at once, unpadded, no sharding.
  single = list(tfdata.create_eval_iterator(config.data, 16, "test", process_index=0,
                                                    process_count=1))[0]
  images, labels = single["image"][:13], single["label"][:13]
  np.testing.assert_allclose(np.sort(real.reshape(13, -1), 0),
                             np.sort(images.reshape(13, -1), 0), atol=1e-6)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
  top5 = np.argsort(-logits, -1)[:, :5]
  assert got["count"] == 13
  assert got["top1"] == (logits.argmax(-1) == labels).sum() / 13
  assert got["top5"] == (top5 == labels[:, None]).any(-1).sum() / 13
  loss = -(jax.nn.log_softmax(logits)[np.arange(13), labels]).mean()
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-4)


# ----------------------------------------------------------------------------- init_from


@pytest.mark.parity
def test_converted_timm_checkpoint_gives_timm_logits_at_step_0(folder, tmp_path):
  ref = torch_ref.TimmSwin(img_size=64, window_size=4, num_classes=10, drop_path_rate=0.0,
                           **TINY)
  torch_ref.perturb_(ref, seed=3)
  ref.eval()
  pth = str(tmp_path / "timm.pth")
  torch.save(ref.state_dict(), pth)
  config = tiny_config(folder, init_from=pth, total_steps=2)
  with jax.default_matmul_precision("highest"):
    state = finetune.run(config, str(tmp_path / "run"), stop_after=0)
    model = step_lib.create_encoder(config, num_classes=10)
    x = torch_ref.images(4, 64)
    ours = np.asarray(jax.jit(model.apply)({"params": state.params}, x))
  with torch.no_grad():
    expected = ref(torch_ref.to_nchw(x)).numpy()
  assert int(state.step) == 0
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_window_and_size_change_resizes_bias_tables(folder, tmp_path):
  """Pretrained at 48 px / window 6, fine-tuned at 56 px / window 7 (192/6 -> 224/7 at 1/4
  scale): the tables are bicubically resized, the rest copied, mask token and decoder dropped,
  a fresh head made; a pretraining workdir and a SimMIM-layout .pth give the same params."""
  enc = swin.SwinTransformer(img_size=48, window_size=6, num_classes=0, use_mask_token=True,
                             **TINY)
  x = np.zeros((1, 48, 48, 3), np.float32)
  encoder = jax.tree_util.tree_map(np.asarray, jax.jit(enc.init)(jax.random.key(1), x)["params"])
  decoder = {"kernel": np.ones((1, 1, 64, 48), np.float32), "bias": np.zeros(48, np.float32)}
  workdir = str(tmp_path / "pretrain")
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as mngr:
    mngr.save(7, args=ocp.args.StandardSave(
        {"params": {"encoder": encoder, "decoder": decoder}, "step": np.int32(7)}))
    mngr.wait_until_finished()
  state = {f"encoder.{k}": torch.tensor(np.asarray(v))
           for k, v in convert.flax_to_torch(encoder, enc, layout="official").items()}
  state["decoder.0.weight"] = torch.ones(48, 64, 1, 1)
  pth = str(tmp_path / "simmim.pth")
  torch.save({"model": state}, pth)

  config = tiny_config(folder, img_size=56, **{"model.window_size": 7})
  model = step_lib.create_encoder(config, num_classes=10)
  from_dir = finetune.initial_params(set_keys(config, init_from=workdir), model,
                                     jax.random.key(0))
  from_pth = finetune.initial_params(set_keys(config, init_from=pth), model, jax.random.key(0))
  for a, b in zip(jax.tree_util.tree_leaves(from_dir), jax.tree_util.tree_leaves(from_pth)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  table = from_dir["layers_0"]["blocks_1"]["attn"]["relative_position_bias_table"]
  src = encoder["layers_0"]["blocks_1"]["attn"]["relative_position_bias_table"]
  assert src.shape == (121, 2) and table.shape == (169, 2)
  np.testing.assert_allclose(table, convert.resize_relative_position_bias_table(src, 169),
                             atol=1e-6)
  np.testing.assert_array_equal(from_dir["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                encoder["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert "mask_token" not in from_dir and from_dir["head"]["kernel"].shape == (64, 10)


# ----------------------------------------------------------------------------- modes, CLI


def test_validation_names_the_key(folder, tmp_path):
  with pytest.raises(ValueError, match="config.mode='tune' is unknown"):
    finetune.run(tiny_config(folder, mode="tune"), str(tmp_path))
  with pytest.raises(ValueError, match="config.model.num_classes=100 but dataset 'folder' has 10"):
    finetune.run(tiny_config(folder, **{"model.num_classes": 100}), str(tmp_path))
  with pytest.raises(ValueError, match="'eval' needs config.init_from"):
    finetune.run(tiny_config(folder, mode="eval"), str(tmp_path))
  with pytest.raises(ValueError, match="config.aug.mixup"):
    finetune.run(tiny_config(folder, **{"aug.mixup": -1.0}), str(tmp_path))


def test_command_line_finetune_then_eval_and_probe(folder, tmp_path):
  """Fine-tunes 2 steps through the CLI (2 devices), then evaluates and probes its workdir."""
  workdir = tmp_path / "ft"
  cmd = [sys.executable, "-m", "eesmm_jax.main", "--config",
         os.path.join(ROOT, "configs/finetune_cifar.py") + ":cifar10", "--workdir", str(workdir),
         "--config.data.dataset=folder", f"--config.data.data_dir={folder}",
         "--config.data.eval_split=test", "--config.img_size=32", "--config.model.name=swin_tiny",
         "--config.model.patch_size=2", "--config.model.window_size=4",
         "--config.model.embed_dim=16", "--config.model.depths=(2,2)",
         "--config.model.num_heads=(1,2)", "--config.batch_size=8",
         "--config.eval_batch_size=8", "--config.total_steps=2", "--config.log_every=1",
         "--config.checkpoint_every=2", "--config.optim.warmup_epochs=0"]
  env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval top-1" in out.stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert rows[-1]["eval_count"] == 13
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]

  config = tiny_config(folder, img_size=32, init_from=str(workdir), **{
      "model.patch_size": 2, "model.embed_dim": 16, "model.num_heads": (1, 2),
      "data.eval_crop_pct": 1.0})
  evaluated = finetune.run(set_keys(config, mode="eval"), str(tmp_path / "eval"))
  assert evaluated["count"] == 13
  # Same model and images on 8 devices here, 2 there: the same loss; top-1 up to a near tie.
  np.testing.assert_allclose(evaluated["loss"], rows[-1]["eval_loss"], rtol=1e-4)
  assert abs(evaluated["top1"] - rows[-1]["eval_top1"]) <= 1 / 13
  probed = finetune.run(set_keys(config, mode="probe", **{"probe.steps": 20}),
                        str(tmp_path / "probe"))
  assert probed["count"] == 13 and 0 <= probed["top1"] <= 1
  assert json.load(open(tmp_path / "probe" / "probe.json"))["top1"] == probed["top1"]


def test_a_run_stopped_between_its_last_save_and_evaluation_evaluates_on_restart(
    folder, tmp_path, monkeypatch):
  config = tiny_config(folder, total_steps=2, checkpoint_every=2)
  real = finetune.evaluate

  def killed(*args, **kw):
    raise KeyboardInterrupt("killed after the last save")

  monkeypatch.setattr(finetune, "evaluate", killed)
  with pytest.raises(KeyboardInterrupt):
    finetune.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert not (tmp_path / "eval.json").exists()

  monkeypatch.setattr(finetune, "evaluate", real)
  state = finetune.run(config, str(tmp_path))
  assert int(state.step) == 2  # no step retrained
  result = json.load(open(tmp_path / "eval.json"))
  assert result["step"] == 2 and result["count"] == 13
