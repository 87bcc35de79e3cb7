"""SimMIM's pretraining view drawn on the device, for images read from prepared shards.

The shard reader (`shards`) delivers the stored images, uint8 [B, S0, S0, 3]; the train step's
first stage turns each into SimMIM's view as tf.data's `tfdata.augment` does: a
RandomResizedCrop window drawn with torchvision's rule (`crop_window`, the same rule as
`tfdata.random_resized_crop_window`: 10 tries of area fraction ~ U(scale) and log aspect ratio
~ U(log ratio), the first that fits, else the centre crop clamped to the ratio range), an
antialiased bilinear resize of that window to img_size, a horizontal flip with probability
0.5, and rounding to uint8. Every image draws its own window and flip from the step's key, so
the n components of an EESMM blend are augmented independently, as tf.data's per-example seeds
do.

The resize is two small matrix products per image: for each axis, a [S0, img_size] matrix of
triangle-filter weights over the window's rows (or columns), its width scaled by the shrink
factor (antialiasing) and renormalised at the window's edges. Those are the weights of
tf.image.resize(method='bilinear', antialias=True) applied to the cropped image, so a window
gives the pixels tf.data gives it; the flip reverses the column matrix. Everything is static in
shape and vmapped over the batch: one jitted function, no host round trip.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

# Folded into the step's key: the augmentation's draws are apart from the masks' and dropout's.
_AUGMENT_STREAM = 0x5A4D


def crop_window(key: jax.Array, height: int, width: int, scale=(0.67, 1.0),
                ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[jax.Array, jax.Array]:
  """(int32 [y, x, h, w], found): torchvision's RandomResizedCrop.get_params for an image of
  height x width, `found` False where none of the tries fit (the centre-crop fallback)."""
  k_area, k_ratio, k_offset = jax.random.split(key, 3)
  h_f, w_f = float(height), float(width)
  area = h_f * w_f * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  ok = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
  first = jnp.argmax(ok)
  found = jnp.any(ok)
  in_ratio = w_f / h_f
  fallback_w = round(h_f * ratio[1]) if in_ratio > ratio[1] else w_f
  fallback_h = round(w_f / ratio[0]) if in_ratio < ratio[0] else h_f
  h = jnp.where(found, h[first], fallback_h)
  w = jnp.where(found, w[first], fallback_w)
  u = jax.random.uniform(k_offset, (2,))
  y = jnp.where(found, jnp.floor(u[0] * (h_f - h + 1)), jnp.floor((h_f - h) / 2))
  x = jnp.where(found, jnp.floor(u[1] * (w_f - w + 1)), jnp.floor((w_f - w) / 2))
  return jnp.stack([y, x, h, w]).astype(jnp.int32), found


def resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int
                   ) -> jax.Array:
  """float32 [in_size, out_size]: column o holds the weights of input pixels [start, start +
  length) in output pixel o of an antialiased bilinear resize of that span to out_size (the
  triangle kernel of tf.image.resize(antialias=True), half-pixel centres, renormalised)."""
  length = length.astype(jnp.float32)
  step = length / out_size                     # input pixels per output pixel
  kernel_scale = jnp.maximum(step, 1.0)        # widen the filter when shrinking
  centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step      # in window coordinates
  pos = jnp.arange(in_size, dtype=jnp.float32) - start.astype(jnp.float32) + 0.5
  inside = (pos > 0) & (pos < length + 0.5)  # the window's pixels: pos - 0.5 in [0, length)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - centre[None, :]) / kernel_scale)
  weights = jnp.where(inside[:, None], weights, 0.0)
  total = jnp.sum(weights, axis=0, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def crop_and_resize(image: jax.Array, window: jax.Array, out_size: int, flip: jax.Array
                    ) -> jax.Array:
  """float32 [out, out, C]: `image` [H, W, C]'s window [y, x, h, w] resized to out x out,
  mirrored left-right where `flip`."""
  height, width = image.shape[0], image.shape[1]
  rows = resize_weights(window[0], window[2], height, out_size)
  cols = resize_weights(window[1], window[3], width, out_size)
  cols = jnp.where(flip, cols[:, ::-1], cols)
  x = image.astype(jnp.float32)
  x = jnp.einsum("ho,hwc->owc", rows, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("wp,owc->opc", cols, x, precision=jax.lax.Precision.HIGHEST)


def _to_pixels(x: jax.Array) -> jax.Array:
  """Rounded to uint8, as tf.data's view is (and PIL's resize)."""
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def random_resized_crop(key: jax.Array, images: jax.Array, out_size: int, scale=(0.67, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """SimMIM's view of every image: uint8 [B, H, W, C] -> uint8 [B, out, out, C], a window and a
  flip drawn per image from `key`."""
  height, width = images.shape[1], images.shape[2]

  def one(k, image):
    k_crop, k_flip = jax.random.split(k)
    window, _ = crop_window(k_crop, height, width, scale, ratio)
    flip = jax.random.uniform(k_flip) < 0.5
    return _to_pixels(crop_and_resize(image, window, out_size, flip))

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def whole_view(images: jax.Array, out_size: int) -> jax.Array:
  """The whole stored image resized to out_size (no crop, no flip): what an evaluation-mode
  pass (the reconstruction pictures) sees."""
  height, width = images.shape[1], images.shape[2]
  window = jnp.array([0, 0, height, width], jnp.int32)
  return jax.vmap(lambda im: _to_pixels(crop_and_resize(im, window, out_size, False)))(images)


def augment_then(loss_fn: Callable, img_size: int, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)
                 ) -> Callable:
  """loss_fn(params, images, rng, train) on stored-size images: each is first cropped and
  flipped (train) or resized whole (not train) to img_size, with draws from fold_in(rng, .),
  so the masks and dropout draw from `rng` exactly as they would on tf.data's images."""
  scale, ratio = tuple(scale), tuple(ratio)

  def augmented(params, images, rng, train):
    if images.dtype != jnp.uint8 or images.ndim != 4:
      raise ValueError(f"the device augmentation takes uint8 [B, H, W, C] stored images, got "
                       f"{images.dtype} {images.shape}")
    if train:
      views = random_resized_crop(jax.random.fold_in(rng, _AUGMENT_STREAM), images, img_size,
                                  scale, ratio)
    else:
      views = whole_view(images, img_size)
    return loss_fn(params, views, rng, train)

  return augmented
