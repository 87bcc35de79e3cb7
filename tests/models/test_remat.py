"""Rematerialisation (`SwinTransformer.remat`, `config.model.remat`): the same loss, gradients,
parameter tree and random draws as without it, and less memory in XLA's own analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesmm_jax import config as config_lib
from eesmm_jax import step as step_lib
pass
from eesmm_jax.models import swin


def tiny(remat, **kwargs):
  # Stage 0: one block (a one-step scan); stage 1: three, unshifted / shifted / unshifted (both
  # stages are larger than the window, so the odd blocks shift).
  return swin.SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                              depths=(1, 3), num_heads=(1, 2), num_classes=0,
                              use_mask_token=True, remat=remat, **kwargs)


IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
MASK = (jax.random.uniform(jax.random.key(2), (2, 16, 16)) < 0.6).astype(jnp.int32)


def test_same_loss_gradients_and_draws_as_without_remat():
  # Training mode with drop path, dropout and attention dropout: the blocks draw from keys
  # derived from their index, so remat must reproduce the exact masks of 'none' as well.
  # 'rbg' keys: the same plumbing as threefry keys, and XLA compiles their bits far faster.
  kwargs = dict(drop_path_rate=0.3, drop_rate=0.1, attn_drop_rate=0.1)
  params = tiny("none", **kwargs).init(jax.random.key(0), IMAGES)["params"]
  target = jax.random.normal(jax.random.key(3), (2, 8, 8, 32))
  results = {}
  for remat in ("none", "full", "dots"):
    model = tiny(remat, **kwargs)

    def loss(p, rng, model=model):
      out = model.apply({"params": p}, IMAGES, MASK, train=True, return_features=True,
                        rngs={"dropout": rng})
      return jnp.mean((out - target) ** 2)

    with jax.default_matmul_precision("highest"):
      step = jax.jit(jax.value_and_grad(loss))
      results[remat] = step(params, jax.random.key(7, impl="rbg"))
      if remat == "full":
        results["other key"] = step(params, jax.random.key(8, impl="rbg"))

  loss0, grads0 = results["none"]
  # The draws matter (so the equality below tests them): another key, another loss.
  assert abs(float(results["other key"][0]) - float(loss0)) > 1e-3 * float(loss0)
  flat0 = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_leaves_with_path(grads0)}
  for remat in ("full", "dots"):
    loss1, grads1 = results[remat]
    flat1 = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_leaves_with_path(grads1)}
    assert flat1.keys() == flat0.keys()
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    # Per leaf, relative in the L2 norm (the scan and its fusions sum in other orders: float32
    # rounding, up to 1.1e-6 for a LayerNorm scale at LLVM -O0, under 1e-6 at -O2); a leaf
    # whose branch drop path removed for both images has no gradient, and must have none with
    # remat either.
    errors = {name: float(jnp.linalg.norm(flat1[name] - g0)) /
                    max(float(jnp.linalg.norm(g0)), 1e-30) for name, g0 in flat0.items()}
    worst = max(errors, key=errors.get)
    print(f"remat={remat}: loss {float(loss1)!r} vs {float(loss0)!r}; worst relative gradient "
          f"error {errors[worst]:.3g} at {worst}")
    assert errors[worst] <= 2e-6, f"remat={remat}: {worst} off by {errors[worst]:.3g}"


def test_cpu_forms_take_the_same_gradients_under_remat():
  """The XLA:CPU forms' own backward passes (custom_vjp) inside the checkpointed scan: without
  dropout, so that the attention takes `window_attention_cpu` too."""
  forms = dict(impl="xla_cpu", attention_impl="xla_cpu")
  params = tiny("none", **forms).init(jax.random.key(0), IMAGES)["params"]
  target = jax.random.normal(jax.random.key(3), (2, 8, 8, 32))
  results = {}
  for remat in ("none", "full", "dots"):
    model = tiny(remat, **forms)
    loss = lambda p, model=model: jnp.mean(
        (model.apply({"params": p}, IMAGES, MASK, return_features=True) - target) ** 2)
    assert "name=window_attention_cpu" in str(jax.make_jaxpr(loss)(params))
    with jax.default_matmul_precision("highest"):
      results[remat] = jax.jit(jax.value_and_grad(loss))(params)
  loss0, grads0 = results["none"]
  for remat in ("full", "dots"):
    loss1, grads1 = results[remat]
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
      assert float(jnp.linalg.norm(g1 - g0)) <= 2e-6 * max(float(jnp.linalg.norm(g0)), 1e-30)


def test_param_tree_is_unchanged_and_randomness_only_where_asked():
  shapes = {}
  for remat in ("none", "full", "dots"):
    model = tiny(remat)
    tree = jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"]
    shapes[remat] = {jax.tree_util.keystr(k): v.shape
                     for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  assert shapes["full"] == shapes["none"] == shapes["dots"]
  assert "['layers_1']['blocks_2']['mlp']['fc2']['kernel']" in shapes["full"]

  # Traced only: training without any drop rate needs no 'dropout' rng, and bf16 stays bf16.
  params = jax.eval_shape(tiny("none").init, jax.random.key(0), IMAGES)["params"]
  out = jax.eval_shape(lambda p: tiny("full", drop_path_rate=0.0, dtype=jnp.bfloat16).apply(
      {"params": p}, IMAGES, MASK, train=True), params)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 32)


def test_unknown_remat_is_refused_naming_the_key_and_choices():
  with pytest.raises(ValueError, match=r"remat='some'.*\['none', 'full', 'dots'\]"):
    tiny("some")
  config = config_lib.pretrain_config()
  config.model.remat = "selective"
  with pytest.raises(ValueError, match=r"config.model.remat.*\['none', 'full', 'dots'\]"):
    step_lib.create_encoder(config)


def test_full_remat_saves_memory_in_xla_analysis():
  # Large enough that activations dominate the temporaries (the stacked copy of the params,
  # which the scan adds, is small beside them).
  def temp_bytes(remat):
    model = swin.SwinTransformer(img_size=192, patch_size=4, window_size=6, embed_dim=64,
                                 depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), num_classes=0,
                                 use_mask_token=True, drop_path_rate=0.0, remat=remat)
    x = jax.ShapeDtypeStruct((4, 192, 192, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((4, 48, 48), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def loss(p, x, mask):
      out = model.apply({"params": p}, x, mask, train=True, return_features=True)
      return jnp.mean(out ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, full = temp_bytes("none"), temp_bytes("full")
  print(f"temporaries: none {none / 2**20:.1f} MiB, full {full / 2**20:.1f} MiB "
        f"({full / none:.2f}x)")
  assert full <= 0.8 * none
