"""The model's backend-specific forms, chosen by two explicit model fields.

`impl` picks the Linear and LayerNorm forms (`layers`):
  'xla'      flax's nn.Dense and nn.LayerNorm(epsilon=1e-5, use_fast_variance=False): the
             portable path, autodiff everywhere.
  'xla_cpu'  `xla_cpu.CpuDense` / `xla_cpu.CpuLayerNorm`: the same parameters, values and
             gradients, with every sum a matmul and their own backward (fast on XLA:CPU).

`attention_impl` picks the window attention's form (`window_attention`):
  'xla'      einsums, autodiff, attention dropout; logits bf16 in bf16 runs (`logits_dtype`),
             else float32, the softmax computed in float32.
  'xla_cpu'  `xla_cpu.window_attention_cpu`, its own backward.
  'cudnn'    cuDNN's fused kernel (jax.nn.dot_product_attention, implementation='cudnn'): GPU
             only (Ampere+), so the CPU suite never runs it; the GPU probe (the benchmark's
             `--attention cudnn` cell on a device) exercises it.
  'pallas'   the fused Pallas kernel of `ops/pallas_attention.py`, compiled for the device.
  'pallas_interpret'  that kernel run by the Pallas interpreter: any backend, slow (tests).
Where a form does not apply (attention dropout in training; cuDNN without an even window area
and 16-bit inputs) the call takes 'xla' instead.

A run config says 'auto' for both (config.model.impl, config.model.attention_impl), resolved
once for the mesh the step runs on (`for_platform`, called by `step.create_encoder`).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from eesmm_jax.ops import xla_cpu

IMPLS = ("xla", "xla_cpu")
ATTENTION_IMPLS = ("xla", "xla_cpu", "cudnn", "pallas", "pallas_interpret")

# Whether the Pallas kernel is part of this checkout (found without importing it).
HAS_PALLAS = importlib.util.find_spec(f"{__name__}.pallas_attention") is not None

# The forms that run on a CPU, which the parity tests go through (cuDNN and compiled Pallas
# need a GPU).
CPU_IMPLS = ("xla", "xla_cpu")
CPU_ATTENTION_IMPLS = ("xla", "xla_cpu") + (("pallas_interpret",) if HAS_PALLAS else ())

# PyTorch's LayerNorm eps (flax's default is 1e-6).
LN_EPS = 1e-5


def check_impl(value: Any, key: str = "impl", allow_auto: bool = False) -> str:
  """`value` if it names a Linear / LayerNorm form (or is 'auto', where allowed: a config's
  value), else a one-line ValueError naming `key` and the choices."""
  choices = ("auto",) * allow_auto + IMPLS
  if value not in choices:
    raise ValueError(f"{key}={value!r} is unknown; choose one of {list(choices)}")
  return value


def check_attention_impl(value: Any, key: str = "attention_impl", allow_auto: bool = False) -> str:
  """`value` if it names a window-attention form that this checkout has (or is 'auto', where
  allowed), else a one-line ValueError naming `key` and the choices."""
  choices = ("auto",) * allow_auto + ATTENTION_IMPLS
  if value not in choices:
    raise ValueError(f"{key}={value!r} is unknown; choose one of {list(choices)}")
  if value.startswith("pallas") and not HAS_PALLAS:
    others = [v for v in choices if not v.startswith("pallas")]
    raise ValueError(f"{key}={value!r} needs eesmm_jax/ops/pallas_attention.py, which this "
                     f"checkout lacks; choose one of {others}")
  return value


def for_platform(platform: str) -> str:
  """What 'auto' means for both fields on devices of `platform` (a jax Device's `.platform`):
  the XLA:CPU forms on 'cpu', the portable XLA forms anywhere else."""
  return "xla_cpu" if platform == "cpu" else "xla"


class Layers(NamedTuple):
  """The Linear and LayerNorm classes of one `impl`: `dense(features, name=..., dtype=...,
  param_dtype=..., kernel_init=...)` takes nn.Dense's fields, `layer_norm(name=..., dtype=...,
  param_dtype=...)` is PyTorch's LayerNorm (eps 1e-5, centred variance)."""
  dense: Callable[..., nn.Module]
  layer_norm: Callable[..., nn.Module]


@functools.lru_cache(maxsize=None)
def layers(impl: str) -> Layers:
  """The Linear and LayerNorm forms of `impl` (IMPLS)."""
  check_impl(impl)
  if impl == "xla_cpu":
    return Layers(xla_cpu.CpuDense, xla_cpu.CpuLayerNorm)
  return Layers(nn.Dense, functools.partial(nn.LayerNorm, epsilon=LN_EPS,
                                            use_fast_variance=False))


def window_attention(qkv: jax.Array, bias: jax.Array, scale: float, *, impl: str,
                     dtype: Any, dropout_rate: float = 0.0, deterministic: bool = True,
                     rng: Optional[jax.Array] = None) -> jax.Array:
  """softmax(scale q k^T + bias) v in every window and head, by the form `impl`.

  qkv: the qkv projection reshaped [B_, N, 3, heads, d], B_ = images x nW, windows batch-major;
  bias: float32 [nW, heads, N, N], the relative position bias plus the shifted-window mask
  (nW = 1 when unshifted: one bias for every window); `dtype` the compute dtype. Attention
  dropout at `dropout_rate` applies when not `deterministic`, drawn from `rng`. Returns
  [B_, N, heads * d] in qkv's dtype.
  """
  check_attention_impl(impl)
  dropout = dropout_rate > 0 and not deterministic
  n = qkv.shape[1]
  if not dropout:
    if impl == "xla_cpu":
      return xla_cpu.window_attention_cpu(qkv, bias, scale)
    if impl == "cudnn" and n % 2 == 0 and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
      return _cudnn(qkv, bias, scale)
    if impl in ("pallas", "pallas_interpret"):
      from eesmm_jax.ops import pallas_attention  # only where asked for: it imports Pallas
      return pallas_attention.window_attention(qkv, bias, scale,
                                               interpret=impl == "pallas_interpret")
  if dropout and rng is None:
    raise ValueError("window_attention: attention dropout in training needs an rng")
  return _xla(qkv, bias, scale, dtype, dropout_rate if dropout else 0.0, rng)


def logits_dtype(dtype) -> Any:
  """The dtype the [B_, heads, N, N] logits and probabilities are kept in: bfloat16 in bf16
  runs (half the bytes of the largest non-matmul tensors; bf16 has float32's range, so the
  -100 mask cannot overflow), float32 otherwise (fp16's range is what overflows)."""
  return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32


def _xla(qkv, bias, scale, dtype, dropout_rate: float, rng):
  """The einsums, autodiff's gradients. The logits accumulate in float32 inside the matmul on
  every backend and dtype, and are kept in `logits_dtype(dtype)`; the softmax's max, exp and
  sum run in float32 on them (as PyTorch's autocast does), its output is cast back."""
  b, n, _, heads, d = qkv.shape
  nw = bias.shape[0]
  kept = logits_dtype(dtype)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B_, N, heads, d]: no transpose
  logits = jnp.einsum("bnhd,bmhd->bhnm", q * scale, k, preferred_element_type=kept)
  logits = logits.reshape(b // nw, nw, heads, n, n) + bias.astype(kept)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(kept)
  probs = probs.astype(dtype).reshape(b, heads, n, n)
  if dropout_rate == 1.0:
    probs = jnp.zeros_like(probs)
  elif dropout_rate > 0:  # nn.Dropout's draw and scaling
    keep = 1.0 - dropout_rate
    mask = jax.random.bernoulli(rng, keep, probs.shape)
    probs = jax.lax.select(mask, probs / keep, jnp.zeros_like(probs))
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b, n, heads * d)


def _cudnn(qkv, bias, scale):
  """cuDNN's fused kernel, which takes a bias only for an even N and 16-bit inputs (windows 6
  and 12, not 7) and accumulates in float32 internally."""
  b, n, _, heads, d = qkv.shape
  nw = bias.shape[0]
  full = jnp.broadcast_to(bias, (b // nw,) + bias.shape).reshape(b, heads, n, n)
  out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                     bias=full.astype(qkv.dtype), scale=scale,
                                     implementation="cudnn")
  return out.reshape(b, n, heads * d)
