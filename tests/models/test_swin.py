"""Swin model: shapes, variants, size validation and train-mode behaviour (no PyTorch needed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesmm_jax.models import swin


def n_params(model):
  x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name,millions", [("swin_tiny", 28.29), ("swin_small", 49.61),
                                           ("swin_base", 87.77), ("swin_large", 196.53)])
def test_variant_parameter_counts_match_the_paper(name, millions):
  assert n_params(swin.create_model(name)) / 1e6 == pytest.approx(millions, abs=0.01)


def test_sizes_that_do_not_tile_are_refused_with_the_sizes_that_would():
  with pytest.raises(ValueError, match=r"window_size 7 does not tile.*one of \[224, 448\]"):
    swin.create_model("swin_tiny", img_size=192, window_size=7)
  with pytest.raises(ValueError, match="unknown model 'swin_huge'"):
    swin.create_model("swin_huge")
  with pytest.raises(ValueError, match=r"width 16 .* num_heads\[0\] = 3 does not divide"):
    swin.create_model("swin_tiny", embed_dim=16)
  assert 192 in swin.valid_image_sizes(4, 6, 4) and 224 in swin.valid_image_sizes(4, 7, 4)


def test_small_last_stage_is_one_unshifted_window():
  # Swin-L at 192 with window 12: the last stage is 6x6, so its window shrinks to 6.
  assert swin.effective_window(6, 12, 6) == (6, 0)
  assert swin.effective_window(12, 6, 3) == (6, 3)


def test_outputs_features_and_masking():
  model = swin.SwinTransformer(img_size=64, window_size=4, embed_dim=16, depths=(2, 2),
                               num_heads=(1, 2), num_classes=5, use_mask_token=True)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  params = model.init(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x).shape == (2, 5)
  assert model.apply({"params": params}, x, return_features=True).shape == (2, 8, 8, 32)
  mask = jnp.zeros((2, 16, 16), jnp.int32).at[:, :8].set(1)
  masked = model.apply({"params": params}, x, mask)
  assert not np.allclose(masked, model.apply({"params": params}, x))
  with pytest.raises(ValueError, match=r"mask must be \[B, H/patch, W/patch\]"):
    model.apply({"params": params}, x, mask[:, :8])
  with pytest.raises(ValueError, match=r"expected images \[B, 64, 64, 3\]"):
    model.apply({"params": params}, x[:, :32])


def test_drop_path_only_in_training_mode():
  model = swin.SwinTransformer(img_size=64, window_size=4, embed_dim=16, depths=(2, 2),
                               num_heads=(1, 2), num_classes=0, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  params = model.init(jax.random.key(0), x)["params"]
  evaluate = model.apply({"params": params}, x)
  np.testing.assert_array_equal(evaluate, model.apply({"params": params}, x))
  train = lambda seed: model.apply({"params": params}, x, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), evaluate)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(2), train(2))


def test_bf16_compute_keeps_float32_params():
  model = swin.SwinTransformer(img_size=64, window_size=4, embed_dim=16, depths=(2, 2),
                               num_heads=(1, 2), num_classes=3, dtype=jnp.bfloat16)
  x = jnp.ones((1, 64, 64, 3))
  params = model.init(jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert model.apply({"params": params}, x).dtype == jnp.bfloat16


def test_patch_conv_dense_and_layer_norm_equal_flax_modules_with_their_gradients():
  """PatchConv, Dense and LayerNorm compute flax's nn.Conv (kernel = stride, VALID), nn.Dense and
  nn.LayerNorm by other matmul layouts and, on a CPU, their own gradients (issue 13): same
  parameters, same values and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 18, 17, 3)), jnp.float32)  # 4 does not divide 18, 17
  tokens = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)
  pairs = [(swin.PatchConv(16, 4), nn.Conv(16, (4, 4), strides=(4, 4), padding="VALID"), x),
           (swin.PatchConv(16), nn.Conv(16, (1, 1)), x),
           (swin.Dense(16), nn.Dense(16), tokens),
           (swin.LayerNorm(), nn.LayerNorm(epsilon=1e-5), 3.0 + 2.0 * tokens)]
  with jax.default_matmul_precision("highest"):
    for ours, theirs, inputs in pairs:
      params = theirs.init(jax.random.key(1), inputs)
      assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), inputs)) == \
          jax.tree.map(jnp.shape, params)
      # Random parameters: the initial LayerNorm scale (ones) and biases (zeros) would hide terms.
      params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
      loss = lambda m: lambda p, v: jnp.sum(jnp.sin(m.apply(p, v)))
      value, grads = jax.value_and_grad(loss(ours), argnums=(0, 1))(params, inputs)
      ref_value, ref_grads = jax.value_and_grad(loss(theirs), argnums=(0, 1))(params, inputs)
      np.testing.assert_allclose(value, ref_value, rtol=1e-5)
      for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
  # On this (CPU) backend the two take their own gradients, so the comparison above covers them.
  for module, name in ((swin.Dense(16), "add_bias"), (swin.LayerNorm(), "layer_norm_cpu")):
    params = module.init(jax.random.key(1), tokens)
    assert f"name={name}" in str(jax.make_jaxpr(module.apply)(params, tokens))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_cpu_window_attention_equals_the_einsums_with_their_gradients(dtype, tol):
  """`window_attention_cpu` (the CPU default, its own backward) against autodiff of the einsum
  path ('xla'), on one shifted Swin block (windows, heads, the -100 mask): same outputs and
  gradients for the input and every parameter, the relative position bias table included."""
  block = dict(dim=32, num_heads=2, window_size=4, shift_size=2, dtype=dtype)
  ours, einsums = (swin.SwinTransformerBlock(**block, attention_impl=impl)
                   for impl in (None, "xla"))
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 32), jnp.float32)
  params = einsums.init(jax.random.key(1), x)
  # A random bias table (the initial one is near zero), so that the softmax is far from uniform.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jax.random.normal(jax.random.key(2), p.shape)
      if "relative_position_bias_table" in jax.tree_util.keystr(path) else p, params)
  # The default does take the custom gradient on this (CPU) backend; 'xla' does not.
  jaxpr = lambda m: str(jax.make_jaxpr(m.apply)(params, x))
  assert "name=window_attention_cpu" in jaxpr(ours)
  assert "name=window_attention_cpu" not in jaxpr(einsums)
  weights = jax.random.normal(jax.random.key(3), (3, 8, 8, 32))
  loss = lambda m: lambda p, v: jnp.sum(m.apply(p, v).astype(jnp.float32) * weights)
  with jax.default_matmul_precision("highest"):
    value, grads = jax.value_and_grad(loss(ours), argnums=(0, 1))(params, x)
    ref_value, ref_grads = jax.value_and_grad(loss(einsums), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(value, ref_value, rtol=tol)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    scale = float(jnp.abs(ref).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale,
                               np.asarray(ref, np.float32) / scale, atol=tol,
                               err_msg=jax.tree_util.keystr(path))
