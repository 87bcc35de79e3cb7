"""eesmm_jax.optim against the SimMIM / timm formulas, re-written here independently."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eesmm_jax import optim
from eesmm_jax.models import swin

SWIN_B = (2, 2, 18, 2)


# ----------------------------------------------------------------------------- references
def ref_get_swin_layer(name, num_layers, depths):
  """microsoft/SimMIM optimizer.py, on torch parameter names."""
  if name in ("mask_token",):
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("layers"):
    layer_id = int(name.split(".")[1])
    block_id = name.split(".")[3]
    if block_id == "reduction" or block_id == "norm":
      return sum(depths[:layer_id + 1])
    layer_id = sum(depths[:layer_id]) + int(block_id)
    return layer_id + 1
  else:
    return num_layers - 1


def ref_no_decay(name, shape):
  """SimMIM's no-decay rule with the Swin encoder's skip list and keywords."""
  return (len(shape) == 1 or name.endswith(".bias") or name in ("absolute_pos_embed", "mask_token")
          or "relative_position_bias_table" in name)


def torch_name(flax_path):
  """'layers_2/blocks_5/attn/qkv/kernel' -> 'layers.2.blocks.5.attn.qkv.weight'."""
  s = re.sub(r"(layers|blocks)_(\d+)", r"\1.\2", "/".join(flax_path)).replace("/", ".")
  return re.sub(r"\.(kernel|scale)$", ".weight", s)


def ref_cosine(t, base, warm, floor, warmup_t, total):
  """timm CosineLRScheduler(t_initial=total, warmup_t, warmup_lr_init=warm, cycle_limit=1)."""
  if t < warmup_t:
    return warm + t * (base - warm) / warmup_t
  i = t // total
  if i >= 1:
    return floor
  return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * (t - total * i) / total))


def ref_multistep(t, base, warm, warmup_t, milestones, gamma):
  """SimMIM's MultiStepLRScheduler."""
  if t < warmup_t:
    return warm + t * (base - warm) / warmup_t
  return base * gamma ** sum(m <= t for m in milestones)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def swin_b_shapes():
  """Swin-B parameter shapes (ape and mask token on, to cover every name), no compute."""
  model = swin.SwinTransformer(img_size=192, window_size=6, embed_dim=128, depths=SWIN_B,
                               num_heads=(4, 8, 16, 32), ape=True, use_mask_token=True)
  x = jnp.zeros((1, 192, 192, 3))
  mask = jnp.zeros((1, 48, 48))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, mask=mask))["params"]


def small_tree(seed):
  """A pretraining-shaped tree ({'encoder', 'decoder'}) with one leaf of each kind of layer."""
  rng = np.random.default_rng(seed)
  names = {
      "encoder/patch_embed/proj/kernel": (4, 4, 3, 8), "encoder/patch_embed/proj/bias": (8,),
      "encoder/patch_embed/norm/scale": (8,), "encoder/mask_token": (1, 1, 8),
      "encoder/layers_0/blocks_0/attn/qkv/kernel": (8, 24),
      "encoder/layers_0/blocks_1/attn/relative_position_bias_table": (9, 2),
      "encoder/layers_0/downsample/reduction/kernel": (32, 16),
      "encoder/layers_1/blocks_0/mlp/fc1/kernel": (16, 32),
      "encoder/layers_1/blocks_0/mlp/fc1/bias": (32,),
      "encoder/norm/scale": (16,), "decoder/proj/kernel": (1, 1, 16, 12),
  }
  tree = {}
  for name, shape in names.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return tree


def config(**kw):
  c = optim.default_optim_config()
  c.update({**dict(epochs=10, warmup_epochs=2), **kw})
  return c


# ----------------------------------------------------------------------------- layer ids
def test_swin_b_layer_ids_and_scales_match_reference(swin_b_shapes):
  flat = jax.tree_util.tree_flatten_with_path(swin_b_shapes)[0]
  num_layers = sum(SWIN_B)
  ref_scales = [0.9 ** i for i in reversed(range(num_layers + 2))]
  scales = optim.layer_decay_scales(swin_b_shapes, SWIN_B, 0.9)
  for (path, _), scale in zip(flat, jax.tree_util.tree_leaves(scales)):
    names = optim.path_names(path)
    ref_id = ref_get_swin_layer(torch_name(names), num_layers + 2, SWIN_B)
    assert optim.swin_layer_id(path, SWIN_B) == ref_id, names
    assert scale == pytest.approx(ref_scales[ref_id], rel=1e-12), names

  assert optim.swin_layer_id("patch_embed/proj/kernel", SWIN_B) == 0
  assert optim.layer_scale(0, SWIN_B, 0.9) == pytest.approx(0.9 ** 25)
  assert optim.swin_layer_id("layers_2/blocks_5/attn/qkv/kernel", SWIN_B) == 10
  assert optim.swin_layer_id("layers_1/downsample/reduction/kernel", SWIN_B) == 4
  assert optim.swin_layer_id("norm/scale", SWIN_B) == 25
  assert optim.layer_scale(25, SWIN_B, 0.9) == 1.0
  # The pretraining tree: same ids under 'encoder', the decoder with the head.
  assert optim.swin_layer_id("encoder/layers_2/blocks_5/mlp/fc1/bias", SWIN_B) == 10
  assert optim.swin_layer_id("encoder/mask_token", SWIN_B) == 0
  assert optim.swin_layer_id("decoder/proj/kernel", SWIN_B) == 25


def test_layer_id_rejects_depths_that_do_not_fit():
  with pytest.raises(ValueError, match="depths"):
    optim.swin_layer_id("layers_2/blocks_5/attn/qkv/kernel", (2, 2, 2, 2))
  with pytest.raises(ValueError, match="stage 4"):
    optim.swin_layer_id("layers_4/blocks_0/norm1/scale", SWIN_B)


def test_no_decay_mask_matches_reference(swin_b_shapes):
  flat = jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(swin_b_shapes))[0]
  shapes = jax.tree_util.tree_leaves(swin_b_shapes)
  for (path, decayed), shape in zip(flat, shapes):
    names = optim.path_names(path)
    assert decayed == (not ref_no_decay(torch_name(names), shape.shape)), names
  # The rules that rank alone would miss.
  assert not optim.decays("encoder/mask_token", jnp.zeros((1, 1, 8)))
  assert not optim.decays("absolute_pos_embed", jnp.zeros((1, 4, 8)))
  assert not optim.decays("layers_0/blocks_0/attn/relative_position_bias_table", jnp.zeros((9, 2)))
  assert optim.decays("layers_0/blocks_0/attn/qkv/kernel", jnp.zeros((8, 24)))


# ----------------------------------------------------------------------------- schedules
def test_scaled_lrs():
  c = config(base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, accum_steps=2)
  lrs = optim.scaled_lrs(c, 1024)  # effective batch 2048 = 4 x 512
  assert lrs == pytest.approx(dict(base_lr=8e-4, warmup_lr=4e-6, min_lr=4e-5))


def test_cosine_schedule_matches_timm():
  c = config(epochs=100, warmup_epochs=10, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5)
  steps_per_epoch, batch = 7, 256
  sched = optim.make_schedule(c, batch, steps_per_epoch)
  lrs = optim.scaled_lrs(c, batch)
  w, total = 70, 700
  for t in [0, 1, 35, 69, 70, 71, 300, 699, 700, 1000]:
    want = ref_cosine(t, lrs["base_lr"], lrs["warmup_lr"], lrs["min_lr"], w, total)
    assert float(sched(t)) == pytest.approx(want, rel=1e-5), t
  # Stepped per update under accumulation: the same curve over half as many updates.
  c.accum_steps = 2
  sched2 = optim.make_schedule(c, batch // 2, 2 * steps_per_epoch)
  assert float(sched2(300)) == pytest.approx(float(sched(300)), rel=1e-6)


def test_multistep_schedule_matches_reference():
  c = config(schedule="multistep", epochs=800, warmup_epochs=10, multistep_milestones=(700,),
             base_lr=1e-4, warmup_lr=5e-7)
  sched = optim.make_schedule(c, 512, 3)
  for t in [0, 5, 29, 30, 31, 2099, 2100, 2101, 2399]:
    want = ref_multistep(t, 1e-4, 5e-7, 30, [2100], 0.1)
    assert float(sched(t)) == pytest.approx(want, rel=1e-5), t
  c.warmup_epochs = 0
  assert float(optim.make_schedule(c, 512, 3)(0)) == pytest.approx(1e-4)


@pytest.mark.parametrize("key,value,match", [
    ("schedule", "step", "schedule='step'.*cosine"),
    ("warmup_epochs", 200, "warmup_epochs=200.*outlast"),
    ("optimizer", "sgd", "optimizer='sgd'"),
    ("layer_decay", 1.5, "layer_decay=1.5"),
    ("accum_steps", 0, "accum_steps=0"),
])
def test_bad_config_values_are_named(key, value, match):
  c = config(epochs=100)
  c[key] = value
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(c, small_tree(0), 512, 10, depths=(2, 1))


def test_bad_milestones_and_depths():
  c = config(schedule="multistep", multistep_milestones=(1,))  # inside the warm-up
  with pytest.raises(ValueError, match="multistep_milestones"):
    optim.make_schedule(c, 512, 10)
  with pytest.raises(ValueError, match="depths"):
    optim.make_optimizer(config(), small_tree(0), 512, 10, depths=(1,))


# ----------------------------------------------------------------------------- updates
def test_layer_decay_equals_per_group_adamw():
  """One optimizer = torch's param groups: adamw with lr * scale on each group, decay masked."""
  params = small_tree(0)
  grads = [small_tree(10 + i) for i in range(3)]
  c = config(layer_decay=0.75, clip_grad=0.0, weight_decay=0.05)
  tx, sched = optim.make_optimizer(c, params, global_batch=64, steps_per_epoch=4, depths=(2, 1))

  @jax.jit
  def ours(params, grads):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params

  depths = (2, 1)

  @jax.jit
  def per_group(params, grads):
    """Every leaf alone through adamw with its group's scaled lr and weight decay."""
    out = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
      names = optim.path_names(path)
      # SimMIM's encoder-relative names; the decoder falls in the "everything else" group.
      tname = torch_name(names[1:]) if names[0] == "encoder" else torch_name(names)
      ref_id = ref_get_swin_layer(tname, sum(depths) + 2, depths)
      scale = 0.75 ** (sum(depths) + 1 - ref_id)
      wd = 0.0 if ref_no_decay(tname, p.shape) else 0.05
      group = optax.adamw(lambda t, scale=scale: sched(t) * scale, b1=c.b1, b2=c.b2, eps=c.eps,
                          weight_decay=wd)
      s = group.init(p)
      for g in grads:
        u, s = group.update(_get(g, names), s, p)
        p = optax.apply_updates(p, u)
      out["/".join(names)] = p
    return out

  got, want = ours(params, grads), per_group(params, grads)
  for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
    name = "/".join(optim.path_names(path))
    np.testing.assert_allclose(leaf, want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def _get(tree, names):
  for n in names:
    tree = tree[n]
  return tree


def test_multisteps_accumulation_equals_big_batch_step():
  """Linear loss mean(x @ p): two micro-batches accumulated = one step on their union."""
  params = {"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))}
  data = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32)
  grad = jax.grad(lambda p, x: jnp.mean(x @ p["w"] + p["b"]))

  acc, _ = optim.make_optimizer(config(accum_steps=2), params, 4, 20, depths=(1,))
  state, p = acc.init(params), params
  for i, x in enumerate((data[:4], data[4:])):
    u, state = jax.jit(acc.update)(grad(p, x), state, p)
    p = optax.apply_updates(p, u)
    if i == 0:  # nothing applied until the last micro-batch
      assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(u))

  big, _ = optim.make_optimizer(config(), params, 8, 10, depths=(1,))
  u, _ = jax.jit(big.update)(grad(params, data), big.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               p, optax.apply_updates(params, u))


def test_clipping_to_global_norm_5():
  params = {"w": jnp.ones((4, 4))}
  g = {"w": jnp.full((4, 4), 10.0)}  # global norm 40
  clipped, _ = optim.make_optimizer(config(clip_grad=5.0), params, 512, 10, depths=(1,))
  plain, _ = optim.make_optimizer(config(clip_grad=0.0), params, 512, 10, depths=(1,))
  # Adam normalises the first step away; compare the second step after a small gradient.
  small = {"w": jnp.full((4, 4), 0.1)}
  def two_steps(tx, g1):
    s = tx.init(params)
    _, s = tx.update(g1, s, params)
    return tx.update(small, s, params)[0]["w"]
  np.testing.assert_allclose(two_steps(clipped, g), two_steps(plain, {"w": g["w"] * 5 / 40}),
                             rtol=1e-6)
  assert not np.allclose(two_steps(clipped, g), two_steps(plain, g))
