"""Swin Transformer v1 in flax.linen, NHWC, numerically matching the PyTorch reference.

Read beside microsoft/Swin-Transformer's `models/swin_transformer.py`: the same modules in the
same order, and the same names (`patch_embed.proj`, `layers_{i}.blocks_{j}.attn.qkv`,
`layers_{i}.downsample.reduction`, ...), so that `eesmm_jax.convert` is a short renaming table.
The downsample sits at the END of stages 0..n-2 as in the official code (timm >= 0.9 puts it at
the start of the next stage; the converter moves it).

Numerics that must match the reference (tests/test_swin_parity.py compares against timm):
exact-erf GELU, LayerNorm eps 1e-5 with the centred variance, -100 in the shifted-window mask,
window partition order, PatchMerging concat order (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
x[1::2,1::2]), and no shift when the feature map is not larger than the window.

Two fields choose the backend-specific forms (`eesmm_jax.ops`), both 'xla' (portable) by
default: `impl` the Linear and LayerNorm forms, `attention_impl` the window attention's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eesmm_jax import ops

Dtype = Any

# The reference initialises Linear weights, the bias table and the mask token with
# trunc_normal(std=.02), truncated at +-2 (absolute), which for std .02 is +-100 sigma:
# effectively a plain normal. We use flax's truncated normal at +-2 sigma, the usual JAX choice.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)

# Rematerialisation of the blocks in the backward pass (`SwinTransformer.remat`): the
# jax.checkpoint policy of the scan over each stage's blocks (`BasicLayer._scan_blocks`).
# 'full' keeps only each block's input and recomputes the block. 'dots' also keeps the outputs of
# the matmuls against weights (qkv, proj, fc1, fc2: 9C numbers per token) and recomputes
# LayerNorm, GELU, softmax and the window-attention einsums; those einsums have batch dimensions,
# which is how this policy leaves them out (keeping their [windows, heads, N, N] logits too would
# cost more memory than the few FLOPs it saves; docs/performance.md).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# ----------------------------------------------------------------------------------------------
# Pure helpers (static shapes, computed in numpy at trace time).


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """[B, H, W, C] -> [B * nW, ws * ws, C]; windows batch-major, then row-major (the reference)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window_size * window_size, c)


def window_reverse(windows: jax.Array, window_size: int, h: int, w: int) -> jax.Array:
  """Inverse of `window_partition`: [B * nW, ws * ws, C] -> [B, H, W, C]."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=None)
def relative_position_index(window_size: int) -> np.ndarray:
  """[N, N] index into the ((2W-1)^2, heads) bias table, N = W*W (the reference's buffer)."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
  coords = coords.reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
  return (rel[..., 0] * (2 * window_size - 1) + rel[..., 1]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """[nW, N, N] additive mask: -100 between tokens that came from different regions after the
  cyclic shift, 0 otherwise (the reference's `attn_mask` buffer)."""
  img_mask = np.zeros((1, height, width, 1), np.float32)
  slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
  label = 0
  for hs in slices:
    for ws in slices:
      img_mask[:, hs, ws, :] = label
      label += 1
  b, c = 1, 1
  windows = img_mask.reshape(b, height // window_size, window_size, width // window_size,
                             window_size, c).transpose(0, 1, 3, 2, 4, 5)
  windows = windows.reshape(-1, window_size * window_size)
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def effective_window(resolution: int, window_size: int, shift_size: int) -> tuple[int, int]:
  """A map no larger than the window is one unshifted window (reference rule)."""
  if resolution <= window_size:
    return resolution, 0
  return window_size, shift_size


def drop_path(x: jax.Array, rate, deterministic: bool, rng: Optional[jax.Array]) -> jax.Array:
  """Stochastic depth per sample, scaled by 1/keep as timm's `drop_path`.

  `rate` is a Python float, or a traced float32 scalar inside the remat scan (one traced body
  serves blocks with different rates). keep = 1 - rate is formed in float32 either way, so the
  two paths draw the same mask and scale by the same number."""
  if deterministic or (not isinstance(rate, jax.Array) and rate == 0.0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU written as the reference defines it: 0.5 x (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` is the same function computed through erfc(-x / sqrt 2),
  which XLA:CPU lowers to a longer and slower expansion."""
  return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))  # Python floats: keeps x's dtype


def _split(rng: Optional[jax.Array], n: int) -> list:
  """n keys from `rng`, or n Nones (then each Dropout asks flax for its own 'dropout' rng)."""
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def _is_random(drop: float, attn_drop: float, *path_rates) -> bool:
  """Whether a block (or stage) with these rates draws anything in training; a traced rate
  counts as drawing."""
  return drop > 0 or attn_drop > 0 or any(isinstance(r, jax.Array) or r > 0 for r in path_rates)


# ----------------------------------------------------------------------------------------------
# Modules.


class Mlp(nn.Module):
  hidden_features: int
  drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rng: Optional[jax.Array] = None):
    dense = functools.partial(ops.layers(self.impl).dense, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=trunc_normal)
    out_features = x.shape[-1]
    rngs = _split(rng, 2)
    x = dense(self.hidden_features, name="fc1")(x)
    x = gelu(x)
    x = nn.Dropout(self.drop)(x, deterministic=deterministic, rng=rngs[0])
    x = dense(out_features, name="fc2")(x)
    return nn.Dropout(self.drop)(x, deterministic=deterministic, rng=rngs[1])


class WindowAttention(nn.Module):
  """Multi-head self attention inside windows, with the relative position bias.

  Input [B_, N, C] with B_ = batch * num_windows; `mask` is [nW, N, N] or None. The attention
  itself is `ops.window_attention`, in the form `attention_impl`.
  """
  dim: int
  window_size: int
  num_heads: int
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray] = None, deterministic: bool = True,
               rng: Optional[jax.Array] = None):
    b_, n, c = x.shape
    attn_rng, proj_rng = _split(rng, 2)
    head_dim = c // self.num_heads
    ws = self.window_size
    dense = functools.partial(ops.layers(self.impl).dense, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=trunc_normal)
    table = self.param("relative_position_bias_table", trunc_normal,
                       ((2 * ws - 1) * (2 * ws - 1), self.num_heads), self.param_dtype)
    qkv = dense(3 * c, use_bias=self.qkv_bias, name="qkv")(x)
    qkv = qkv.reshape(b_, n, 3, self.num_heads, head_dim)

    # One gather per block (not per window) of the [heads, N, N] bias, with a static index.
    # The bias and the -100 mask stay float32: in fp16 the logits plus mask must not overflow.
    bias = jnp.take(table.astype(jnp.float32), relative_position_index(ws).reshape(-1), axis=0)
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [heads, N, N]
    # Windows are batch-major, so window w of every image shares mask[w]: [nW, heads, N, N].
    bias = bias[None] if mask is None else bias[None] + jnp.asarray(mask)[:, None]

    if attn_rng is None and self.attn_drop > 0 and not deterministic:
      attn_rng = self.make_rng("dropout")
    x = ops.window_attention(qkv, bias, head_dim ** -0.5, impl=self.attention_impl,
                             dtype=self.dtype, dropout_rate=self.attn_drop,
                             deterministic=deterministic, rng=attn_rng)
    x = dense(c, name="proj")(x)
    return nn.Dropout(self.proj_drop)(x, deterministic=deterministic, rng=proj_rng)


class SwinTransformerBlock(nn.Module):
  """(Shifted) window attention + MLP, pre-norm, with residual drop path. Input [B, H, W, C].

  Randomness (training only): every draw of the block comes from `rng`, one key per block that
  `BasicLayer` derives from the block's index, so the block draws the same whether it runs as a
  bound submodule (remat 'none') or functionally inside the remat scan. Without `rng` the block
  asks flax for a 'dropout' rng itself.

  Inside the remat scan one traced body serves every block of a stage, so what differs between
  blocks comes as traced call arguments: `drop_path_rate` overrides the `drop_path` field, and
  `shifted` (a bool) says whether this block applies the `shift_size` shift and its mask (an
  unshifted block then adds a zero mask, which changes no bit of the logits).
  """
  dim: int
  num_heads: int
  window_size: int = 7
  shift_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rng: Optional[jax.Array] = None,
               drop_path_rate: Optional[jax.Array] = None, shifted: Optional[jax.Array] = None):
    b, h, w, c = x.shape
    ws, shift = effective_window(min(h, w), self.window_size, self.shift_size)
    norm = functools.partial(ops.layers(self.impl).layer_norm, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    rate = self.drop_path if drop_path_rate is None else drop_path_rate
    if rng is None and not deterministic and _is_random(self.drop, self.attn_drop, rate):
      rng = self.make_rng("dropout")
    attn_rng, path_rng1, mlp_rng, path_rng2 = _split(rng, 4)

    def roll(x, by):  # static shift: lowers to slices + concat
      rolled = jnp.roll(x, (by, by), axis=(1, 2))
      return rolled if shifted is None else jnp.where(shifted, rolled, x)

    shortcut = x
    x = norm(name="norm1")(x)
    if shift:
      x = roll(x, -shift)
    windows = window_partition(x, ws)
    mask = shifted_window_mask(h, w, ws, shift) if shift else None
    if mask is not None and shifted is not None:
      mask = jnp.where(shifted, mask, 0.0)
    windows = WindowAttention(c, ws, self.num_heads, self.qkv_bias, self.attn_drop, self.drop,
                              dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                              attention_impl=self.attention_impl, name="attn")(
                                  windows, mask, deterministic, attn_rng)
    x = window_reverse(windows, ws, h, w)
    if shift:
      x = roll(x, shift)
    x = shortcut + drop_path(x, rate, deterministic, path_rng1)

    y = norm(name="norm2")(x)
    y = Mlp(int(c * self.mlp_ratio), self.drop, dtype=self.dtype, param_dtype=self.param_dtype,
            impl=self.impl, name="mlp")(y, deterministic, mlp_rng)
    return x + drop_path(y, rate, deterministic, path_rng2)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat in the reference order -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    layers = ops.layers(self.impl)
    x0 = x[:, 0::2, 0::2]
    x1 = x[:, 1::2, 0::2]
    x2 = x[:, 0::2, 1::2]
    x3 = x[:, 1::2, 1::2]
    x = jnp.concatenate([x0, x1, x2, x3], axis=-1)
    x = layers.layer_norm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return layers.dense(2 * self.dim, use_bias=False, name="reduction", dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=trunc_normal)(x)


class BasicLayer(nn.Module):
  """One stage: `depth` blocks alternating W-MSA / SW-MSA, then the optional downsample."""
  dim: int
  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: Sequence[float] = ()
  downsample: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"
  attention_impl: str = "xla"
  remat: str = "none"  # a key of REMAT_POLICIES

  def _block(self, j: int, **overrides) -> SwinTransformerBlock:
    fields = dict(shift_size=0 if j % 2 == 0 else self.window_size // 2,
                  mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop=self.drop,
                  attn_drop=self.attn_drop, drop_path=self.drop_path[j], dtype=self.dtype,
                  param_dtype=self.param_dtype, impl=self.impl,
                  attention_impl=self.attention_impl)
    return SwinTransformerBlock(self.dim, self.num_heads, self.window_size,
                                **{**fields, **overrides})

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    # One 'dropout' key per stage and one per block folded in by the block's index, so the
    # plain loop and the remat scan draw the same masks (remat changes memory and time only).
    rng = None
    if not deterministic and _is_random(self.drop, self.attn_drop, *self.drop_path):
      rng = self.make_rng("dropout")
    # init always takes the plain loop: the params are created per block, `blocks_{j}`, with or
    # without remat (the converter, the layer-wise lr decay and checkpoints name them so).
    if self.remat != "none" and not self.is_initializing():
      x = self._scan_blocks(x, deterministic, rng)
    else:
      for j in range(self.depth):
        x = self._block(j, name=f"blocks_{j}")(
            x, deterministic, None if rng is None else jax.random.fold_in(rng, j))
    if self.downsample:
      x = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                       name="downsample")(x)
    return x

  def _scan_blocks(self, x, deterministic: bool, rng: Optional[jax.Array]):
    """The stage's blocks as one `lax.scan`, its body (one block) under `jax.checkpoint`.

    Why a scan: `jax.checkpoint` (or nn.remat) around each block of an unrolled stage saves
    nothing, as XLA schedules the recomputation early and keeps its results live; the scan's
    backward is a second loop, which can only recompute block by block. Why blocks rather than
    (W-MSA, SW-MSA) pairs: a pair's backward holds both blocks' activations, and a depth-2
    stage, the largest at 48x48 tokens in Swin-B, would save nothing. Blocks differ only in the
    shift (a traced flag here) and the drop-path rate (scanned), so one body serves them all.

    The params are stacked here from the per-block leaves: the tree stays `blocks_{j}` and
    gradients reach each leaf back through the stack. The price is a stacked copy of the params
    and one of their gradients in the step, so remat pays only from a few images per device on
    (docs/performance.md).
    """
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[params[f"blocks_{j}"] for j in range(self.depth)])
    # Scanned as data only when a rate is non-zero; otherwise the blocks keep their static 0
    # and draw nothing for drop path.
    rates = None
    if any(r > 0 for r in self.drop_path):
      rates = jnp.asarray(self.drop_path, jnp.float32)
    index = jnp.arange(self.depth, dtype=jnp.int32)
    # An unbound block applied functionally in the body: a bound flax submodule cannot live
    # inside a jax transform, and `blocks_{j}` would create or expect one scope per block.
    # Built with the shift; `shifted` turns it off for even blocks. Its drop_path field is 0:
    # the scanned rate replaces it where any rate is non-zero.
    template = self._block(0, shift_size=self.window_size // 2, drop_path=0.0, parent=None)

    def block(x, xs):
      block_params, rate, j = xs
      block_rng = None if rng is None else jax.random.fold_in(rng, j)
      return template.apply({"params": block_params}, x, deterministic, block_rng, rate,
                            j % 2 == 1), None

    # The scan already keeps the recomputation apart from the forward pass; CSE barriers would
    # only add temporaries.
    body = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, rates, index))
    return x


class PatchConv(nn.Module):
  """A convolution whose kernel is its stride (p x p, stride p, VALID), with `nn.Conv`'s
  parameters (kernel [p, p, C, out], lecun-normal; bias zeros), computed as one matmul of the
  flattened patches: the reference's patch embedding (p = patch size) and SimMIM's 1x1 head
  (p = 1). The same function on every backend; on XLA:CPU the convolution's weight gradient
  would run through transposes of the whole activation, the matmul's does not."""
  features: int
  patch: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, (b, h, w, c) = self.patch, x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    h, w = h // p, w // p  # VALID: a remainder smaller than the patch is dropped
    patches = x[:, :h * p, :w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (patches, kernel, bias))
    # Patch pixels in the kernel's (row, column, channel) order, one 2-D matmul over all tokens.
    y = x.reshape(b * h * w, p * p * c) @ kernel.reshape(-1, self.features)
    return y.reshape(b, h, w, self.features) + bias


class PatchEmbed(nn.Module):
  """Conv patch x patch, stride patch, then LayerNorm if `patch_norm` -> [B, H/p, W/p, C]."""
  patch_size: int
  embed_dim: int
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    x = PatchConv(self.embed_dim, self.patch_size, name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
    if self.patch_norm:
      x = ops.layers(self.impl).layer_norm(name="norm", dtype=self.dtype,
                                           param_dtype=self.param_dtype)(x)
    return x


def valid_image_sizes(patch_size: int, window_size: int, num_stages: int,
                      limit: int = 512) -> list[int]:
  """Image sizes up to `limit` that every stage's window tiles evenly."""
  return [s for s in range(patch_size, limit + 1) if not _size_problem(s, patch_size, window_size,
                                                                        num_stages)]


def _size_problem(img_size: int, patch_size: int, window_size: int, num_stages: int) -> str:
  if img_size % patch_size:
    return f"img_size {img_size} is not a multiple of patch_size {patch_size}"
  res = img_size // patch_size
  for i in range(num_stages):
    ws, _ = effective_window(res, window_size, 0)
    if res % ws:
      return (f"stage {i} has a {res}x{res} feature map, which window_size {window_size} "
              f"does not tile")
    if i < num_stages - 1:
      if res % 2:
        return f"stage {i} has an odd {res}x{res} feature map, which PatchMerging cannot halve"
      res //= 2
  return ""


class SwinTransformer(nn.Module):
  """Swin Transformer v1 (Liu et al., 2021), NHWC.

  `apply({'params': p}, x)` with x [B, H, W, in_chans] returns logits [B, num_classes], or
  pooled features [B, C] when num_classes == 0. Pass `train=True` (and a 'dropout' rng) for drop
  path and dropout. For masked image modeling build with `use_mask_token=True` and pass
  `mask` [B, H/patch, W/patch] (1 = masked): masked patch embeddings are replaced, after the
  patch norm, by the learned `mask_token` (as SimMIM's encoder). `return_features=True` returns
  the normed final feature map [B, H/32, W/32, C] instead of pooling.

  `remat` ('none' | 'full' | 'dots', REMAT_POLICIES) trades backward-pass memory for
  recomputation: each stage's blocks then run as a checkpointed scan over its blocks. The
  params are the same tree either way, and so are the dropout and drop-path draws.

  `impl` (ops.IMPLS) and `attention_impl` (ops.ATTENTION_IMPLS) pick the backend-specific forms
  of the Linear / LayerNorm layers and of the window attention; the params and the function
  are the same for every choice.
  """
  img_size: int = 224
  patch_size: int = 4
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  ape: bool = False
  patch_norm: bool = True
  use_mask_token: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"
  attention_impl: str = "xla"
  remat: str = "none"

  @property
  def num_features(self) -> int:
    return int(self.embed_dim * 2 ** (len(self.depths) - 1))

  def __post_init__(self):
    problem = _size_problem(self.img_size, self.patch_size, self.window_size, len(self.depths))
    if problem:
      sizes = valid_image_sizes(self.patch_size, self.window_size, len(self.depths))
      raise ValueError(f"{problem}. With patch_size {self.patch_size}, window_size "
                       f"{self.window_size} and {len(self.depths)} stages, img_size must be one "
                       f"of {sizes[:12]}{' ...' if len(sizes) > 12 else ''}")
    if len(self.num_heads) != len(self.depths):
      raise ValueError(f"num_heads {tuple(self.num_heads)} needs one entry per stage "
                       f"(depths {tuple(self.depths)})")
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2 ** i) % heads:
        raise ValueError(f"stage {i} has width {self.embed_dim * 2 ** i} (embed_dim "
                         f"{self.embed_dim} x 2^{i}), which num_heads[{i}] = {heads} does not "
                         f"divide")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is unknown (config.model.remat in a run config); "
                       f"choose one of {list(REMAT_POLICIES)}")
    ops.check_impl(self.impl)
    ops.check_attention_impl(self.attention_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, return_features: bool = False):
    deterministic = not train
    layers = ops.layers(self.impl)
    if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, self.in_chans):
      raise ValueError(f"expected images [B, {self.img_size}, {self.img_size}, {self.in_chans}] "
                       f"(NHWC), got shape {tuple(x.shape)}")
    x = PatchEmbed(self.patch_size, self.embed_dim, self.patch_norm, dtype=self.dtype,
                   param_dtype=self.param_dtype, impl=self.impl, name="patch_embed")(x)
    b, h, w, c = x.shape

    if self.use_mask_token:
      mask_token = self.param("mask_token", trunc_normal, (1, 1, c), self.param_dtype)
      if mask is not None:
        if mask.shape != (b, h, w):
          raise ValueError(f"mask must be [B, H/patch, W/patch] = {(b, h, w)}, got "
                           f"{tuple(mask.shape)}")
        m = mask[..., None].astype(x.dtype)
        x = x * (1.0 - m) + mask_token.astype(x.dtype) * m
    elif mask is not None:
      raise ValueError("a token mask was given but the model has no mask token: build it with "
                       "use_mask_token=True")

    if self.ape:
      pos = self.param("absolute_pos_embed", trunc_normal, (1, h * w, c), self.param_dtype)
      x = x + pos.reshape(1, h, w, c).astype(x.dtype)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)

    dpr = np.linspace(0, self.drop_path_rate, sum(self.depths)).tolist()
    ends = np.cumsum((0,) + tuple(self.depths)).tolist()
    for i, depth in enumerate(self.depths):
      x = BasicLayer(
          int(self.embed_dim * 2 ** i), depth, self.num_heads[i], self.window_size,
          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop=self.drop_rate,
          attn_drop=self.attn_drop_rate, drop_path=dpr[ends[i]:ends[i + 1]],
          downsample=i < len(self.depths) - 1, dtype=self.dtype, param_dtype=self.param_dtype,
          impl=self.impl, attention_impl=self.attention_impl, remat=self.remat,
          name=f"layers_{i}")(x, deterministic)
    x = layers.layer_norm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if return_features:
      return x
    x = x.mean(axis=(1, 2))
    if self.num_classes == 0:
      return x
    return layers.dense(self.num_classes, name="head", dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=trunc_normal)(x)


VARIANTS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def create_model(name: str, **kwargs) -> SwinTransformer:
  """`create_model('swin_base', img_size=192, window_size=6, num_classes=0)`."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}")
  return SwinTransformer(**{**VARIANTS[name], **kwargs})
