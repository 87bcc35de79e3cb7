"""Fine-tuning's batch augmentation on device: mixup, cutmix and label smoothing (JAX).

timm's `Mixup` in 'batch' mode, as SimMIM's fine-tuning uses it (mixup 0.8, cutmix 1.0, switch
probability 0.5, mix probability 1, label smoothing 0.1, cutmix area correction on):

* one lambda per batch, from Beta(cutmix_alpha) with probability `switch_prob`, else from
  Beta(mixup_alpha); each image is mixed with the batch reversed (x and x.flip(0));
* mixup blends the pixels, x * lam + x_flipped * (1 - lam);
* cutmix pastes a box of the reversed batch; the box has sides int(size * sqrt(1 - lam)) around a
  uniform centre, clipped to the image, and lam becomes the share of the image left uncovered;
* targets are lam * smooth(y) + (1 - lam) * smooth(y_flipped), smooth = label smoothing.

The per-image images and labels are plain arrays, so the step stays one jitted function; the
reversal is over the global batch (timm reverses each GPU's local batch: the same distribution).
The tf.data side (RandAugment, random erasing) is in `finetune_input`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def default_aug_config() -> ml_collections.ConfigDict:
  """SimMIM / BEiT fine-tuning augmentation (timm's names: rand-m9-mstd0.5-inc1, reprob 0.25)."""
  c = ml_collections.ConfigDict()
  c.randaug_num_ops = 2        # 0 turns RandAugment off
  c.randaug_magnitude = 9.0    # m9, of timm's scale 0..10
  c.randaug_mstd = 0.5         # magnitude ~ N(m, mstd) per op, clipped to [0, 10]
  c.randaug_prob = 0.5         # each chosen op applies with this probability (timm's default)
  c.reprob = 0.25              # random erasing ('pixel' mode, one box)
  c.mixup = 0.8                # Beta alpha of mixup; 0 = off
  c.cutmix = 1.0               # Beta alpha of cutmix; 0 = off
  c.switch_prob = 0.5          # P(cutmix) when both are on
  c.label_smoothing = 0.1
  return c


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere (timm)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
  """timm's `rand_bbox` + `cutmix_bbox_and_lam(correct_lam=True)`.

  -> (y0, y1, x0, x1, lam): a box of sides int(h * sqrt(1 - lam)), int(w * sqrt(1 - lam)) centred
  at a uniform pixel, clipped to the image; lam corrected to 1 - box area / image area.
  """
  ry, rx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return y0, y1, x0, x1, lam


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(images [B, H, W, C], labels [B]) -> (mixed images, soft targets [B, num_classes]).

  With mixup and cutmix both off this is label smoothing alone.
  """
  targets = smooth_one_hot(labels, num_classes, config.label_smoothing)
  if not (config.mixup > 0 or config.cutmix > 0):
    return images, targets
  r_switch, r_mixup, r_cutmix, r_box = jax.random.split(rng, 4)
  if config.mixup > 0 and config.cutmix > 0:
    use_cutmix = jax.random.uniform(r_switch) < config.switch_prob
  else:
    use_cutmix = jnp.asarray(config.cutmix > 0)
  # Both draws are made and one kept (the unused alpha is any valid value).
  lam_mixup = jax.random.beta(r_mixup, config.mixup or 1.0, config.mixup or 1.0)
  lam_cutmix = jax.random.beta(r_cutmix, config.cutmix or 1.0, config.cutmix or 1.0)

  _, height, width, _ = images.shape
  flipped = images[::-1]
  y0, y1, x0, x1, lam_box = cutmix_box(r_box, lam_cutmix, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut = jnp.where(inside[None, :, :, None], flipped, images)
  blend = lam_mixup.astype(images.dtype)
  blended = images * blend + flipped * (1 - blend)
  lam = jnp.where(use_cutmix, lam_box, lam_mixup)
  images = jnp.where(use_cutmix, cut, blended)
  return images, targets * lam + targets[::-1] * (1.0 - lam)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def check_aug_config(c: ml_collections.ConfigDict) -> None:
  """ValueErrors naming the key and what is accepted."""
  def bad(key, accepted):
    raise ValueError(f"config.aug.{key}={c[key]!r} is invalid: {accepted}")
  for key in ("mixup", "cutmix"):
    if not c[key] >= 0:
      bad(key, "must be >= 0 (a Beta alpha; 0 turns it off)")
  for key in ("switch_prob", "reprob", "randaug_prob"):
    if not 0 <= c[key] <= 1:
      bad(key, "must be a probability in [0, 1]")
  if not 0 <= c.label_smoothing < 1:
    bad("label_smoothing", "must be in [0, 1)")
  if int(c.randaug_num_ops) != c.randaug_num_ops or c.randaug_num_ops < 0:
    bad("randaug_num_ops", "must be an integer >= 0 (0 turns RandAugment off)")
  if not 0 <= c.randaug_magnitude <= 10:
    bad("randaug_magnitude", "must be in [0, 10] (timm's scale; SimMIM uses 9)")
  if not c.randaug_mstd >= 0:
    bad("randaug_mstd", "must be >= 0")
