"""The pretraining objectives: SimMIM, and EESMM (superposition of n masked images, Eq. 1-7).

One interface for every method:

    model = build_model(config.objective, encoder)
    loss_fn = build_objective(config.objective, model)
    loss, aux = loss_fn(params, images, rng, train)

`images` is a global batch [n * B, H, W, 3] of ImageNet-normalised NHWC images, each already
augmented on its own (random-resized crop and flip: Eq. 3's Scale, Crop and Flip) by tf.data,
or, for prepared shards, by the step's first stage (`data.device_augment.augment_then`, which
plan.py wraps around this loss). They form B blended samples; sample b blends images n*b .. n*b + n - 1 (a reshape to
[B, n, ...]). Consecutive images are the ones that share a device when the batch is sharded over
devices, so blending needs no communication (as long as the per-device batch is a multiple of
n). num_mix = 1 is SimMIM: the same code, with one component of weight 1.

Everything here is pure and jit-able; masks and rotations are drawn on the device.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eesmm_jax import data, masking
from eesmm_jax.models.decoders import MIMModel, SimMIMDecoder, TransformerDecoder

MASK_MODES = ("independent", "shared", "complementary")
HEADS = ("split", "subtract")
ASSIGNMENTS = ("auto", "permutation", "fixed")
LOSS_TYPES = ("l1", "l2")
DECODERS = ("simmim", "transformer")
# SimMIM's loss denominator guard: sum(mask) + 1e-5.
COUNT_EPS = 1e-5


def default_objective_config() -> ml_collections.ConfigDict:
  """EESMM defaults (n = 2, Sec. 4.3 ablation settings); num_mix = 1 gives SimMIM."""
  return ml_collections.ConfigDict(dict(
      num_mix=2,                  # n images per blended sample; 1 = SimMIM
      mix_weights=None,           # lambda_1..n of Eq. 3; None = 1/n each
      mask_mode="independent",    # 'independent' | 'shared' | 'complementary'
      mask_ratio=0.6,
      mask_patch_size=32,
      rotate=False,               # Eq. 3's Rotate: a random multiple of 90 degrees per image
      head="split",               # 'split': n images out | 'subtract': Eq. 4-6
      assignment="auto",          # 'permutation' | 'fixed' | 'auto' = permutation iff lambdas equal
      mix_loss_weight=0.0,        # Fig. 2's Loss3 on the recomposed blend
      loss_type="l1",             # 'l1' (ablation default) | 'l2' (Eq. 7 as printed)
      norm_target=False,          # SimMIM's local target normalisation
      norm_target_patch_size=47,
      decoder="simmim",           # 'simmim' (1x1 conv + pixel shuffle) | 'transformer'
      decoder_dim=512,            # transformer decoder (Sec. 4.1.1)
      decoder_depth=8,
      decoder_num_heads=16,
  ))


def _choice(config, key, allowed):
  if config[key] not in allowed:
    raise ValueError(f"objective.{key} must be one of {allowed}, got {config[key]!r}")


def check_objective_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and the accepted values."""
  expected = set(default_objective_config().keys())
  if set(config.keys()) != expected:
    raise ValueError(f"objective config keys differ from default_objective_config(): unknown "
                     f"{sorted(set(config.keys()) - expected)}, missing "
                     f"{sorted(expected - set(config.keys()))}")
  n = config.num_mix
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"objective.num_mix must be an integer >= 1, got {n!r}")
  if config.mix_weights is not None:
    w = tuple(config.mix_weights)
    if len(w) != n or any(x <= 0 for x in w):
      raise ValueError(f"objective.mix_weights must be None (1/n each) or {n} positive numbers, "
                       f"got {w}")
  for key, allowed in (("mask_mode", MASK_MODES), ("head", HEADS),
                       ("assignment", ASSIGNMENTS), ("loss_type", LOSS_TYPES),
                       ("decoder", DECODERS)):
    _choice(config, key, allowed)
  if not 0.0 < config.mask_ratio < 1.0:
    raise ValueError(f"objective.mask_ratio must lie strictly between 0 and 1, got "
                     f"{config.mask_ratio}")
  if config.head == "subtract" and config.assignment == "permutation":
    raise ValueError("objective.assignment='permutation' needs head='split': the 'subtract' "
                     "head knows which component each prediction is")
  if config.head == "subtract" and config.norm_target:
    raise ValueError("objective.norm_target=True needs head='split': the 'subtract' head "
                     "subtracts raw images from the predicted blend, so its predictions live "
                     "in image space, not in locally normalised space")
  p = config.norm_target_patch_size
  if not isinstance(p, int) or p < 3 or p % 2 == 0:
    raise ValueError(f"objective.norm_target_patch_size must be an odd integer >= 3, got {p!r}")
  if config.mix_loss_weight < 0:
    raise ValueError(f"objective.mix_loss_weight must be >= 0, got {config.mix_loss_weight}")


def mix_weights(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """lambda_1..n: config.mix_weights, or 1/n each."""
  if config.mix_weights is None:
    return (1.0 / config.num_mix,) * config.num_mix
  return tuple(float(w) for w in config.mix_weights)


def uses_permutation(config: ml_collections.ConfigDict) -> bool:
  """'auto' is permutation-invariant exactly when the components are interchangeable."""
  if config.assignment == "auto":
    return config.head == "split" and len(set(mix_weights(config))) == 1
  return config.assignment == "permutation"


def build_model(config: ml_collections.ConfigDict, encoder) -> MIMModel:
  """Encoder (a Swin with use_mask_token=True, num_classes=0) + the configured decoder."""
  check_objective_config(config)
  if not getattr(encoder, "use_mask_token", False):
    raise ValueError("the encoder must be built with use_mask_token=True")
  stride = encoder.patch_size * 2 ** (len(encoder.depths) - 1)
  outputs = config.num_mix if config.head == "split" else 1
  if config.decoder == "simmim":
    decoder = SimMIMDecoder(outputs, stride, encoder.in_chans, dtype=encoder.dtype)
  else:
    decoder = TransformerDecoder(outputs, stride, encoder.in_chans, config.decoder_dim,
                                 config.decoder_depth, config.decoder_num_heads,
                                 dtype=encoder.dtype, impl=encoder.impl)
  return MIMModel(encoder=encoder, decoder=decoder)


# ----------------------------------------------------------------------------------------------
# Eq. 1-3: masks and superposition.


def group_components(images: jax.Array, num_mix: int) -> jax.Array:
  """[n*B, H, W, C] -> [B, n, H, W, C]: sample b holds images n*b .. n*b + n - 1."""
  if images.shape[0] % num_mix:
    raise ValueError(f"a batch of {images.shape[0]} images cannot form samples of "
                     f"num_mix={num_mix} images: the batch must be a multiple of num_mix")
  return images.reshape((images.shape[0] // num_mix, num_mix) + images.shape[1:])


def component_masks(rng: jax.Array, config: ml_collections.ConfigDict, batch_size: int,
                    img_size: int, model_patch_size: int) -> jax.Array:
  """Eq. 1-2: the masks M_k of the n components -> int32 [B, n, S/p, S/p], 1 = masked."""
  n = config.num_mix
  args = (img_size, config.mask_patch_size, model_patch_size, config.mask_ratio)
  if config.mask_mode == "independent":
    m = masking.simmim_mask(rng, batch_size * n, *args)
    return m.reshape((batch_size, n) + m.shape[1:])
  if config.mask_mode == "shared":
    m = masking.simmim_mask(rng, batch_size, *args)[:, None]
    return jnp.broadcast_to(m, (batch_size, n) + m.shape[2:])
  return masking.complementary_masks(rng, batch_size, n, *args)


def upsample_mask(mask: jax.Array, patch_size: int) -> jax.Array:
  """Token mask [..., h, w] -> pixel mask [..., h*p, w*p] (SimMIM's repeat_interleave)."""
  return jnp.repeat(jnp.repeat(mask, patch_size, axis=-2), patch_size, axis=-1)


def random_rot90(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Eq. 3's Rotate(I, theta) with theta a random multiple of 90 degrees per image [N, S, S, C].

  Quarter turns keep the pixel, patch and mask-block grids, so a rotated image is masked and
  reconstructed exactly like any other; other angles would need interpolation and leave corners
  with no content.
  """
  turns = jax.random.randint(rng, (images.shape[0],), 0, 4)
  branches = [functools.partial(jnp.rot90, k=k, axes=(0, 1)) for k in range(4)]
  return jax.vmap(lambda img, k: jax.lax.switch(k, branches, img))(images, turns)


def superpose(components: jax.Array, keeps: jax.Array, lambdas) -> jax.Array:
  """Eq. 3 (and Alg. 1's X_composite): I_mixed = sum_k lambda_k * (keep_k * I_k).

  components [B, n, H, W, C], keeps [B, n, H, W] (1 = visible) -> [B, H, W, C].
  """
  w = jnp.asarray(lambdas, components.dtype)[None, :, None, None, None]
  return jnp.sum(w * keeps[..., None].astype(components.dtype) * components, axis=1)


def token_mask(masks: jax.Array) -> jax.Array:
  """[B, n, h, w] -> [B, h, w]: the mask token replaces a patch only where every component is
  masked; a patch that any component shows carries that component's pixels in the blend."""
  return jnp.min(masks, axis=1)


# ----------------------------------------------------------------------------------------------
# Targets, Eq. 4-6 decompositions, Eq. 7 losses.


def local_stats(x: jax.Array, window: int = 47) -> tuple[jax.Array, jax.Array]:
  """SimMIM's `norm_targets` statistics: the local mean and sqrt(local unbiased var + 1e-6)
  over a window x window neighbourhood per channel (avg-pool, stride 1,
  count_include_pad=False). x [..., H, W, C] -> (mean, std), each of x's shape.

  The box sums are separable (rows, then columns), which is what keeps a 47 x 47 window cheap.
  """
  lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
  x4 = x.reshape((-1, h, w, c))
  pad = window // 2

  def box_sum(v):
    for dims in ((1, window, 1, 1), (1, 1, window, 1)):
      padding = tuple((pad, pad) if d == window else (0, 0) for d in dims)
      v = jax.lax.reduce_window(v, 0.0, jax.lax.add, dims, (1, 1, 1, 1), padding)
    return v

  count = box_sum(jnp.ones((1, h, w, 1), x.dtype))
  mean = box_sum(x4) / count
  var = (box_sum(x4 * x4) / count - mean ** 2) * (count / (count - 1))
  std = jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6)
  shape = lead + (h, w, c)
  return jnp.broadcast_to(mean, x4.shape).reshape(shape), std.reshape(shape)


def normalize_targets(x: jax.Array, window: int = 47) -> jax.Array:
  """SimMIM's `norm_targets`: (x - local mean) / local std (`local_stats`), x [..., H, W, C]."""
  mean, std = local_stats(x, window)
  return (x - mean) / std


def denormalize_targets(y: jax.Array, x: jax.Array, window: int = 47) -> jax.Array:
  """The inverse of `normalize_targets(x)` applied to a prediction `y` of it: y * std + mean
  with the local statistics of the original `x`, so a prediction is seen as an image (a
  perfect one as x itself)."""
  mean, std = local_stats(x, window)
  return y * std + mean


def subtract_decode(blend_pred: jax.Array, components: jax.Array, lambdas) -> jax.Array:
  """Eq. 5-6: component k's prediction from the predicted blend (Eq. 4's I_c_hat), knowing the
  other originals: (I_c_hat - sum_{j != k} lambda_j I_j) / lambda_k.

  blend_pred [B, H, W, C], components [B, n, H, W, C] -> [B, n, H, W, C]. Dividing by lambda_k
  puts every prediction in image space, so Eq. 7 compares it with I_k as printed.
  """
  w = jnp.asarray(lambdas, components.dtype)[None, :, None, None, None]
  weighted = w * components
  others = jnp.sum(weighted, axis=1, keepdims=True) - weighted
  return (blend_pred[:, None] - others) / w


def masked_error_sums(preds: jax.Array, targets: jax.Array, pixel_masks: jax.Array,
                      loss_type: str = "l1") -> jax.Array:
  """sum over (H, W, C) of err(pred, target) * mask; [..., H, W, C] with masks [..., H, W],
  broadcasting over the leading axes."""
  diff = preds - targets
  err = jnp.abs(diff) if loss_type == "l1" else diff * diff
  return jnp.sum(err * pixel_masks[..., None].astype(err.dtype), axis=(-3, -2, -1))


def masked_reconstruction_loss(error_sums: jax.Array, pixel_masks: jax.Array,
                               in_chans: int) -> jax.Array:
  """Eq. 7, per component: L_k = sum_{b,i,j,c} m_k err_k / (|M_k| + 1e-5) / C.

  error_sums [B, n] from `masked_error_sums`, pixel_masks [B, n, H, W] -> [n]; the objective is
  the sum over k. |M_k| counts component k's masked pixels over the batch and the division by
  C turns the per-pixel-channel sum into a per-pixel mean, exactly as microsoft/SimMIM.
  """
  counts = jnp.sum(pixel_masks.astype(error_sums.dtype), axis=(0, 2, 3))
  return jnp.sum(error_sums, axis=0) / (counts + COUNT_EPS) / in_chans


def best_assignment(pairwise_sums: jax.Array, pixel_masks: jax.Array) -> jax.Array:
  """Permutation-invariant assignment: per blended sample, the slot order that minimises the
  sample's share of Eq. 7.

  pairwise_sums [B, slots, n] (slot s's error against component k on M_k), pixel_masks
  [B, n, H, W] -> int32 [B, n], the slot assigned to each component. Eq. 7's denominators are
  batch totals, so minimising every sample's share minimises the batch loss exactly.
  """
  n = pairwise_sums.shape[-1]
  perms = np.array(list(itertools.permutations(range(n))), np.int32)  # [P, n]
  counts = jnp.sum(pixel_masks.astype(pairwise_sums.dtype), axis=(0, 2, 3)) + COUNT_EPS
  costs = jnp.sum(pairwise_sums[:, perms, np.arange(n)] / counts, axis=-1)  # [B, P]
  return jnp.asarray(perms)[jnp.argmin(jax.lax.stop_gradient(costs), axis=-1)]


# ----------------------------------------------------------------------------------------------
# The objective.


def build_objective(config: ml_collections.ConfigDict, model: MIMModel) -> Callable:
  """-> loss_fn(params, images, rng, train) -> (loss, aux); jit-able, no host round trip.

  images [n*B, H, W, C]: uint8 pixels (normalised here, on the device) or ImageNet-normalised
  floats. aux holds
    loss_components [n]  (Eq. 7's terms, in component order),
    loss_mix             (only when mix_loss_weight > 0),
    inputs [B, H, W, C]  (the blend fed to the encoder),
    token_mask [B, h, w], masks [B, n, h, w] (1 = masked, per component),
    targets, predictions [B, n, H, W, C] (component order; with norm_target in locally
    normalised space), assignment [B, n] (slot per component),
    images, reconstructions [B, n, H, W, C]: the originals and the predictions in image space
    (ImageNet-normalised; with norm_target the predictions are de-normalised with each
    original's own local statistics), what pictures show,
    metrics              (the scalars the trainer logs: loss_component_k, loss_mix).
  """
  check_objective_config(config)
  n = config.num_mix
  lambdas = mix_weights(config)
  permutation = uses_permutation(config)
  outputs = n if config.head == "split" else 1
  if model.decoder.num_outputs != outputs:
    raise ValueError(f"the model's decoder emits {model.decoder.num_outputs} images but "
                     f"head={config.head!r} with num_mix={n} needs {outputs}: build the model "
                     f"with build_model(config, encoder)")
  patch = model.encoder.patch_size
  in_chans = model.encoder.in_chans

  def loss_fn(params, images, rng, train):
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise ValueError(f"expected square NHWC images [n*B, S, S, C], got {images.shape}")
    images = data.normalize(images)
    mask_rng, rot_rng, dropout_rng = jax.random.split(rng, 3)
    if config.rotate and train:
      images = random_rot90(rot_rng, images)
    components = group_components(images, n)
    batch, img_size = components.shape[0], components.shape[2]

    masks = component_masks(mask_rng, config, batch, img_size, patch)
    pixel_masks = upsample_mask(masks, patch)
    blend = superpose(components, 1 - pixel_masks, lambdas)
    tokens = token_mask(masks)
    out = model.apply({"params": params}, blend, tokens, train=train,
                      rngs={"dropout": dropout_rng})

    targets = components
    if config.norm_target:
      targets = normalize_targets(components, config.norm_target_patch_size)
    if config.head == "subtract":
      blend_pred = out[:, 0]
      preds = subtract_decode(blend_pred, components, lambdas)
      assignment = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    else:
      if permutation:
        pairwise = masked_error_sums(out[:, :, None], targets[:, None], pixel_masks[:, None],
                                     config.loss_type)
        assignment = best_assignment(pairwise, pixel_masks)
      else:
        assignment = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
      preds = jnp.take_along_axis(out, assignment[:, :, None, None, None], axis=1)
      blend_pred = superpose(preds, jnp.ones(pixel_masks.shape, preds.dtype), lambdas)

    sums = masked_error_sums(preds, targets, pixel_masks, config.loss_type)
    per_component = masked_reconstruction_loss(sums, pixel_masks, in_chans)
    loss = jnp.sum(per_component)
    # Pictures only: unused by the train step, so XLA drops it there.
    recons = (denormalize_targets(preds, components, config.norm_target_patch_size)
              if config.norm_target else preds)
    aux = dict(loss_components=per_component, inputs=blend, token_mask=tokens, masks=masks,
               targets=targets, predictions=preds, assignment=assignment, images=components,
               reconstructions=recons)

    if config.mix_loss_weight > 0:
      # Loss3 of Fig. 2: the recomposed blend against the blend of the (unmasked) targets, on
      # the pixels that some component hides (elsewhere the input already shows the answer).
      blend_target = superpose(targets, jnp.ones(pixel_masks.shape, targets.dtype), lambdas)
      hidden = jnp.max(pixel_masks, axis=1)[:, None]
      mix_sums = masked_error_sums(blend_pred[:, None], blend_target[:, None], hidden,
                                   config.loss_type)
      aux["loss_mix"] = masked_reconstruction_loss(mix_sums, hidden, in_chans)[0]
      loss = loss + config.mix_loss_weight * aux["loss_mix"]
    # What the trainer logs beside the loss (step.make_train_step).
    aux["metrics"] = {f"loss_component_{k}": per_component[k] for k in range(n)}
    if "loss_mix" in aux:
      aux["metrics"]["loss_mix"] = aux["loss_mix"]
    return loss, aux

  return loss_fn
