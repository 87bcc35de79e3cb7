"""Fine-tuning augmentation: mixup / cutmix label arithmetic (JAX) against timm's, and the tf.data
RandAugment ops and random erasing against timm's PIL ops."""
# timm (torchvision) must be imported before TensorFlow: the other order segfaults on import.
import timm.data.auto_augment as timm_aa
import torch
from timm.data.mixup import mixup_target

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from eesmm_jax import augment
from eesmm_jax.data import finetune_input as fi

K = 7  # classes


def aug(**kw):
  c = augment.default_aug_config()
  c.update(kw)
  return c


def constant_images(b, h=16, w=12):
  """Image i is the constant i + 1, so every mixed pixel tells whose it is."""
  return jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None],
                          (b, h, w, 3))


def timm_targets(labels, lam, smoothing=0.1):
  return mixup_target(torch.as_tensor(np.array(labels, np.int64)), K, float(lam), smoothing).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_box_pixels_and_targets(seed):
  b = 6
  x, labels = constant_images(b), jnp.array([0, 1, 2, 3, 4, 6])
  mixed, targets = jax.jit(lambda r: augment.mix_batch(r, x, labels, K, aug(switch_prob=1.0)))(
      jax.random.key(seed))
  mixed = np.asarray(mixed)
  own = mixed == np.asarray(x)
  partner = mixed == np.asarray(x)[::-1]
  assert (own | partner).all()  # every pixel is the image's or its partner's
  box = partner[0, :, :, 0]
  rows, cols = np.nonzero(box)
  if rows.size:  # one axis-aligned box, the same for every image
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    for i in range(b // 2):
      np.testing.assert_array_equal(partner[i, :, :, 0], box)
  lam = 1.0 - box.mean()  # the corrected lambda: the share of the image left uncovered
  np.testing.assert_allclose(targets, timm_targets(labels, lam), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_blend_and_targets(seed):
  b = 4
  x, labels = constant_images(b), jnp.array([5, 0, 3, 3])
  mixed, targets = augment.mix_batch(jax.random.key(seed), x, labels, K, aug(switch_prob=0.0))
  # Image 0 = lam * 1 + (1 - lam) * b.
  lam = (b - float(mixed[0, 0, 0, 0])) / (b - 1)
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], atol=1e-5)
  np.testing.assert_allclose(targets, timm_targets(labels, lam), atol=1e-5)


def test_label_smoothing_alone_and_switch_rates():
  labels = jnp.array([0, 1, 2, 6])
  x = constant_images(4)
  same, targets = augment.mix_batch(jax.random.key(0), x, labels, K, aug(mixup=0.0, cutmix=0.0))
  np.testing.assert_array_equal(same, x)
  np.testing.assert_allclose(targets, timm_targets(labels, 1.0), atol=1e-7)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-6)

  # Over many batches: cutmix half the time (switch 0.5); mixup lam ~ Beta(0.8, 0.8), mean 0.5.
  def one(r):
    mixed, _ = augment.mix_batch(r, x, labels, K, aug())
    pure = jnp.all((mixed == x) | (mixed == x[::-1]))
    return pure, mixed[0, 0, 0, 0]
  pure, first = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 2000))
  assert 0.45 < float(pure.mean()) < 0.55
  lam = (4 - np.asarray(first)[~np.asarray(pure)]) / 3
  assert abs(lam.mean() - 0.5) < 0.03 and 0.1 < lam.std() < 0.4


def test_soft_cross_entropy_equals_smoothed_ce():
  logits = jax.random.normal(jax.random.key(0), (5, K))
  labels = jnp.array([0, 1, 2, 3, 6])
  t = augment.smooth_one_hot(labels, K, 0.1)
  ref = torch.nn.functional.cross_entropy(torch.tensor(np.array(logits)),
                                          torch.tensor(np.asarray(labels, np.int64)),
                                          label_smoothing=0.1, reduction="none").numpy()
  np.testing.assert_allclose(augment.soft_cross_entropy(logits, t), ref, atol=1e-5)


def test_aug_config_errors():
  with pytest.raises(ValueError, match="config.aug.switch_prob"):
    augment.check_aug_config(aug(switch_prob=1.5))
  with pytest.raises(ValueError, match="config.aug.randaug_magnitude"):
    augment.check_aug_config(aug(randaug_magnitude=12))


# ----------------------------------------------------------------------------- RandAugment


@pytest.fixture(scope="module")
def picture():
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:40, 0:48]
  img = np.stack([x * 5, y * 6, (x + y) * 2], -1) + rng.integers(0, 40, (40, 48, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


PIXEL_OPS = [("auto_contrast", fi.auto_contrast, None), ("equalize", fi.equalize, None),
             ("invert", fi.invert, None), ("posterize", fi.posterize, 2),
             ("posterize", fi.posterize, 8), ("solarize", fi.solarize, 100),
             ("solarize_add", fi.solarize_add, 50), ("color", fi.color, 1.7),
             ("color", fi.color, 0.3), ("contrast", fi.contrast, 1.6),
             ("brightness", fi.brightness, 1.5), ("sharpness", fi.sharpness, 1.8),
             ("sharpness", fi.sharpness, 0.2)]


@pytest.mark.parametrize("name,op,arg", PIXEL_OPS)
def test_pixel_ops_equal_timm(picture, name, op, arg):
  args = () if arg is None else (arg,)
  expected = np.asarray(getattr(timm_aa, name)(Image.fromarray(picture), *args), np.float32)
  out = op(tf.constant(picture, tf.float32), float(arg or 0)).numpy()
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name,op,arg", [
    ("rotate", fi.rotate, 23.0), ("shear_x", fi.shear_x, 0.27), ("shear_y", fi.shear_y, -0.23),
    ("translate_x_rel", fi.translate_x_rel, 0.31), ("translate_y_rel", fi.translate_y_rel, -0.37)])
def test_geometric_ops_equal_timm_with_nearest(picture, name, op, arg):
  """Same geometry and fill as PIL; compared with nearest sampling (rounding ties may differ)."""
  expected = getattr(timm_aa, name)(Image.fromarray(picture), arg, resample=Image.NEAREST,
                                    fillcolor=fi.FILL_RGB)
  out = op(tf.constant(picture, tf.float32), arg, "NEAREST").numpy()
  assert (out != np.asarray(expected, np.float32)).any(-1).mean() < 0.01


@pytest.mark.parametrize("name", fi.RANDAUG_OPS)
def test_levels_equal_timm(name):
  for m in np.linspace(0, 10, 11):
    ref = timm_aa.LEVEL_TO_ARG[name](m, {}) if timm_aa.LEVEL_TO_ARG[name] else (0.0,)
    ours = {float(fi.randaug_level(name, m, s)) for s in (1.0, -1.0)}
    assert any(abs(o - ref[0]) < 1e-5 for o in ours), (name, m, ref, ours)


def test_rand_augment_is_a_function_of_its_seed(picture):
  image = tf.constant(picture, tf.float32)
  run = tf.function(lambda s: fi.rand_augment(image, s))
  outs = [run(tf.constant([0, s])).numpy() for s in (1, 1, 2, 3, 4, 5)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert any((o != outs[0]).any() for o in outs[2:])
  for o in outs:
    assert o.min() >= 0 and o.max() <= 255 and (o == np.round(o)).all()


def test_random_erasing_one_box_of_noise():
  image = tf.fill([24, 32, 3], 5.0)
  for s in range(5):
    out = fi.random_erasing(image, tf.constant([s, 0]), prob=1.0).numpy()
    box = (out != 5.0).any(-1)
    rows, cols = np.nonzero(box)
    area = box.sum() / box.size
    assert 0.015 < area < 0.36
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert abs(out[box].std() - 1.0) < 0.3  # standard normal noise
  np.testing.assert_array_equal(fi.random_erasing(image, tf.constant([0, 0]), prob=0.0), image)
