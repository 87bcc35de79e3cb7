"""Swin model: shapes, variants, size validation, train-mode behaviour, and the backend-specific
forms of `eesmm_jax.ops` against the portable ones (no PyTorch needed)."""

import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesmm_jax import ops, plan, sharding
from eesmm_jax import step as step_lib
from eesmm_jax.configs import demo
from eesmm_jax.models import swin
from eesmm_jax.ops import xla_cpu


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


def test_cpu_layers_equal_flax_modules_with_their_gradients():
  """PatchConv, CpuDense and CpuLayerNorm compute flax's nn.Conv (kernel = stride, VALID),
  nn.Dense and nn.LayerNorm(eps 1e-5, centred variance) by other matmul layouts and their own
  gradients: same parameters, values and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 18, 17, 3)), jnp.float32)  # 4 does not divide 18, 17
  tokens = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)
  flax_norm = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
  # XLA:CPU's convolution itself rounds to a few 1e-6 relative (against float64, where the
  # patch matmul is closer), which the sine's gradient amplifies: a looser tolerance there.
  pairs = [(swin.PatchConv(16, 4), nn.Conv(16, (4, 4), strides=(4, 4), padding="VALID"), x, 1e-4),
           (swin.PatchConv(16), nn.Conv(16, (1, 1)), x, 1e-4),
           (xla_cpu.CpuDense(16), nn.Dense(16), tokens, 1e-5),
           (xla_cpu.CpuDense(16, use_bias=False), nn.Dense(16, use_bias=False), tokens, 1e-5),
           # Far from zero mean: E[x^2] - E[x]^2 would lose digits that the centred form keeps.
           (xla_cpu.CpuLayerNorm(), flax_norm, 3.0 + 2.0 * tokens, 1e-5),
           (ops.layers("xla").layer_norm(), flax_norm, 3.0 + 2.0 * tokens, 1e-5)]
  with jax.default_matmul_precision("highest"):
    for ours, theirs, inputs, tol in pairs:
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
        np.testing.assert_allclose(g, ref, rtol=tol, atol=tol)
  # The CPU forms take their own gradients (so the comparison above covers them); the 'xla'
  # layers are flax's own.
  for module, name in ((xla_cpu.CpuDense(16), "add_bias"),
                       (xla_cpu.CpuLayerNorm(), "layer_norm_cpu")):
    params = module.init(jax.random.key(1), tokens)
    assert f"name={name}" in str(jax.make_jaxpr(module.apply)(params, tokens))
  assert ops.layers("xla").dense is nn.Dense
  assert ops.layers("xla_cpu") == (xla_cpu.CpuDense, xla_cpu.CpuLayerNorm)


def reference_attention(qkv, bias, scale):
  """softmax(scale q k^T + bias) v written out, float32: what every form must compute."""
  b, n, _, h, d = qkv.shape
  q, k, v = (qkv[:, :, i].astype(jnp.float32).transpose(0, 2, 1, 3) for i in range(3))
  logits = (q * scale) @ jnp.swapaxes(k, -1, -2)
  logits = logits.reshape(b // bias.shape[0], *bias.shape) + bias
  probs = jax.nn.softmax(logits, axis=-1).reshape(b, h, n, n)
  return (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, h * d)


@pytest.mark.parametrize("impl", ops.CPU_ATTENTION_IMPLS)
@pytest.mark.parametrize("windows", [1, 4])
def test_every_cpu_attention_form_computes_the_reference_with_its_gradients(impl, windows):
  """`ops.window_attention` in each form that runs on a CPU, with one bias for every window
  (unshifted) or one per window (the shift mask), against the attention written out."""
  b, n, h, d = 8, 16, 2, 8
  qkv = jax.random.normal(jax.random.key(0), (b, n, 3, h, d))
  bias = 2.0 * jax.random.normal(jax.random.key(1), (windows, h, n, n))
  weights = jax.random.normal(jax.random.key(2), (b, n, h * d))
  loss = lambda f: lambda qkv, bias: jnp.sum(f(qkv, bias) * weights)
  ours = lambda qkv, bias: ops.window_attention(qkv, bias, d ** -0.5, impl=impl,
                                                dtype=jnp.float32)
  with jax.default_matmul_precision("highest"):
    out = ours(qkv, bias)
    grads = jax.grad(loss(ours), argnums=(0, 1))(qkv, bias)
    ref_grads = jax.grad(loss(lambda q, c: reference_attention(q, c, d ** -0.5)),
                         argnums=(0, 1))(qkv, bias)
  assert out.shape == (b, n, h * d) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, reference_attention(qkv, bias, d ** -0.5), atol=1e-5)
  for g, ref in zip(grads, ref_grads):
    assert g.shape == ref.shape
    np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-4)


def test_attention_dropout_is_flax_dropout_in_every_form():
  """In training with attention dropout every form takes the einsums ('xla_cpu' has no
  dropout), drawing nn.Dropout's mask from the given key."""
  b, n, h, d = 4, 9, 2, 4
  qkv = jax.random.normal(jax.random.key(0), (b, n, 3, h, d))
  bias = jax.random.normal(jax.random.key(1), (1, h, n, n))
  key = jax.random.key(3)
  attend = lambda impl, **kw: ops.window_attention(qkv, bias, 0.5, impl=impl, dtype=jnp.float32,
                                                   dropout_rate=0.25, rng=key, **kw)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  probs = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q * 0.5, k) + bias, axis=-1)
  probs = nn.Dropout(0.25).apply({}, probs, deterministic=False, rng=key)
  expected = jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b, n, h * d)
  for impl in ops.CPU_ATTENTION_IMPLS:
    np.testing.assert_allclose(attend(impl, deterministic=False), expected, rtol=1e-6,
                               atol=1e-6, err_msg=impl)
  # Not training: no dropout.
  np.testing.assert_allclose(attend("xla", deterministic=True),
                             reference_attention(qkv, bias, 0.5), atol=1e-5)
  with pytest.raises(ValueError, match="attention dropout in training needs an rng"):
    ops.window_attention(qkv, bias, 0.5, impl="xla", dtype=jnp.float32, dropout_rate=0.25,
                         deterministic=False)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_cpu_window_attention_equals_the_einsums_with_their_gradients(dtype, tol):
  """attention_impl 'xla_cpu' (`window_attention_cpu`, its own backward) against autodiff of the
  einsums ('xla'), on one shifted Swin block (windows, heads, the -100 mask): same outputs and
  gradients for the input and every parameter, the relative position bias table included."""
  block = dict(dim=32, num_heads=2, window_size=4, shift_size=2, dtype=dtype)
  ours, einsums = (swin.SwinTransformerBlock(**block, attention_impl=impl)
                   for impl in ("xla_cpu", "xla"))
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 32), jnp.float32)
  params = einsums.init(jax.random.key(1), x)
  # A random bias table (the initial one is near zero), so that the softmax is far from uniform.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jax.random.normal(jax.random.key(2), p.shape)
      if "relative_position_bias_table" in jax.tree_util.keystr(path) else p, params)
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


def test_float16_einsums_accumulate_in_float32_on_a_cpu_too():
  """The 'xla' attention asks for float32 logits on every backend (XLA:CPU compiles the
  f16 x f16 -> f32 dot): a float16 block runs here, forward and backward, close to float32."""
  block = lambda dtype: swin.SwinTransformerBlock(32, 2, 4, 2, dtype=dtype,
                                                  attention_impl="xla")
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  params = block(jnp.float32).init(jax.random.key(1), x)
  half = lambda p: block(jnp.float16).apply(p, x.astype(jnp.float16))
  assert "preferred_element_type=float32" in str(jax.make_jaxpr(half)(params))
  out = jax.jit(half)(params)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(half(p).astype(jnp.float32))))(params)
  assert out.dtype == jnp.float16
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grad))
  np.testing.assert_allclose(np.asarray(out, np.float32), block(jnp.float32).apply(params, x),
                             atol=2e-2, rtol=2e-2)


def test_the_model_takes_the_forms_its_fields_name_whatever_the_backend():
  """`impl` / `attention_impl` alone decide the forms: on this CPU the 'xla' model uses none of
  the CPU forms and the 'xla_cpu' model all of them; the params are the same tree."""
  x = jnp.zeros((1, 32, 32, 3))
  model = lambda impl: swin.SwinTransformer(img_size=32, patch_size=2, window_size=4,
                                            embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                            num_classes=3, impl=impl, attention_impl=impl)
  params = model("xla").init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, model("xla_cpu").init(jax.random.key(0), x)) == \
      jax.tree.map(jnp.shape, params)
  names = ("name=add_bias", "name=layer_norm_cpu", "name=window_attention_cpu")
  portable, cpu = (str(jax.make_jaxpr(model(i).apply)(params, x)) for i in ("xla", "xla_cpu"))
  assert not any(n in portable for n in names)
  assert all(n in cpu for n in names)
  with pytest.raises(ValueError,
                     match=r"^impl='cpu' is unknown; choose one of \['xla', 'xla_cpu'\]$"):
    swin.SwinTransformer(impl="cpu")
  with pytest.raises(ValueError, match=r"^attention_impl='flash' is unknown; choose one of \["):
    swin.SwinTransformer(attention_impl="flash")


def test_models_never_ask_the_process_for_its_backend():
  """The forms come from the model's fields, not from `jax.default_backend()` (process state,
  not the mesh a step is lowered for)."""
  folder = os.path.dirname(swin.__file__)
  sources = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
  assert len(sources) >= 3
  for path in sources:
    with open(path) as f:
      assert "default_backend" not in f.read(), path


def _demo_config(**model):
  config = demo.get_config()
  config.data.dataset = "synthetic"
  config.model.update(model)
  return config


def test_auto_resolves_once_from_the_mesh_and_bad_values_are_one_line_errors():
  cpu_mesh = sharding.make_mesh(jax.devices()[:1])
  encoder = step_lib.create_encoder(_demo_config(), cpu_mesh)
  assert (encoder.impl, encoder.attention_impl) == ("xla_cpu", "xla_cpu")
  # Devices of any other platform take the portable forms (a stand-in mesh: no GPU here).
  gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
  encoder = step_lib.create_encoder(_demo_config(), gpu_mesh)
  assert (encoder.impl, encoder.attention_impl) == ("xla", "xla")
  # A value that is set is kept; an override (the benchmark's attention) beats the config.
  encoder = step_lib.create_encoder(_demo_config(impl="xla"), cpu_mesh, attention_impl="cudnn")
  assert (encoder.impl, encoder.attention_impl) == ("xla", "cudnn")
  # The plan resolves for its mesh, and the transformer decoder takes the encoder's form.
  config = _demo_config()
  config.objective.decoder, config.objective.decoder_depth = "transformer", 1
  p = plan.pretraining(config, cpu_mesh)
  assert (p.encoder.impl, p.encoder.attention_impl, p.model.decoder.impl) == ("xla_cpu",) * 3
  with pytest.raises(ValueError, match=r"^config.model.impl='gpu' is unknown; choose one of "
                                       r"\['auto', 'xla', 'xla_cpu'\]$"):
    plan.pretraining(_demo_config(impl="gpu"), cpu_mesh)
  with pytest.raises(ValueError, match=r"^config.model.attention_impl='flash' is unknown; "
                                       r"choose one of \['auto', 'xla', 'xla_cpu', 'cudnn'"):
    step_lib.create_encoder(_demo_config(attention_impl="flash"), cpu_mesh)


def test_bf16_attention_keeps_bf16_logits_and_a_float32_softmax():
  """In bf16 runs the 'xla' attention's [B_, heads, N, N] logits are bf16 (the einsum's output
  type), the softmax runs in float32 on them; the block stays within bf16 rounding of float32,
  forward and backward. float16 keeps float32 logits (the test above)."""
  block = lambda dtype: swin.SwinTransformerBlock(32, 2, 4, 2, dtype=dtype, attention_impl="xla")
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  params = block(jnp.float32).init(jax.random.key(1), x)
  bf16 = lambda p: block(jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
  jaxpr = str(jax.make_jaxpr(bf16)(params))
  assert "preferred_element_type=bfloat16" in jaxpr and "preferred_element_type=float32" not in jaxpr
  assert ops.logits_dtype(jnp.bfloat16) == jnp.bfloat16
  assert ops.logits_dtype(jnp.float16) == ops.logits_dtype(jnp.float32) == jnp.float32
  with jax.default_matmul_precision("highest"):
    ref = block(jnp.float32).apply(params, x)
    ref_grad = jax.grad(lambda p: jnp.sum(block(jnp.float32).apply(p, x) ** 2))(params)
  out = jax.jit(bf16)(params)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(bf16(p).astype(jnp.float32) ** 2)))(params)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=5e-2)
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    scale = float(jnp.abs(r).max())  # bf16 probabilities: ~0.4% each, summed over 16 keys
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r) / scale,
                               atol=1e-1)
