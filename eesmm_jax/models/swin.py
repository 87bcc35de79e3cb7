"""Swin Transformer v1 in flax.linen, NHWC, numerically matching the PyTorch reference.

Module and parameter names mirror microsoft/Swin-Transformer's `models/swin_transformer.py`
(`patch_embed.proj`, `layers_{i}.blocks_{j}.attn.qkv`, `layers_{i}.downsample.reduction`, ...),
so that `eesmm_jax.convert` is a short renaming table. The downsample sits at the END of stages
0..n-2 as in the official code (timm >= 0.9 puts it at the start of the next stage; the converter
moves it).

Numerics that must match the reference (microsoft/Swin-Transformer `models/swin_transformer.py`
and timm's `swin_transformer.py`, which tests/test_swin_parity.py compares against): exact-erf GELU,
LayerNorm eps 1e-5, -100 in the shifted-window mask, window partition order, PatchMerging concat
order (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]), and no shift when the feature map
is not larger than the window.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's LayerNorm default; flax's is 1e-6.
LN_EPS = 1e-5
# The reference initialises Linear weights, the bias table and the mask token with
# trunc_normal(std=.02), truncated at +-2 (absolute), which for std .02 is +-100 sigma:
# effectively a plain normal. We use flax's truncated normal at +-2 sigma, the usual JAX choice.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` of tokens [..., C] with a weight [C, out], as one 2-D matmul.

  The leading axes are merged first, so the weight's gradient is a matmul with one contracting
  axis, which XLA folds into the dot as a transposed operand. Contracting over every leading axis
  instead (flax's own dot on [B, H, W, C]), XLA:CPU first copies the gradient or the
  activations into a transposed layout, fused with the window partition around it, at a few
  hundred MB/s: a swin_mini SimMIM step at 192/6 spent 250 ms of its 1.8 s in such copies
  (`python -m eesmm_jax.kernel_bench profile`). Same values; other dot_generals pass through.
  """
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if lhs.ndim > 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and not lhs_batch:
    out = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs,
                              (((1,), tuple(rhs_contract)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(lhs.shape[:-1] + out.shape[1:])
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def sum_over_tokens(y: jax.Array) -> jax.Array:
  """y [..., C] summed over every axis but the last, in float32, as ones @ y.

  The gradient of a bias or of a LayerNorm scale. XLA:CPU reduces over the tokens slowly where
  the gradient arrives in another layout: each stage-1 qkv bias gradient of the swin_mini SimMIM
  step at 224/7 ([768 windows, 49, 3, 2, 32]) took 32 ms, through a reduce-window padded to 64
  tokens; with the Linear bias gradients as this matmul the step ran 1.01-1.06x faster in three
  runs (docs/timing.md)."""
  y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
  return jnp.dot(jnp.ones(y.shape[0], jnp.float32), y, precision=jax.lax.Precision.HIGHEST)


def mean_over_channels(x: jax.Array) -> jax.Array:
  """x [..., C] -> its mean over C, [..., 1], as x @ (1/C): LayerNorm's statistics (with XLA's
  reductions instead, `layer_norm_cpu` took 13.6-15.1 ms forward + backward of [12, 56, 56, 64],
  with these matmuls 8.8)."""
  c = x.shape[-1]
  mean = jnp.dot(x.reshape(-1, c), jnp.full((c, 1), 1.0 / c, x.dtype),
                 precision=jax.lax.Precision.HIGHEST)
  return mean.reshape(x.shape[:-1] + (1,))


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias (one dtype), whose bias gradient is `sum_over_tokens` (a matmul)."""
  return y + bias


add_bias.defvjp(lambda y, bias: (y + bias, None),
                lambda _, g: (g, sum_over_tokens(g).astype(g.dtype)))


class Dense(nn.Dense):
  """flax's nn.Dense (its parameters, init and dtypes) for every Linear of the models, with the
  tokens merged into one matmul axis (`token_dot_general`, the default `dot_general`) and, on a
  CPU, the bias gradient as a matmul (`add_bias`). Other backends take nn.Dense's own bias add."""
  dot_general: Any = token_dot_general

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self.use_bias or jax.default_backend() != "cpu":
      return super().__call__(inputs)
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision)
    return add_bias(y, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, float32 in and out, for
  XLA:CPU.

  Every sum is a matmul: the per-token means as x @ (1/C) (`mean_over_channels`), the scale and
  bias gradients as ones @ y (`sum_over_tokens`). Autodiff of flax's LayerNorm fuses its sums
  into reductions that XLA:CPU runs 2-3x slower than PyTorch's LayerNorm (forward + backward of
  [12, 56, 56, 64]: 11.3 ms, this form 8.8, PyTorch 4.5; scratch timing, issue 13). The variance
  is the centred one, as the reference computes it (flax's default is E[x^2] - E[x]^2)."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  centred = x - mean_over_channels(x)
  rstd = jax.lax.rsqrt(mean_over_channels(centred * centred) + eps)
  normed = centred * rstd
  return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):
  normed, rstd, scale = residuals
  gs = g * scale
  # The gradient of (x - mean) * rstd applied to gs:
  # rstd (gs - mean(gs) - normed mean(gs normed)).
  dx = rstd * (gs - mean_over_channels(gs) - normed * mean_over_channels(gs * normed))
  return dx, sum_over_tokens(g * normed), sum_over_tokens(g)


layer_norm_cpu.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """PyTorch's LayerNorm (eps 1e-5) with flax's parameters (scale, bias) and dtypes: on a CPU
  `layer_norm_cpu` (statistics in float32, as flax's), elsewhere flax's nn.LayerNorm."""
  epsilon: float = LN_EPS
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    if jax.default_backend() != "cpu":
      return nn.LayerNorm(self.epsilon, self.dtype, self.param_dtype).apply(
          {"params": {"scale": scale, "bias": bias}}, x)
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return layer_norm_cpu(f32(x), f32(scale), f32(bias), self.epsilon).astype(dtype)


# Rematerialisation of the blocks in the backward pass (`SwinTransformer.remat`): the
# jax.checkpoint policy of the scan over each stage's blocks (`BasicLayer._scan_blocks`).
# 'full' keeps only each block's input and recomputes the block. 'dots' also keeps the outputs of
# the matmuls against weights (qkv, proj, fc1, fc2: 9C numbers per token) and recomputes
# LayerNorm, GELU, softmax and the window-attention einsums. Those einsums have batch dimensions,
# which is how this policy leaves them out; keeping them too (checkpoint_dots) adds their
# [windows, heads, N, N] logits and outputs, about a quarter more per block at Swin-B's shapes,
# to skip N/(6C) of the block's FLOPs (1-5%): 2,034 against 1,900 MiB of temporaries in a
# Swin-B 192/6 train step at batch 8 (none 2,342, full 1,360).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# WindowAttention's forms (its field `attention_impl`).
ATTENTION_IMPLS = (None, "xla", "cudnn")

# ----------------------------------------------------------------------------------------------
# Pure helpers (static shapes, computed in numpy at trace time).


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """[B, H, W, C] -> [B * nW, ws * ws, C]; windows batch-major, then row-major (as the reference)."""
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


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU written as the reference defines it: 0.5 x (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` is the same function computed through erfc(-x / sqrt 2), which
  XLA:CPU lowers to a longer expansion: 9.6 against 5.7 ms per call and about 10% more
  temporaries in a swin_mini step (issue 13)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))  # Python floats: keeps x's dtype


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


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., M, K] @ b [..., K, N]: the batched dot's form that XLA:CPU runs fastest."""
  return jnp.einsum("...mk,...kn->...mn", a, b)


def _transposed(x: jax.Array) -> jax.Array:
  """x with its last two axes swapped in memory. The barrier keeps XLA from folding the
  transpose back into the dot that reads it as a transposed operand, the slow form."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def window_attention_cpu(qkv: jax.Array, bias: jax.Array, scale: float) -> jax.Array:
  """softmax(scale q k^T + bias) v in every window and head, for XLA:CPU.

  qkv: the qkv projection [B_, N, 3, heads, d], B_ = images x nW with windows batch-major; bias:
  float32 [nW, heads, N, N] (nW = 1: one bias for every window). Returns [B_, N, heads x d]; the
  logits and softmax are float32. Autodiff of the einsums in `WindowAttention` gives the same
  gradients (tests/test_swin.py), but through batched dots with a transposed operand or output,
  which XLA:CPU runs 1.5-2x slower than [batch, M, K] @ [batch, K, N] at these shapes (36 or 49
  tokens, d = 32). This backward writes every product in that form, with the transposes as
  copies, returns the gradient of qkv as one array (the three slices' gradients padded and
  added, as autodiff of a slice gives them, cost more than the saving), and sums the bias
  gradient over the images as a matmul (XLA:CPU's reduction over a short leading axis took 7 ms
  for [12, 38416], 0.1 ms as a dot)."""
  return _window_attention_fwd(qkv, bias, scale)[0]


def _window_attention_fwd(qkv, bias, scale):
  b, n, _, h, d = qkv.shape
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B_, heads, N, d]
  q = q * jnp.asarray(scale, q.dtype)
  logits = _matmul(q, _transposed(k)).astype(jnp.float32)
  probs = jax.nn.softmax(logits.reshape(b // bias.shape[0], *bias.shape) + bias, axis=-1)
  probs = probs.reshape(b, h, n, n)
  out = _matmul(probs.astype(q.dtype), v).transpose(0, 2, 1, 3).reshape(b, n, h * d)
  return out, (q, k, v, probs, bias)


def _window_attention_bwd(scale, residuals, d_out):
  q, k, v, probs, bias = residuals
  b, h, n, d = q.shape
  d_out = d_out.reshape(b, n, h, d).transpose(0, 2, 1, 3)
  d_probs = _matmul(d_out, _transposed(v)).astype(jnp.float32)
  d_v = _matmul(_transposed(probs.astype(q.dtype)), d_out)
  # softmax's backward: p * (g - sum(g * p)) along the row.
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  d_bias = sum_over_tokens(d_logits.reshape(-1, bias.size)).reshape(bias.shape)  # over images
  d_logits = d_logits.astype(q.dtype)
  d_q = _matmul(d_logits, k) * jnp.asarray(scale, q.dtype)
  d_k = _matmul(_transposed(d_logits), q)
  d_qkv = jnp.stack([d_q, d_k, d_v], axis=0).transpose(1, 3, 0, 2, 4)  # [B_, N, 3, heads, d]
  return d_qkv, d_bias


window_attention_cpu.defvjp(_window_attention_fwd, _window_attention_bwd)


def _split(rng: Optional[jax.Array], n: int) -> list:
  """n keys from `rng`, or n Nones (then each Dropout asks flax for its own 'dropout' rng)."""
  return [None] * n if rng is None else list(jax.random.split(rng, n))


# ----------------------------------------------------------------------------------------------
# Modules.


class PatchConv(nn.Module):
  """A convolution whose kernel is its stride (p x p, stride p, VALID), with `nn.Conv`'s
  parameters (kernel [p, p, C, out], lecun-normal; bias zeros), computed as one matmul of the
  flattened patches: the reference's patch embedding (p = patch size) and SimMIM's 1x1 head
  (p = 1). On XLA:CPU the convolution's weight gradient runs through transposes of the whole
  activation; the matmul's does not (`python -m eesmm_jax.kernel_bench kernels`, forward +
  backward at swin_mini 192/6: the patch embedding 11.4 against 44.5 ms as a convolution, the
  SimMIM head 37.5 against 72.9; PyTorch's 25.4 and 56.7)."""
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
    # Patch pixels in the kernel's (row, column, channel) order, one matmul over all tokens.
    return token_dot_general(x.reshape(b, h, w, p * p * c), kernel.reshape(-1, self.features),
                             (((3,), (0,)), ((), ()))) + bias


class PatchEmbed(nn.Module):
  """Conv patch x patch, stride patch, then LayerNorm if `patch_norm` -> [B, H/p, W/p, C]."""
  patch_size: int
  embed_dim: int
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = PatchConv(self.embed_dim, p, name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
    if self.patch_norm:
      x = LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x


class Mlp(nn.Module):
  hidden_features: int
  drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rng: Optional[jax.Array] = None):
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=trunc_normal)
    out_features = x.shape[-1]
    rngs = _split(rng, 2)
    x = dense(self.hidden_features, name="fc1")(x)
    x = gelu(x)  # the reference uses exact erf GELU
    x = nn.Dropout(self.drop)(x, deterministic=deterministic, rng=rngs[0])
    x = dense(out_features, name="fc2")(x)
    return nn.Dropout(self.drop)(x, deterministic=deterministic, rng=rngs[1])


class WindowAttention(nn.Module):
  """Multi-head self attention inside windows, with the relative position bias.

  Input [B_, N, C] with B_ = batch * num_windows; `mask` is [nW, N, N] or None.
  """
  dim: int
  window_size: int
  num_heads: int
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # None: `window_attention_cpu` on a CPU (without attention dropout), else as 'xla'; 'xla': XLA
  # einsums, autodiff (any dtype, attention dropout); 'cudnn': cuDNN's fused kernel through
  # jax.nn.dot_product_attention where it applies (GPU, 16-bit, even window area).
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray] = None, deterministic: bool = True,
               rng: Optional[jax.Array] = None):
    b_, n, c = x.shape
    rngs = _split(rng, 2)
    head_dim = c // self.num_heads
    ws = self.window_size
    table = self.param("relative_position_bias_table", trunc_normal,
                       ((2 * ws - 1) * (2 * ws - 1), self.num_heads), self.param_dtype)
    qkv = Dense(3 * c, use_bias=self.qkv_bias, name="qkv", dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=trunc_normal)(x)
    # [B_, N, heads, head_dim]: the einsum and cuDNN paths read q, k, v without a transpose.
    qkv = qkv.reshape(b_, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = head_dim ** -0.5

    # One gather per block (not per window) of the [heads, N, N] bias, with a static index.
    # The bias and the -100 mask stay float32: in fp16 the logits plus mask must not overflow.
    bias = jnp.take(table.astype(jnp.float32), relative_position_index(ws).reshape(-1), axis=0)
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [heads, N, N]
    # Windows are batch-major, so window w of every image shares mask[w]: [nW, heads, N, N].
    bias = bias[None] if mask is None else bias[None] + jnp.asarray(mask)[:, None]
    nw = bias.shape[0]

    dropout = self.attn_drop > 0 and not deterministic
    if self.attention_impl is None and jax.default_backend() == "cpu" and not dropout:
      x = window_attention_cpu(qkv, bias, scale)
    elif self.attention_impl == "cudnn" and n % 2 == 0 and self.dtype != jnp.float32 \
        and not dropout:
      # cuDNN's fused kernel (Ampere+) takes a bias only for even N and 16-bit inputs
      # (windows 6 and 12, not 7); it accumulates in float32 internally.
      full = jnp.broadcast_to(bias, (b_ // nw,) + bias.shape).reshape(b_, self.num_heads, n, n)
      x = jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=scale,
                                       implementation="cudnn")
    else:
      # Logits accumulate into float32 so fp16 cannot overflow before the bias and mask are
      # added; XLA:CPU has no f16 x f16 -> f32 dot, so there the product is cast afterwards.
      acc = None if jax.default_backend() == "cpu" else jnp.float32
      attn = jnp.einsum("bnhd,bmhd->bhnm", q * scale, k,
                        preferred_element_type=acc).astype(jnp.float32)
      attn = attn.reshape(b_ // nw, nw, self.num_heads, n, n) + bias
      attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype).reshape(b_, self.num_heads, n, n)
      attn = nn.Dropout(self.attn_drop)(attn, deterministic=deterministic, rng=rngs[0])
      x = jnp.einsum("bhnm,bmhd->bnhd", attn, v)
    x = Dense(c, name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=trunc_normal)(x.reshape(b_, n, c))
    return nn.Dropout(self.proj_drop)(x, deterministic=deterministic, rng=rngs[1])


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
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True, rng: Optional[jax.Array] = None,
               drop_path_rate: Optional[jax.Array] = None, shifted: Optional[jax.Array] = None):
    b, h, w, c = x.shape
    ws, shift = effective_window(min(h, w), self.window_size, self.shift_size)
    norm = functools.partial(LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
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
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl, name="attn")(
                                  windows, mask, deterministic, attn_rng)
    x = window_reverse(windows, ws, h, w)
    if shift:
      x = roll(x, shift)
    x = shortcut + drop_path(x, rate, deterministic, path_rng1)

    y = norm(name="norm2")(x)
    y = Mlp(int(c * self.mlp_ratio), self.drop, dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(y, deterministic, mlp_rng)
    return x + drop_path(y, rate, deterministic, path_rng2)


def _is_random(drop: float, attn_drop: float, *path_rates) -> bool:
  """Whether a block (or stage) with these rates draws anything in training; a traced rate
  counts as drawing."""
  return drop > 0 or attn_drop > 0 or any(isinstance(r, jax.Array) or r > 0 for r in path_rates)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat in the reference order -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x0 = x[:, 0::2, 0::2]
    x1 = x[:, 1::2, 0::2]
    x2 = x[:, 0::2, 1::2]
    x3 = x[:, 1::2, 1::2]
    x = jnp.concatenate([x0, x1, x2, x3], axis=-1)
    x = LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return Dense(2 * self.dim, use_bias=False, name="reduction", dtype=self.dtype,
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
  attention_impl: Optional[str] = None
  remat: str = "none"  # a key of REMAT_POLICIES

  def _block(self, j: int, **overrides) -> SwinTransformerBlock:
    fields = dict(shift_size=0 if j % 2 == 0 else self.window_size // 2,
                  mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop=self.drop,
                  attn_drop=self.attn_drop, drop_path=self.drop_path[j], dtype=self.dtype,
                  param_dtype=self.param_dtype, attention_impl=self.attention_impl)
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
      x = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsample")(x)
    return x

  def _scan_blocks(self, x, deterministic: bool, rng: Optional[jax.Array]):
    """The stage's blocks as one `lax.scan`, its body (one block) under `jax.checkpoint`.

    Why a scan: `jax.checkpoint` (or nn.remat) around each block of an unrolled stage saves
    nothing, as XLA schedules the recomputation early and keeps its results live (2,509 against
    2,230 MiB of temporaries for Swin-B 192/6, batch 8, issue 13); the scan's backward is a
    second loop, which can only recompute block by block. Why blocks rather than (W-MSA,
    SW-MSA) pairs: a pair's backward holds both blocks' activations, and a depth-2 stage, the
    largest at 48x48 tokens in Swin-B, would save nothing. Blocks differ only in the shift
    (a traced flag here) and the drop-path rate (scanned), so one body serves them all.

    The params are stacked here from the per-block leaves: the tree stays `blocks_{j}` and
    gradients reach each leaf back through the stack. The price is a stacked copy of the params
    and one of their gradients in the step, about 2 x 320 MiB for Swin-B in float32: remat
    pays from about 4 images per device on (Swin-B 192/6, value_and_grad: 378 against 667 MiB
    of temporaries at 2 images, 1,946 against 847 at 8).
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

    # The scan already keeps the recomputation apart from the forward pass; CSE barriers only
    # cost (a depth-1 stage: 51.1 against 46.6 MiB of temporaries with them, same at depth 2-4).
    body = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, rates, index))
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
  # 'cudnn': cuDNN's fused attention where it applies (Ampere+, 16-bit, even window area).
  attention_impl: Optional[str] = None
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
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is unknown; choose one of "
                       f"{list(ATTENTION_IMPLS)}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, return_features: bool = False):
    deterministic = not train
    if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, self.in_chans):
      raise ValueError(f"expected images [B, {self.img_size}, {self.img_size}, {self.in_chans}] "
                       f"(NHWC), got shape {tuple(x.shape)}")
    x = PatchEmbed(self.patch_size, self.embed_dim, self.patch_norm, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="patch_embed")(x)
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
    for i, depth in enumerate(self.depths):
      x = BasicLayer(
          int(self.embed_dim * 2 ** i), depth, self.num_heads[i], self.window_size,
          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop=self.drop_rate,
          attn_drop=self.attn_drop_rate, drop_path=dpr[sum(self.depths[:i]):sum(self.depths[:i + 1])],
          downsample=i < len(self.depths) - 1, dtype=self.dtype, param_dtype=self.param_dtype,
          attention_impl=self.attention_impl, remat=self.remat, name=f"layers_{i}")(
              x, deterministic)
    x = LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if return_features:
      return x
    x = x.mean(axis=(1, 2))
    if self.num_classes == 0:
      return x
    return Dense(self.num_classes, name="head", dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=trunc_normal)(x)


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
