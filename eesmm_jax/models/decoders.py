"""Pixel decoders for masked image modeling, and the encoder + decoder container.

Every decoder maps the encoder's final feature map [B, h, w, C] (h = H / stride) to
`num_outputs` images [B, num_outputs, H, W, in_chans]: num_outputs = 1 for SimMIM and for
EESMM's "subtract" head (which predicts the blend), n for EESMM's "split" head (Sec. 4.1.1:
"splits the output ... into two predicted images").
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eesmm_jax import ops
from eesmm_jax.models import swin

Dtype = Any


def pixel_shuffle(x: jax.Array, stride: int, num_outputs: int) -> jax.Array:
  """[B, h, w, n*C*r*r] -> [B, n, h*r, w*r, C] in PyTorch's PixelShuffle channel order,
  out[c, h*r + i, w*r + j] = in[c*r*r + i*r + j, h, w], with the n images outermost so that
  n = 1 is exactly SimMIM's Conv2d + PixelShuffle."""
  b, h, w, ch = x.shape
  r, n = stride, num_outputs
  c = ch // (n * r * r)
  x = x.reshape(b, h, w, n, c, r, r)
  x = x.transpose(0, 3, 1, 5, 2, 6, 4)  # b, n, h, i, w, j, c
  return x.reshape(b, n, h * r, w * r, c)


class SimMIMDecoder(nn.Module):
  """SimMIM's head: a 1x1 conv to n * in_chans * stride^2 channels, then a pixel shuffle.

  The conv is named "0" so that torch's `decoder.0.{weight, bias}` is `decoder/0/{kernel, bias}`.
  """
  num_outputs: int
  stride: int
  in_chans: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    channels = self.num_outputs * self.in_chans * self.stride ** 2
    x = swin.PatchConv(channels, name="0", dtype=self.dtype, param_dtype=self.param_dtype)(z)
    return pixel_shuffle(x, self.stride, self.num_outputs)


def sincos_pos_embed_2d(side: int, dim: int) -> np.ndarray:
  """[side * side, dim] fixed 2-D sin-cos position embedding (MAE's decoder), half the channels
  for each axis."""
  if dim % 4:
    raise ValueError(f"decoder_dim must be a multiple of 4 for the 2-D sin-cos embedding, "
                     f"got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  grid_h, grid_w = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  def embed(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([embed(grid_h), embed(grid_w)], axis=1).astype(np.float32)


class DecoderBlock(nn.Module):
  """Pre-norm ViT block (MAE's decoder block): attention + exact-GELU MLP, both residual."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"  # the Linear layers' form (ops.IMPLS)

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    dense = functools.partial(ops.layers(self.impl).dense, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    y = norm(name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name="attn")(y, y)
    y = norm(name="norm2")(x)
    y = dense(int(self.dim * self.mlp_ratio), name="fc1")(y)
    y = dense(self.dim, name="fc2")(nn.gelu(y, approximate=False))
    return x + y


class TransformerDecoder(nn.Module):
  """The lightweight decoder of Sec. 4.1.1 (MAE-style, width 512): a linear embedding of the
  encoder's final-stage tokens, fixed sin-cos positions, `depth` ViT blocks, a norm, and a linear
  layer to n * in_chans * stride^2 values per token, pixel-shuffled into n images.

  The Swin encoder keeps every token (masked ones carry its mask token), so unlike MAE's decoder
  there are no tokens to re-insert: "visible patch representations and masking tokens" are
  already the encoder's output sequence.
  """
  num_outputs: int
  stride: int
  in_chans: int = 3
  dim: int = 512
  depth: int = 8
  num_heads: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"  # the Linear layers' form (ops.IMPLS), as the encoder's

  @nn.compact
  def __call__(self, z):
    b, h, w, _ = z.shape
    if h != w:
      raise ValueError(f"TransformerDecoder expects a square feature map, got {h}x{w}")
    dense = functools.partial(ops.layers(self.impl).dense, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    x = dense(self.dim, name="embed")(z.reshape(b, h * w, -1))
    x = x + jnp.asarray(sincos_pos_embed_2d(h, self.dim), x.dtype)[None]
    for i in range(self.depth):
      x = DecoderBlock(self.dim, self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                       impl=self.impl, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="norm", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    x = dense(self.num_outputs * self.in_chans * self.stride ** 2, name="pred")(x)
    return pixel_shuffle(x.reshape(b, h, w, -1), self.stride, self.num_outputs)


class MIMModel(nn.Module):
  """Encoder + pixel decoder, as microsoft/SimMIM's `SimMIM` (params {'encoder', 'decoder'}).

  `apply({'params': p}, x, mask, train=...)`: x [B, H, W, C] the (blended) input, mask
  [B, H/patch, W/patch] the token mask (1 = replaced by the mask token) -> [B, n, H, W, C].
  The encoder is a Swin built with use_mask_token=True; pass a 'dropout' rng when training
  with drop path.
  """
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, x, mask, *, train: bool = False):
    z = self.encoder(x, mask, train=train, return_features=True)
    # The loss (and fp16's loss scaling) is computed in float32, whatever the compute dtype.
    return self.decoder(z).astype(jnp.float32)
