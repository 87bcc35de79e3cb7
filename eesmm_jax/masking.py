"""SimMIM block masks (EESMM Eq. 1-2), drawn on the device with `jax.random`.

A mask is int32 [B, img_size / model_patch, img_size / model_patch] with 1 = masked (SimMIM's
convention; the paper's M_k marks the kept pixels, i.e. 1 - this). Blocks of
`mask_patch_size` pixels are the unit of masking; exactly `ceil(mask_ratio * blocks)` of them are
masked in every image, as microsoft/SimMIM's MaskGenerator does with a random permutation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def check_mask_args(img_size: int, mask_patch_size: int, model_patch_size: int,
                    mask_ratio: float) -> None:
  """Raises ValueError naming the offending value and what is accepted."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
  if model_patch_size <= 0 or mask_patch_size <= 0 or mask_patch_size % model_patch_size:
    raise ValueError(f"mask_patch_size must be a positive multiple of the model's patch size "
                     f"{model_patch_size}, got {mask_patch_size}")
  if img_size % mask_patch_size:
    raise ValueError(f"img_size must be a multiple of mask_patch_size {mask_patch_size}, "
                     f"got {img_size}")


def num_masked_blocks(img_size: int, mask_patch_size: int, mask_ratio: float) -> int:
  """ceil(mask_ratio * blocks), SimMIM's count."""
  return math.ceil((img_size // mask_patch_size) ** 2 * mask_ratio)


def _block_ranks(rng: jax.Array, batch_size: int, num_blocks: int) -> jax.Array:
  """[B, L] int: a uniformly random permutation of 0..L-1 per image (the rank of each block)."""
  keys = jax.random.uniform(rng, (batch_size, num_blocks))
  return jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)


def _to_token_grid(block_mask: jax.Array, blocks_per_side: int, scale: int) -> jax.Array:
  """[..., L] block mask -> [..., side * scale, side * scale] token mask (repeat both axes)."""
  m = block_mask.reshape(block_mask.shape[:-1] + (blocks_per_side, blocks_per_side))
  m = jnp.repeat(jnp.repeat(m, scale, axis=-2), scale, axis=-1)
  return m.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _simmim_mask(rng, batch_size, img_size, mask_patch_size, model_patch_size, mask_ratio):
  side = img_size // mask_patch_size
  count = num_masked_blocks(img_size, mask_patch_size, mask_ratio)
  ranks = _block_ranks(rng, batch_size, side * side)
  return _to_token_grid(ranks < count, side, mask_patch_size // model_patch_size)


def simmim_mask(rng: jax.Array, batch_size: int, img_size: int, mask_patch_size: int = 32,
                model_patch_size: int = 4, mask_ratio: float = 0.6) -> jax.Array:
  """Eq. 1-2: one independent SimMIM block mask per image -> int32 [B, S/p, S/p], 1 = masked."""
  check_mask_args(img_size, mask_patch_size, model_patch_size, mask_ratio)
  return _simmim_mask(rng, batch_size, img_size, mask_patch_size, model_patch_size,
                      float(mask_ratio))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _complementary_masks(rng, batch_size, num_mix, img_size, mask_patch_size, model_patch_size,
                         mask_ratio):
  side = img_size // mask_patch_size
  num_blocks = side * side
  keep = num_blocks - num_masked_blocks(img_size, mask_patch_size, mask_ratio)
  ranks = _block_ranks(rng, batch_size, num_blocks)[:, None, :]  # one permutation per sample
  k = jnp.arange(num_mix)[None, :, None]
  kept = (ranks >= k * keep) & (ranks < (k + 1) * keep)
  return _to_token_grid(~kept, side, mask_patch_size // model_patch_size)


def complementary_masks(rng: jax.Array, batch_size: int, num_mix: int, img_size: int,
                        mask_patch_size: int = 32, model_patch_size: int = 4,
                        mask_ratio: float = 0.6) -> jax.Array:
  """n masks per blended sample whose KEPT blocks are disjoint -> int32 [B, n, S/p, S/p].

  Each component keeps `blocks - ceil(mask_ratio * blocks)` blocks, as with `simmim_mask`, but no
  block is kept by two components, so every patch of the blend shows at most one image
  (MixMIM-like). That needs num_mix * kept <= blocks.
  """
  check_mask_args(img_size, mask_patch_size, model_patch_size, mask_ratio)
  num_blocks = (img_size // mask_patch_size) ** 2
  keep = num_blocks - num_masked_blocks(img_size, mask_patch_size, mask_ratio)
  if num_mix * keep > num_blocks:
    raise ValueError(
        f"complementary masks need num_mix * kept blocks <= blocks, but num_mix={num_mix} with "
        f"mask_ratio={mask_ratio} keeps {keep} of {num_blocks} blocks per image; use "
        f"mask_ratio >= {1 - 1 / num_mix:.3g} (or fewer components)")
  return _complementary_masks(rng, batch_size, num_mix, img_size, mask_patch_size,
                              model_patch_size, float(mask_ratio))
