"""SimMIM block masks: exact counts, block structure, independence, argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesmm_jax import masking


def blocks_of(mask, scale):
  """Token mask [B, h, w] -> block mask [B, h/scale, w/scale], asserting each block is constant."""
  b, h, w = mask.shape
  m = np.asarray(mask).reshape(b, h // scale, scale, w // scale, scale)
  first = m[:, :, :1, :, :1]
  assert (m == first).all(), "a mask block is not constant over its model patches"
  return first[:, :, 0, :, 0]


@pytest.mark.parametrize("img_size,mask_patch,model_patch,ratio", [
    (192, 32, 4, 0.6),   # SimMIM's 6x6 blocks: ceil(21.6) = 22
    (224, 32, 4, 0.6),   # 7x7 blocks: ceil(29.4) = 30
    (224, 32, 4, 0.75),  # Sec. 4.1.1's 75%
    (64, 16, 8, 0.5),
])
def test_exact_counts_and_block_structure(img_size, mask_patch, model_patch, ratio):
  batch = 16
  mask = masking.simmim_mask(jax.random.key(0), batch, img_size, mask_patch, model_patch, ratio)
  side = img_size // model_patch
  assert mask.shape == (batch, side, side) and mask.dtype == jnp.int32
  blocks = blocks_of(mask, mask_patch // model_patch)
  expected = math.ceil((img_size // mask_patch) ** 2 * ratio)
  np.testing.assert_array_equal(blocks.reshape(batch, -1).sum(1), expected)
  assert set(np.unique(blocks)) == {0, 1}
  assert len({b.tobytes() for b in blocks}) == batch, "masks must be drawn per image"


def test_masks_are_uniform_over_blocks_and_keys():
  a = masking.simmim_mask(jax.random.key(1), 512, 192)
  b = masking.simmim_mask(jax.random.key(2), 512, 192)
  assert not np.array_equal(a, b)
  freq = blocks_of(a, 8).mean(0)
  np.testing.assert_allclose(freq, 22 / 36, atol=0.08)


def test_runs_inside_jit_with_a_traced_key():
  f = jax.jit(lambda key: masking.simmim_mask(key, 4, 64, 32, 4, 0.6))
  np.testing.assert_array_equal(f(jax.random.key(3)),
                                masking.simmim_mask(jax.random.key(3), 4, 64, 32, 4, 0.6))
  jaxpr = jax.make_jaxpr(lambda key: masking.simmim_mask(key, 4, 64))(jax.random.key(0))
  assert "callback" not in str(jaxpr)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_ratio=0.0), "mask_ratio must lie strictly between 0 and 1, got 0.0"),
    (dict(mask_ratio=1.0), "mask_ratio must lie strictly between 0 and 1, got 1.0"),
    (dict(mask_patch_size=30), "multiple of the model's patch size 4, got 30"),
    (dict(img_size=200), "img_size must be a multiple of mask_patch_size 32, got 200"),
])
def test_invalid_arguments_raise_clear_errors(kwargs, message):
  args = dict(img_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6) | kwargs
  with pytest.raises(ValueError, match=message):
    masking.simmim_mask(jax.random.key(0), 2, **args)


def test_complementary_masks_keep_disjoint_blocks():
  n, batch = 2, 8
  masks = masking.complementary_masks(jax.random.key(0), batch, n, 192, mask_ratio=0.6)
  assert masks.shape == (batch, n, 48, 48)
  blocks = np.stack([blocks_of(masks[:, k], 8) for k in range(n)], 1).reshape(batch, n, -1)
  np.testing.assert_array_equal(blocks.sum(-1), 22)  # SimMIM's count per component
  kept = 1 - blocks
  assert kept.sum(1).max() == 1, "a block is kept by two components"


def test_complementary_masks_refuse_overlapping_requests():
  with pytest.raises(ValueError, match="num_mix=3 with mask_ratio=0.6 keeps 14 of 36 blocks"):
    masking.complementary_masks(jax.random.key(0), 2, 3, 192, mask_ratio=0.6)
