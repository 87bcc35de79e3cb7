"""tf.data input for supervised fine-tuning: timm's ImageNet training transform, stateless.

SimMIM fine-tunes with timm's `create_transform(is_training=True)`: RandomResizedCrop(scale
(0.08, 1), ratio (3/4, 4/3), bicubic) and a horizontal flip, RandAugment 'rand-m9-mstd0.5-inc1'
(colour jitter is then off), normalisation, random erasing (p 0.25, 'pixel' mode, one box).
Mixup and cutmix run on device (`augment.mix_batch`). Evaluation uses
`eesmm_jax.data.create_eval_iterator` (centre crop, padded last batch with a 'mask').

Why our own RandAugment and random erasing: the maintained tf.data implementations
(tf-models-official `official.vision.ops.augment`, keras-cv, Keras 3's RandAugment layer) draw
from TF's stateful random ops, which would break the input's exact resume (every random draw here
is a stateless function of (seed, process, epoch, index), as in `tfdata`);
tf-models-official also pins another TensorFlow and brings ~28 dependencies, and Keras' layer has
neither the magnitude noise (mstd) nor timm's 'increasing' op set. Our ops follow timm /
PIL semantics op by op (tests/data/test_augment.py compares each with timm's PIL op). Known
difference: the geometric ops interpolate bilinearly (TF's projective transform has no bicubic;
SimMIM asks timm for bicubic).

Sources are `tfdata`'s (TFDS by name, or an ImageFolder-layout folder); they must be
labelled. The stream is the pretraining input's scheme: epoch e of this process's examples is
shuffled from (seed, e), each example is augmented from (seed, process, e, index), and resuming
at step k skips the undecoded records to position k * local_batch.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import ml_collections
import tensorflow as tf

from eesmm_jax.data import tfdata as ip
from eesmm_jax.data.common import finetune_data_config  # noqa: F401  (its home was here)

# timm's `_RAND_INCREASING_TRANSFORMS` (the 'inc1' op set), in its order.
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
               "TranslateXRel", "TranslateYRel")
# Geometric ops fill with the ImageNet mean in [0, 255], as timm's `img_mean`.
FILL_RGB = tuple(round(255 * m) for m in ip.MEAN_RGB)
TRANSLATE_PCT = 0.45


# ----------------------------------------------------------------------------- RandAugment ops
# Images are float32 [H, W, 3] holding integers in [0, 255]; every op returns the same, rounded
# as PIL's uint8 result would be.


def _u8(x: tf.Tensor) -> tf.Tensor:
  return tf.clip_by_value(tf.floor(x), 0.0, 255.0)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor): degenerate + factor * (image - degenerate)."""
  return _u8(degenerate + factor * (image - degenerate))


def _luma(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16, [H, W, 1]."""
  r, g, b = tf.unstack(image, axis=-1)
  return tf.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)[..., None]


def auto_contrast(image, _=None):
  """PIL ImageOps.autocontrast: each channel stretched to [0, 255] (unchanged if constant)."""
  lo = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  hi = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, _u8((image - lo) * scale), image)


def equalize(image, _=None):
  """PIL ImageOps.equalize, per channel: lut[i] = (step // 2 + #pixels below i) // step with
  step = (#pixels - #pixels of the top non-empty bin) // 255; identity when step is 0."""
  def channel(c):
    hist = tf.math.bincount(tf.cast(tf.reshape(c, [-1]), tf.int32), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last) // 255
    below = tf.cumsum(hist, exclusive=True)
    lut = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    out = tf.cast(tf.gather(lut, tf.cast(c, tf.int32)), tf.float32)
    return tf.where(step > 0, out, c)
  return tf.stack([channel(image[..., k]) for k in range(3)], axis=-1)


def invert(image, _=None):
  return 255.0 - image


def posterize(image, bits):
  """Keep the `bits` high bits (0 bits -> black); 8 or more: unchanged."""
  shift = tf.cast(8 - tf.minimum(bits, 8.0), tf.int32)
  pixels = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def solarize(image, threshold):
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, add, threshold=128.0):
  return tf.where(image < threshold, tf.minimum(image + add, 255.0), image)


def color(image, factor):
  return _blend(tf.broadcast_to(_luma(image), tf.shape(image)), image, factor)


def contrast(image, factor):
  """Blend with the image's mean grey level (PIL: int(mean of L + 0.5))."""
  mean = tf.floor(tf.reduce_mean(_luma(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13); the border is unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = _u8(smooth + 0.5)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([height - 2, width - 2, 1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner > 0, smooth, image)
  return _blend(degenerate, image, factor)


def affine(image, matrix, interpolation: str = "BILINEAR"):
  """PIL's `Image.transform(AFFINE, (a, b, c, d, e, f))`: output pixel (x, y) samples the input
  at (a x + b y + c, d x + e y + f) in continuous coordinates (pixel centres at +0.5); outside
  the image, the fill colour."""
  a, b, c, d, e, f = [tf.cast(m, tf.float32) for m in matrix]
  # Pixel indices i = coordinate - 0.5 on both sides.
  transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, 0.0, 0.0])
  fill = tf.constant(FILL_RGB, tf.float32)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  # Transforming image - fill with fill value 0 puts the fill colour outside.
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform[None], output_shape=[height, width],
      fill_value=0.0, interpolation=interpolation, fill_mode="CONSTANT")[0]
  return _u8(out + fill + 0.5)


def rotate(image, degrees, interpolation="BILINEAR"):
  """PIL's Image.rotate(degrees): counter-clockwise about the centre (w/2, h/2)."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return affine(image, (cos, sin, c, -sin, cos, f), interpolation)


def shear_x(image, factor, interpolation="BILINEAR"):
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), interpolation)


def shear_y(image, factor, interpolation="BILINEAR"):
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), interpolation)


def translate_x_rel(image, pct, interpolation="BILINEAR"):
  pixels = pct * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), interpolation)


def translate_y_rel(image, pct, interpolation="BILINEAR"):
  pixels = pct * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), interpolation)


def _enhance(m, sign):
  return tf.maximum(0.1, 1.0 + sign * m / 10.0 * 0.9)


# name -> (op, level -> argument given the magnitude m in [0, 10] and a random sign of +-1):
# timm's `LEVEL_TO_ARG` for the 'increasing' op set.
_RANDAUG = {
    "AutoContrast": (auto_contrast, lambda m, s: 0.0),
    "Equalize": (equalize, lambda m, s: 0.0),
    "Invert": (invert, lambda m, s: 0.0),
    "Rotate": (rotate, lambda m, s: s * m / 10.0 * 30.0),
    "PosterizeIncreasing": (posterize, lambda m, s: 4.0 - tf.floor(m / 10.0 * 4.0)),
    "SolarizeIncreasing": (solarize, lambda m, s: 256.0 - tf.floor(m / 10.0 * 256.0)),
    "SolarizeAdd": (solarize_add, lambda m, s: tf.minimum(128.0, tf.floor(m / 10.0 * 110.0))),
    "ColorIncreasing": (color, _enhance),
    "ContrastIncreasing": (contrast, _enhance),
    "BrightnessIncreasing": (brightness, _enhance),
    "SharpnessIncreasing": (sharpness, _enhance),
    "ShearX": (shear_x, lambda m, s: s * m / 10.0 * 0.3),
    "ShearY": (shear_y, lambda m, s: s * m / 10.0 * 0.3),
    "TranslateXRel": (translate_x_rel, lambda m, s: s * m / 10.0 * TRANSLATE_PCT),
    "TranslateYRel": (translate_y_rel, lambda m, s: s * m / 10.0 * TRANSLATE_PCT),
}
assert tuple(_RANDAUG) == RANDAUG_OPS


def randaug_level(name: str, magnitude, sign=1.0):
  """The argument op `name` receives at `magnitude` (timm's level_fn, sign drawn outside)."""
  return _RANDAUG[name][1](tf.cast(magnitude, tf.float32), tf.cast(sign, tf.float32))


def apply_randaug_op(name: str, image, magnitude, sign=1.0):
  return _RANDAUG[name][0](image, randaug_level(name, magnitude, sign))


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> tf.Tensor:
  """timm's RandAugment 'rand-m{magnitude}-mstd{magnitude_std}-inc1' with stateless randomness.

  `num_ops` ops drawn uniformly with replacement; each applies with probability `prob` at
  magnitude N(magnitude, magnitude_std) clipped to [0, 10], with a random sign where the op has
  a direction.
  """
  for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
    s_op, s_apply, s_mag, s_sign = tf.unstack(tf.random.experimental.stateless_split(op_seed, 4))
    index = tf.random.stateless_uniform([], s_op, 0, len(RANDAUG_OPS), tf.int32)
    m = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
    m = tf.clip_by_value(m, 0.0, 10.0)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) > 0.5, -1.0, 1.0)
    branches = [lambda name=name: apply_randaug_op(name, image, m, sign) for name in RANDAUG_OPS]
    image = tf.cond(tf.random.stateless_uniform([], s_apply) < prob,
                    lambda: tf.switch_case(index, branches), lambda: image)
  return image


def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.25,
                   area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing('pixel', count 1) on a normalised image: with probability `prob`, a box
  of area fraction U(area) and log-uniform aspect (first of 10 tries that fits strictly inside)
  is replaced by standard normal noise."""
  s_apply, s_area, s_aspect, s_pos, s_noise = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target = tf.random.stateless_uniform([attempts], s_area, area[0], area[1]) * hf * wf
  ratio = tf.exp(tf.random.stateless_uniform([attempts], s_aspect, math.log(aspect[0]),
                                             math.log(aspect[1])))
  h = tf.round(tf.sqrt(target * ratio))
  w = tf.round(tf.sqrt(target / ratio))
  ok = (w < wf) & (h < hf)
  first = tf.argmax(tf.cast(ok, tf.int32))
  h, w = h[first], w[first]
  u = tf.random.stateless_uniform([2], s_pos)
  top, left = tf.floor(u[0] * (hf - h + 1)), tf.floor(u[1] * (wf - w + 1))
  rows = tf.range(hf)[:, None, None]
  cols = tf.range(wf)[None, :, None]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  erase = tf.reduce_any(ok) & (tf.random.stateless_uniform([], s_apply) < prob)
  noise = tf.random.stateless_normal(tf.shape(image), s_noise)
  return tf.where(box & erase, noise, image)


# ----------------------------------------------------------------------------- one example


def train_view(raw: tf.Tensor, seed: tf.Tensor, data: ml_collections.ConfigDict,
               aug: ml_collections.ConfigDict) -> tf.Tensor:
  """The fine-tuning view of one encoded image: float32 [img_size, img_size, 3], normalised."""
  s_crop, s_flip, s_randaug, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  size = int(data.img_size)
  image = ip.decode_and_random_crop(raw, s_crop, tuple(data.crop_scale), tuple(data.crop_ratio))
  image = tf.image.resize(image, [size, size], method="bicubic", antialias=True)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)  # PIL's resize returns uint8
  image = tf.where(tf.random.stateless_uniform([], s_flip) < 0.5, image[:, ::-1], image)
  if aug.randaug_num_ops:
    image = rand_augment(image, s_randaug, int(aug.randaug_num_ops), float(aug.randaug_magnitude),
                         float(aug.randaug_mstd), float(aug.randaug_prob))
  image = (image / 255.0 - ip.MEAN_RGB) / ip.STDDEV_RGB
  if aug.reprob:
    image = random_erasing(image, s_erase, float(aug.reprob))
  return tf.ensure_shape(tf.cast(image, tf.float32), [size, size, 3])


# ----------------------------------------------------------------------------- the stream


def num_classes(data: ml_collections.ConfigDict) -> int:
  """Classes of the labelled dataset `data` names (folder: its class sub-directories)."""
  if data.dataset == "folder":
    _, labels, classes = ip.list_folder(data.data_dir, data.split)
    if labels is None:
      raise ValueError(f"config.data.data_dir {data.data_dir!r} holds unlabelled images; "
                       "fine-tuning needs the ImageFolder layout <data_dir>/<split>/<class>/")
    return len(classes)
  if data.dataset == "synthetic":
    raise ValueError("config.data.dataset='synthetic' has no classes to fine-tune on: use a "
                     "TFDS dataset or 'folder'")
  if data.dataset == "shards":
    raise ValueError("config.data.dataset='shards' feeds pretraining only: fine-tuning, "
                     "evaluation and probes read the folder or TFDS dataset through tf.data")
  features = ip._tfds_builder(data).info.features
  if "label" not in features or not hasattr(features["label"], "num_classes"):
    raise ValueError(f"TFDS dataset {data.dataset!r} has no ClassLabel 'label' feature")
  return int(features["label"].num_classes)


def make_finetune_dataset(data: ml_collections.ConfigDict, aug: ml_collections.ConfigDict,
                          global_batch: int, start_step: int = 0, *,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> tf.data.Dataset:
  """Infinite per-process batches {'image': float32 [b, S, S, 3], 'label': int32 [b]} from
  `start_step` on, b = global_batch // process_count."""
  if data.dataset == "synthetic":
    num_classes(data)  # raises
  # The pretraining stream (same order, resume and multi-process guarantees) with the
  # fine-tuning augmentation.
  ds = ip.make_pretrain_dataset(data, global_batch, start_step, process_index=process_index,
                                process_count=process_count,
                                view=lambda raw, seed: train_view(raw, seed, data, aug))
  if "label" not in ds.element_spec:
    raise ValueError(f"dataset {data.dataset!r} (split {data.split!r}) has no labels")
  return ds


def create_finetune_iterator(data, aug, global_batch: int, start_step: int = 0, *,
                             process_index=None, process_count=None) -> Iterator[dict]:
  """Numpy batches of this process; batch k of the run first when start_step = k."""
  return ip.numpy_batches(make_finetune_dataset(data, aug, global_batch, start_step,
                                               process_index=process_index,
                                               process_count=process_count), data)
