"""The layers' forms for XLA:CPU (`impl='xla_cpu'`, `attention_impl='xla_cpu'`).

The same functions as flax's nn.Dense, nn.LayerNorm (centred variance, eps 1e-5) and the window
attention einsums, written so that XLA:CPU runs them fast: every sum over tokens or channels is
a matmul, the tokens are merged into one matmul axis, and the LayerNorm and the attention take
their own backward passes with each product in the batched-dot form XLA:CPU runs best. Values
and gradients equal the portable forms' (tests/test_swin.py); the measurements behind each
choice are in docs/performance.md (`python -m eesmm_jax.tools.kernel_bench kernels` reproduces them).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` of tokens [..., C] with a weight [C, out], as one 2-D matmul.

  Merging the leading axes first makes the weight's gradient a matmul with one contracting
  axis, which XLA folds into the dot as a transposed operand; contracting over every leading
  axis instead, XLA:CPU first copies the gradient or the activations into a transposed layout.
  Same values; other dot_generals pass through.
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
  """y [..., C] summed over every axis but the last, in float32, as ones @ y: the gradient of a
  bias or a LayerNorm scale (XLA:CPU's reduction over the tokens is slow where the gradient
  arrives in another layout)."""
  y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
  return jnp.dot(jnp.ones(y.shape[0], jnp.float32), y, precision=jax.lax.Precision.HIGHEST)


def mean_over_channels(x: jax.Array) -> jax.Array:
  """x [..., C] -> its mean over C, [..., 1], as x @ (1/C): LayerNorm's statistics."""
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


class CpuDense(nn.Dense):
  """nn.Dense (its fields, parameters `kernel` and `bias`, inits and dtypes) with the tokens
  merged into one matmul axis (`token_dot_general`) and the bias gradient as a matmul
  (`add_bias`)."""
  dot_general: Any = token_dot_general

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self.use_bias:
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
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, float32 in and out.

  Every sum is a matmul: the per-token means as x @ (1/C) (`mean_over_channels`), the scale and
  bias gradients as ones @ y (`sum_over_tokens`); autodiff of flax's LayerNorm fuses its sums
  into reductions that XLA:CPU runs slowly. The variance is the centred one, as PyTorch's."""
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


class CpuLayerNorm(nn.Module):
  """nn.LayerNorm(epsilon=1e-5, use_fast_variance=False) (parameters `scale` and `bias`,
  statistics in float32, output in `dtype`) computed by `layer_norm_cpu`."""
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return layer_norm_cpu(f32(x), f32(scale), f32(bias), self.epsilon).astype(dtype)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., M, K] @ b [..., K, N]: the batched dot's form that XLA:CPU runs fastest."""
  return jnp.einsum("...mk,...kn->...mn", a, b)


def _transposed(x: jax.Array) -> jax.Array:
  """x with its last two axes swapped in memory. The barrier keeps XLA from folding the
  transpose back into the dot that reads it as a transposed operand, the slow form."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def window_attention_cpu(qkv: jax.Array, bias: jax.Array, scale: float) -> jax.Array:
  """softmax(scale q k^T + bias) v in every window and head, without attention dropout.

  qkv: the qkv projection [B_, N, 3, heads, d], B_ = images x nW with windows batch-major; bias:
  float32 [nW, heads, N, N] (nW = 1: one bias for every window). Returns [B_, N, heads x d]; the
  logits and softmax are float32. Autodiff of the einsums gives the same gradients, but through
  batched dots with a transposed operand or output, which XLA:CPU runs slower than [batch, M, K]
  @ [batch, K, N]. This backward writes every product in that form, with the transposes as
  copies, returns the gradient of qkv as one array (cheaper than the three slices' gradients
  padded and added, as autodiff of a slice gives them), and sums the bias gradient over the
  images as a matmul."""
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
