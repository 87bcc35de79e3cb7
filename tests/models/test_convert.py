"""Converter round trips, errors, table resizing and the command line."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from timm.models.swin_transformer import checkpoint_filter_fn

from eesmm_jax import convert
from eesmm_jax.models import swin
from tests import torch_ref

# A tiny Swin that still has shifted blocks, a downsample and a head: 64 px, window 4.
TINY = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4))


def tiny_timm(window_size=4, num_classes=10, seed=0):
  model = torch_ref.TimmSwin(img_size=64, window_size=window_size, num_classes=num_classes,
                             drop_path_rate=0.0, **TINY)
  torch_ref.perturb_(model, seed)
  return model.eval()


def tiny_flax(window_size=4, num_classes=10, **kwargs):
  return swin.SwinTransformer(img_size=64, window_size=window_size, num_classes=num_classes,
                              drop_path_rate=0.0, **TINY, **kwargs)


def random_params(model, seed=0):
  x = np.zeros((1, model.img_size, model.img_size, 3), np.float32)
  params = model.init(jax.random.key(seed), x)["params"]
  # Non-default values everywhere, so a swapped or dropped tensor cannot go unnoticed.
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [rng.standard_normal(l.shape).astype(np.float32) for l in leaves])


def assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def logits(model, params, x):
  return np.asarray(model.apply({"params": params}, x))


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_round_trip_is_bit_exact(layout):
  model = tiny_flax(use_mask_token=True)
  params = random_params(model)
  state = convert.flax_to_torch(params, model, layout=layout)
  assert_trees_equal(convert.torch_to_flax(state, model), params)


def test_timm_layout_loads_strict_and_gives_the_same_logits():
  model = tiny_flax()
  params = random_params(model)
  ref = tiny_timm()
  state = convert.flax_to_torch(params, model, layout="timm")
  ref.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()},
                      strict=True)
  x = torch_ref.images(2, 64)
  with torch.no_grad():
    expected = ref(torch_ref.to_nchw(x)).numpy()
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(logits(model, params, x), expected, atol=1e-4)


def test_official_layout_matches_what_timm_knows_of_it():
  """timm's own `checkpoint_filter_fn` converts official checkpoints; after it our official
  export loads strictly and gives the same logits, and our buffers equal timm's."""
  model = tiny_flax()
  params = random_params(model, seed=1)
  official = convert.flax_to_torch(params, model, layout="official")
  assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
  ref = tiny_timm()
  tensors = {k: torch.tensor(np.asarray(v)) for k, v in official.items()}
  ref.load_state_dict(checkpoint_filter_fn(tensors, ref), strict=True)
  x = torch_ref.images(2, 64)
  with torch.no_grad():
    expected = ref(torch_ref.to_nchw(x)).numpy()
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(logits(model, params, x), expected, atol=1e-4)
  for i, stage in enumerate(ref.layers):
    for j, block in enumerate(stage.blocks):
      prefix = f"layers.{i}.blocks.{j}"
      np.testing.assert_array_equal(official[f"{prefix}.attn.relative_position_index"],
                                    block.attn.relative_position_index.numpy())
      if block.attn_mask is None:
        assert f"{prefix}.attn_mask" not in official
      else:
        np.testing.assert_array_equal(official[f"{prefix}.attn_mask"], block.attn_mask.numpy())


def test_simmim_checkpoint_keeps_the_decoder_apart():
  model = tiny_flax(num_classes=0, use_mask_token=True)
  params = random_params(model)
  ckpt = {"encoder." + k: v for k, v in convert.flax_to_torch(params, model, "official").items()}
  ckpt["decoder.0.weight"] = np.ones((3 * 32 * 32, 64, 1, 1), np.float32)
  ckpt["decoder.0.bias"] = np.zeros((3 * 32 * 32,), np.float32)
  with pytest.raises(convert.ConversionError, match="decoder.0.bias.*return_extra=True"):
    convert.torch_to_flax({"model": ckpt}, model)
  got, extra = convert.torch_to_flax({"model": ckpt}, model, return_extra=True)
  assert_trees_equal(got, params)
  assert sorted(extra) == ["decoder.0.bias", "decoder.0.weight"]


def test_missing_and_unexpected_keys_are_named():
  model = tiny_flax()
  state = convert.flax_to_torch(random_params(model), model, "timm")
  del state["layers.0.blocks.1.mlp.fc2.bias"]
  state["layers.0.blocks.1.mlp.fc3.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as err:
    convert.torch_to_flax(state, model)
  assert "missing keys [layers.0.blocks.1.mlp.fc2.bias]" in str(err.value)
  assert "unexpected keys [layers.0.blocks.1.mlp.fc3.weight]" in str(err.value)


def test_a_plain_swin_checkpoint_lacks_the_mask_token():
  state = convert.flax_to_torch(random_params(tiny_flax()), tiny_flax(), "timm")
  with pytest.raises(convert.ConversionError, match=r"missing keys \[mask_token\]"):
    convert.torch_to_flax(state, tiny_flax(use_mask_token=True))


def test_shape_mismatch_names_the_parameter_and_both_shapes():
  model = tiny_flax()
  state = convert.flax_to_torch(random_params(model), model, "timm")
  state["head.fc.weight"] = np.zeros((7, 64), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"head.fc.weight .*checkpoint \(7, 64\).*model expects \(64, 10\)"):
    convert.torch_to_flax(state, model)


def test_flax_to_torch_refuses_params_of_another_model():
  with pytest.raises(convert.ConversionError, match="missing .*head/kernel"):
    convert.flax_to_torch(random_params(tiny_flax(num_classes=0)), tiny_flax(), "timm")
  with pytest.raises(ValueError, match="layout must be one of"):
    convert.flax_to_torch(random_params(tiny_flax()), tiny_flax(), "hf")


@pytest.mark.parametrize("src,dst", [(11, 13), (13, 11), (23, 13)])
def test_bicubic_resize_equals_torch_interpolate(src, dst):
  table = np.random.default_rng(0).standard_normal((src * src, 4)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(table).T.reshape(1, 4, src, src), size=(dst, dst),
                           mode="bicubic", align_corners=False)
  expected = expected.reshape(4, dst * dst).T.numpy()
  got = convert.resize_relative_position_bias_table(table, dst * dst)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_window_6_checkpoint_loads_into_window_7_model():
  """SimMIM pretrains at 192/window 6 and fine-tunes at 224/window 7: the bias tables are
  resized bicubically (as the Swin reference does with F.interpolate), all else is kept."""
  src_model = swin.SwinTransformer(img_size=192, window_size=6, num_classes=0,
                                   embed_dim=16, depths=(2, 2), num_heads=(1, 2))
  dst_model = swin.SwinTransformer(img_size=224, window_size=7, num_classes=0,
                                   embed_dim=16, depths=(2, 2), num_heads=(1, 2))
  params = random_params(src_model)
  state = convert.flax_to_torch(params, src_model, "official")
  got = convert.torch_to_flax(state, dst_model)
  table = state["layers.1.blocks.0.attn.relative_position_bias_table"]
  expected = F.interpolate(torch.from_numpy(table).T.reshape(1, 2, 11, 11), size=(13, 13),
                           mode="bicubic", align_corners=False).reshape(2, 169).T.numpy()
  got_table = got["layers_1"]["blocks_0"]["attn"]["relative_position_bias_table"]
  assert got_table.shape == (169, 2)
  np.testing.assert_allclose(got_table, expected, atol=1e-5)
  np.testing.assert_array_equal(got["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                params["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"])
  logits(dst_model, got, np.zeros((1, 224, 224, 3), np.float32))  # it runs at the new size


def test_absolute_pos_embed_is_resized_with_the_image():
  small = tiny_flax(num_classes=0, ape=True)
  big = swin.SwinTransformer(img_size=96, window_size=4, num_classes=0, drop_path_rate=0.0,
                             ape=True, **TINY)
  state = convert.flax_to_torch(random_params(small), small, "timm")
  assert convert.torch_to_flax(state, big)["absolute_pos_embed"].shape == (1, 576, 32)


def test_command_line_round_trip(tmp_path):
  ref = torch_ref.TimmSwin(img_size=192, window_size=6, num_classes=0, drop_path_rate=0.0,
                           embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2))
  torch_ref.perturb_(ref, 0)
  state = {"encoder." + k: v for k, v in ref.state_dict().items()}
  state["encoder.mask_token"] = torch.randn(1, 1, 16)
  state["decoder.0.weight"] = torch.randn(3072, 128, 1, 1)
  torch.save({"model": state}, tmp_path / "simmim.pth")
  ckpt = tmp_path / "flax"
  argv = ["to-flax", str(tmp_path / "simmim.pth"), str(ckpt), "--model", "swin_tiny",
          "--img_size", "192", "--window_size", "6", "--num_classes", "0", "--use_mask_token"]
  # swin_tiny's widths differ from this checkpoint's: the converter must say so.
  with pytest.raises(convert.ConversionError, match="missing keys"):
    convert.main(argv)
  convert.main(argv + ["--embed_dim", "16", "--depths", "2", "2", "2", "2",
                       "--num_heads", "1", "2", "2", "2"])
  convert.main(["to-torch", str(ckpt), str(tmp_path / "back.pth"), "--layout", "timm"])
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  for k, v in state.items():
    if k.startswith("encoder."):
      torch.testing.assert_close(back[k[len("encoder."):]], v, rtol=0, atol=0)
  assert not any(k.startswith("decoder") for k in back)


# ----------------------------------------------------------------------------------------------
# What the command line is given: a .pth that is no state dict, a workdir, a patch size.


def run_convert(*argv):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, "-m", "eesmm_jax.convert", *map(str, argv)],
                        capture_output=True, text=True, cwd=root, timeout=600)


@pytest.mark.parametrize("content,kind", [(torch.zeros(3), "Tensor"), ([1, 2], "list")])
def test_a_pth_that_is_no_state_dict_is_named_in_one_line(tmp_path, content, kind):
  torch.save(content, tmp_path / "odd.pth")
  out = run_convert("to-flax", tmp_path / "odd.pth", tmp_path / "flax")
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      f"error: {tmp_path}/odd.pth holds a {kind}, not a state dict: expected a dict of "
      f"parameter names to tensors, as torch.save(model.state_dict(), path) writes "
      f"(optionally under 'model' or 'state_dict')"]
  assert not (tmp_path / "flax").exists()


def fake_workdir(path, model, params, pretraining: bool):
  """A workdir as the trainer leaves it, as far as `to-torch` reads it: the latest checkpoint
  (a pretraining one holds a decoder beside the encoder) and config.json."""
  import json
  import orbax.checkpoint as ocp
  tree = {"params": {"encoder": params, "decoder": {"kernel": np.ones((4, 4), np.float32)}}
          if pretraining else params, "step": np.int32(7)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "checkpoints" / "7" / "default", tree)
  (path / "checkpoints" / "3").mkdir()  # an older step: the latest is read
  config = {"img_size": model.img_size, "model.name": "swin_tiny", "model.patch_size":
            model.patch_size, "model.window_size": model.window_size, "model.embed_dim":
            model.embed_dim, "model.depths": list(model.depths), "model.num_heads":
            list(model.num_heads), "batch_size": 16}
  (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("pretraining", [True, False], ids=["pretraining", "finetuning"])
def test_to_torch_exports_a_workdirs_latest_checkpoint(tmp_path, pretraining):
  model = tiny_flax(num_classes=0 if pretraining else 10, use_mask_token=pretraining)
  params = random_params(model)
  fake_workdir(tmp_path / "run", model, params, pretraining)
  convert.main(["to-torch", str(tmp_path / "run"), str(tmp_path / "out.pth")])
  back = torch.load(tmp_path / "out.pth", weights_only=True)
  want = convert.flax_to_torch(params, model, layout="timm")
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
  if not pretraining:  # a classifier loads strict into timm and gives the same logits
    ref = tiny_timm()
    ref.load_state_dict(back, strict=True)
    x = torch_ref.images(2, 64)
    with torch.no_grad():
      expected = ref(torch_ref.to_nchw(x)).numpy()
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(logits(model, params, x), expected, atol=1e-4)


def test_to_torch_of_a_folder_without_weights_says_what_it_takes(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  out = run_convert("to-torch", tmp_path / "run", tmp_path / "out.pth")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
      f"error: '{tmp_path}/run' holds no checkpoint (no checkpoints/<step>) and no model.json: "
      f"give a .pth, a `convert to-flax` directory (model.json), or a pretraining / "
      f"fine-tuning workdir (checkpoints/<step>)"]


def test_to_flax_takes_the_patch_size(tmp_path):
  ref = torch_ref.TimmSwin(img_size=64, patch_size=2, window_size=4, num_classes=0,
                           drop_path_rate=0.0, **TINY)
  torch_ref.perturb_(ref, 0)
  torch.save(ref.state_dict(), tmp_path / "p2.pth")
  convert.main(["to-flax", str(tmp_path / "p2.pth"), str(tmp_path / "flax"), "--model",
                "swin_tiny", "--img_size", "64", "--window_size", "4", "--num_classes", "0",
                "--patch_size", "2", "--embed_dim", "32", "--depths", "2", "2", "--num_heads",
                "2", "4"])
  params, model = convert.load_flax(str(tmp_path / "flax"))
  assert model.patch_size == 2 and params["patch_embed"]["proj"]["kernel"].shape[:2] == (2, 2)
