"""Swin window attention as fused Pallas kernels (forward and backward) for Triton on the GPU.

`window_attention(qkv, bias, scale)` computes softmax(scale q k^T + bias[w % nW, h]) v in every
window b_ = image * nW + w and head h, with the contract of `ops.xla_cpu.window_attention_cpu`:
qkv [B_, N, 3, heads, d] as the qkv projection writes it (any float dtype), bias float32
[nW, heads, N, N] (relative-position bias, plus the -100 shift mask when shifted), scale a Python
float; it returns [B_, N, heads * d] in qkv's dtype. It is a `jax.custom_vjp` whose forward and
backward are each one `pl.pallas_call`.

Layout. qkv is viewed (a free reshape) as [images, nW, N, 3, heads, d]: the kernels' BlockSpecs
pick q, k and v of one (window, head) out of it by index map, so XLA makes no transposed copy,
and the bias block (w, h) is picked the same way, with no modulo in an index map. The output is
written as [images, nW, N, heads, d], which is [B_, N, heads * d] without a copy.

Forward, flash-attention style: one program per (image, window, head, query block). The logits
(float32 accumulation; bf16/f16 operands stay 16-bit in the matmuls) and the softmax stay in
registers, with an online softmax over key blocks when a window needs more than one; no
[B_, heads, N, N] array is written. Each query row's logsumexp is saved for the backward.

Backward: one program per (image group, window, head, key block). It loops over the images of
its group (windows w of consecutive images share bias[w]), recomputes the probabilities of each
(query block, key block) pair from the saved logsumexp, and writes dk and dv for its key block,
dq, and the bias gradient of its key-block column summed over the group's images. The bias
gradient is returned per group, [groups, nW, heads, N, N], and XLA sums the groups (one group when
the windows and heads alone fill the GPU; more when they do not, e.g. nW = 1). When a window
has one key block (N <= 64 by default), d_qkv is written directly as [B_, N, 3, heads, d]; with
several, each key block's program writes its partial dq in float32, and XLA sums those and
stacks dq, dk, dv (a copy of d_qkv), so that no program needs another's results.

Triton constraints assumed (the first two read in the installed JAX's Pallas Triton lowering,
`jax._src.pallas.triton.lowering`; the third is Triton's tl.dot minimum): every loaded or stored
block, and every value in the kernel, has a power-of-two size; loads and stores are pointer
arithmetic without bounds checks, so a block may overhang its array only under a mask; each of a
matmul's M, N, K is >= 16. So N is padded, inside the kernel by masked loads, to the blocks: one
64-token block for N = 36 or 49 (16 at least), query blocks of 64 and key blocks of 32 for larger
N (144 -> 192 query rows, 160 keys); d is padded likewise to a power of two >= 16 (Swin's d = 32
needs none). Padded keys get -inf logits, padded query rows are computed on zeros and never
stored, padded head-dim columns load as zeros. One window and head per program: a program's
tiles already reach the 16 x 16 minimum at these sizes, so several windows per program were not
needed for validity. Whether they pay, and the block sizes, num_warps and the backward's image
groups, are for the project's GPU probe to measure (`block_q`, `block_k` and
`images_per_program` are exposed for it); nothing here measures GPU speed. Float32 inputs
multiply in IEEE float32 when jax's default matmul precision is 'highest' or 'float32', else in
TF32 on the GPU, as XLA's default does. The pallas_calls carry Triton compiler params: without
them this JAX lowers a GPU pallas_call with Mosaic GPU instead.

Tested on the CPU only: the kernels run in Pallas' interpreter (`interpret=True`, which pads
overhanging blocks with NaN, so an unmasked padded read shows), and their Triton modules are built
and verified by exporting for CUDA (tests/test_pallas_attention.py); compiling them with Triton
and running them needs the GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The backward wants at least this many programs to fill a GPU (an H200 has 132 SMs); image
# groups are split off until the grid reaches it. A starting point for the GPU probe to tune.
_BWD_TARGET_PROGRAMS = 1024
_NUM_WARPS = 4
_MIN_BLOCK = 16  # tl.dot's smallest M, N and K
_NEG_INF = float("-inf")


class _Plan(NamedTuple):
  """Static shapes and choices of one call, shared by the forward and backward kernels."""
  images: int
  nw: int
  n: int
  heads: int
  d: int
  dp: int        # head dim padded to a power of two >= 16
  bq: int        # query block
  bk: int        # key block
  nq: int        # query blocks per window
  nk: int        # key blocks per window
  ipg: int       # images per backward program
  scale: float
  precision: lax.Precision
  interpret: bool

  @property
  def rows(self) -> int:
    """Padded token rows one backward program covers (every query and key block)."""
    return max(self.nq * self.bq, self.nk * self.bk)


def _pow2_at_least(x: int) -> int:
  return max(_MIN_BLOCK, 1 << max(0, (x - 1).bit_length()))


def _check_block(name: str, value: Optional[int]) -> None:
  if value is not None and (not isinstance(value, int) or value < _MIN_BLOCK
                            or value & (value - 1)):
    raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK} (Triton's tl.dot minimum "
                     f"and power-of-two blocks), got {value!r}")


def _dot_precision(dtype) -> lax.Precision:
  """IEEE float32 products where the caller pinned float32 matmuls; XLA's default otherwise."""
  if dtype == jnp.float32 and jax.config.jax_default_matmul_precision in (
      "highest", "float32", "F32_F32_F32"):
    return lax.Precision.HIGHEST
  return lax.Precision.DEFAULT


def _plan(qkv, bias, scale, interpret, block_q, block_k, images_per_program) -> _Plan:
  """Checks the arguments (one-line ValueErrors, before anything is traced) and picks blocks."""
  shape = getattr(qkv, "shape", None)
  if shape is None or len(shape) != 5 or shape[2] != 3:
    raise ValueError(f"qkv must be [B_, N, 3, heads, head_dim] (rank 5, 3 on axis 2), got shape "
                     f"{shape}")
  if not jnp.issubdtype(qkv.dtype, jnp.floating):
    raise ValueError(f"qkv must be a float array (float32, bfloat16, float16), got {qkv.dtype}")
  b_, n, _, heads, d = shape
  bshape = getattr(bias, "shape", None)
  if bshape is None or len(bshape) != 4 or tuple(bshape[1:]) != (heads, n, n):
    raise ValueError(f"bias must be [nW, heads, N, N] = [nW, {heads}, {n}, {n}] for qkv of shape "
                     f"{shape}, got shape {bshape}")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"bias must be a float array (float32), got {bias.dtype}")
  nw = bshape[0]
  if nw < 1 or b_ % nw:
    raise ValueError(f"bias's nW = {nw} must divide qkv's B_ = {b_} windows (B_ = images x nW, "
                     "windows batch-major)")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise ValueError(f"scale must be a Python float (static), got {type(scale).__name__}")
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  images = b_ // nw
  n_pad = _pow2_at_least(n)
  default_q, default_k = (n_pad, n_pad) if n_pad <= 64 else (64, 32)
  bq, bk = block_q or default_q, block_k or default_k
  nq, nk = math.ceil(n / bq), math.ceil(n / bk)
  if images_per_program is None:
    # The fewest groups (least bias-gradient traffic) that still fill the GPU.
    groups = next((g for g in range(1, images + 1)
                   if images % g == 0 and g * nw * heads * nk >= _BWD_TARGET_PROGRAMS), images)
    images_per_program = images // groups
  elif (not isinstance(images_per_program, int) or images_per_program < 1
        or images % images_per_program):
    raise ValueError(f"images_per_program must divide the {images} images (B_ = {b_} over "
                     f"nW = {nw}), got {images_per_program!r}")
  return _Plan(images=images, nw=nw, n=n, heads=heads, d=d, dp=_pow2_at_least(d), bq=bq, bk=bk,
               nq=nq, nk=nk, ipg=images_per_program, scale=float(scale),
               precision=_dot_precision(qkv.dtype), interpret=bool(interpret))


def window_attention(qkv: jax.Array, bias: jax.Array, scale: float, *, interpret: bool = False,
                     block_q: Optional[int] = None, block_k: Optional[int] = None,
                     images_per_program: Optional[int] = None) -> jax.Array:
  """softmax(scale q k^T + bias[w % nW, h]) v per window and head; [B_, N, heads * d].

  qkv [B_, N, 3, heads, d] (any float dtype; B_ = images x nW, windows batch-major); bias
  [nW, heads, N, N], float32 (other float dtypes are cast); scale a Python float. `interpret`
  runs the kernels in Pallas' interpreter (the only way on a CPU). `block_q` / `block_k`
  (powers of two >= 16) and `images_per_program` (a divisor of the images: the backward's
  programs each loop over that many) override the defaults, for tuning on a GPU.
  """
  plan = _plan(qkv, bias, scale, interpret, block_q, block_k, images_per_program)
  b_, n, _, heads, d = qkv.shape
  qkv6 = qkv.reshape(plan.images, plan.nw, n, 3, heads, d)
  out = _attention(qkv6, bias.astype(jnp.float32), plan)
  return out.reshape(b_, n, heads * d)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs arrive with the squeezed (None) block dims dropped; every load and store is
# masked to the array's true N and d, since the blocks overhang them.


def _dot(a, b, dims, plan: _Plan):
  """A 2-D matmul with float32 accumulation; `dims` are the contracting axes of a and b."""
  return lax.dot_general(a, b, (dims, ((), ())), precision=plan.precision,
                         preferred_element_type=jnp.float32)


def _index(i: int) -> jax.Array:
  """A static index as an int32 scalar: interpret mode's store takes no Python int index."""
  return jnp.asarray(i, jnp.int32)


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, plan: _Plan):
  # q_ref [bq, dp], k_ref / v_ref [nk * bk, dp], bias_ref [bq, nk * bk]; o_ref [bq, dp],
  # lse_ref [bq]: one (image, window, head, query block).
  i = pl.program_id(3)
  row_ok = i * plan.bq + jnp.arange(plan.bq) < plan.n
  d_ok = jnp.arange(plan.dp) < plan.d
  q = plgpu.load(q_ref, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

  def logits(start):
    key_ok = start + jnp.arange(plan.bk) < plan.n
    keys = pl.ds(start, plan.bk)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = plgpu.load(k_ref.at[keys, :], mask=kv_mask, other=0.0)
    v = plgpu.load(v_ref.at[keys, :], mask=kv_mask, other=0.0)
    b = plgpu.load(bias_ref.at[:, keys], mask=row_ok[:, None] & key_ok[None, :], other=0.0)
    s = _dot(q, k, ((1,), (1,)), plan) * plan.scale + b
    return jnp.where(key_ok[None, :], s, _NEG_INF), v

  if plan.nk == 1:
    s, v = logits(0)
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - m[:, None])
    l = jnp.sum(p, axis=1)
    acc = _dot(p.astype(v.dtype), v, ((1,), (0,)), plan)
  else:
    def step(j, carry):
      m, l, acc = carry
      s, v = logits(pl.multiple_of(j * plan.bk, plan.bk))
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[:, None])
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, ((1,), (0,)), plan)
      return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((plan.bq,), _NEG_INF, jnp.float32), jnp.zeros((plan.bq,), jnp.float32),
            jnp.zeros((plan.bq, plan.dp), jnp.float32))
    m, l, acc = lax.fori_loop(0, plan.nk, step, init)
  plgpu.store(o_ref, (acc / l[:, None]).astype(o_ref.dtype),
              mask=row_ok[:, None] & d_ok[None, :])
  plgpu.store(lse_ref, m + jnp.log(l), mask=row_ok)


def _bwd_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, do_ref, lse_ref, *out_refs, plan: _Plan):
  # One (image group, window, head, key block j). q_ref / o_ref / do_ref [ipg, rows, dp],
  # k_ref / v_ref [ipg, bk, dp], bias_ref [rows, bk], lse_ref [ipg, rows]. Outputs: with one key
  # block, dqkv_ref [ipg, rows, 3, dp] and dbias_ref [rows, bk]; with several, dq_ref
  # [ipg, rows, dp] (float32, this block's share), dk_ref / dv_ref [ipg, bk, dp], dbias_ref.
  j = pl.program_id(3)
  dtype = q_ref.dtype
  key_ok = j * plan.bk + jnp.arange(plan.bk) < plan.n
  d_ok = jnp.arange(plan.dp) < plan.d
  kv_mask = key_ok[:, None] & d_ok[None, :]
  dbias_ref = out_refs[-1]

  def row_mask(i):
    return i * plan.bq + jnp.arange(plan.bq) < plan.n

  def image(t, dbias):
    k = plgpu.load(k_ref.at[t], mask=kv_mask, other=0.0)
    v = plgpu.load(v_ref.at[t], mask=kv_mask, other=0.0)
    dk = jnp.zeros((plan.bk, plan.dp), jnp.float32)
    dv = jnp.zeros((plan.bk, plan.dp), jnp.float32)
    dbias = list(dbias)
    for i in range(plan.nq):  # static: each query block keeps its own bias-gradient tile
      row_ok = row_mask(i)
      rows = pl.ds(i * plan.bq, plan.bq)
      q_mask = row_ok[:, None] & d_ok[None, :]
      valid = row_ok[:, None] & key_ok[None, :]
      q = plgpu.load(q_ref.at[t, rows, :], mask=q_mask, other=0.0)
      o = plgpu.load(o_ref.at[t, rows, :], mask=q_mask, other=0.0)
      do = plgpu.load(do_ref.at[t, rows, :], mask=q_mask, other=0.0)
      lse = plgpu.load(lse_ref.at[t, rows], mask=row_ok, other=0.0)
      b = plgpu.load(bias_ref.at[rows, :], mask=valid, other=0.0)
      s = _dot(q, k, ((1,), (1,)), plan) * plan.scale + b
      p = jnp.exp(jnp.where(valid, s - lse[:, None], _NEG_INF))
      # softmax's backward: dlogits = p * (dp - rowsum(p * dp)), and rowsum(p * dp) = o . do.
      delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
      dv = dv + _dot(p.astype(dtype), do, ((0,), (0,)), plan)
      ds = p * (_dot(do, v, ((1,), (1,)), plan) - delta[:, None])
      dbias[i] = dbias[i] + ds
      ds16 = ds.astype(dtype)
      dk = dk + _dot(ds16, q, ((0,), (0,)), plan)
      dq = _dot(ds16, k, ((1,), (0,)), plan) * plan.scale
      if plan.nk == 1:
        plgpu.store(out_refs[0].at[t, rows, _index(0), :], dq.astype(dtype), mask=q_mask)
      else:
        plgpu.store(out_refs[0].at[t, rows, :], dq, mask=q_mask)
    dk = (dk * plan.scale).astype(dtype)
    dv = dv.astype(dtype)
    if plan.nk == 1:
      keys = pl.ds(0, plan.bk)
      plgpu.store(out_refs[0].at[t, keys, _index(1), :], dk, mask=kv_mask)
      plgpu.store(out_refs[0].at[t, keys, _index(2), :], dv, mask=kv_mask)
    else:
      plgpu.store(out_refs[1].at[t], dk, mask=kv_mask)
      plgpu.store(out_refs[2].at[t], dv, mask=kv_mask)
    return tuple(dbias)

  init = tuple(jnp.zeros((plan.bq, plan.bk), jnp.float32) for _ in range(plan.nq))
  dbias = lax.fori_loop(0, plan.ipg, image, init)
  for i in range(plan.nq):
    valid = row_mask(i)[:, None] & key_ok[None, :]
    plgpu.store(dbias_ref.at[pl.ds(i * plan.bq, plan.bq), :], dbias[i], mask=valid)


# ----------------------------------------------------------------------------------------------
# pallas_calls and the custom VJP, on the [images, nW, N, 3, heads, d] view.


def _compiler_params():
  return plgpu.CompilerParams(num_warps=_NUM_WARPS)


def _forward(qkv6, bias, plan: _Plan):
  p = plan
  grid = (p.images, p.nw, p.heads, p.nq)
  nkp = p.nk * p.bk

  def qkv_spec(part, rows, row_index):
    return pl.BlockSpec((None, None, rows, None, None, p.dp),
                        lambda a, w, h, i: (a, w, row_index(i), part, h, 0))

  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=p),
      grid=grid,
      in_specs=[qkv_spec(0, p.bq, lambda i: i), qkv_spec(1, nkp, lambda i: 0),
                qkv_spec(2, nkp, lambda i: 0),
                pl.BlockSpec((None, None, p.bq, nkp), lambda a, w, h, i: (w, h, i, 0))],
      out_specs=[pl.BlockSpec((None, None, p.bq, None, p.dp), lambda a, w, h, i: (a, w, i, h, 0)),
                 pl.BlockSpec((None, None, None, p.bq), lambda a, w, h, i: (a, w, h, i))],
      out_shape=[jax.ShapeDtypeStruct((p.images, p.nw, p.n, p.heads, p.d), qkv6.dtype),
                 jax.ShapeDtypeStruct((p.images, p.nw, p.heads, p.n), jnp.float32)],
      compiler_params=_compiler_params(), interpret=p.interpret, name="swin_window_attention_fwd",
  )(qkv6, qkv6, qkv6, bias)
  return out, lse


def _backward(qkv6, bias, out, lse, d_out, plan: _Plan):
  p = plan
  groups = p.images // p.ipg
  rows = p.rows
  grid = (groups, p.nw, p.heads, p.nk)
  tokens = (p.images, p.nw, p.n, p.heads, p.d)

  def qkv_spec(part, nrows, by_key_block):
    return pl.BlockSpec((p.ipg, None, nrows, None, None, p.dp),
                        lambda g, w, h, j: (g, w, j if by_key_block else 0, part, h, 0))

  token_spec = pl.BlockSpec((p.ipg, None, rows, None, p.dp), lambda g, w, h, j: (g, w, 0, h, 0))
  in_specs = [qkv_spec(0, rows, False), qkv_spec(1, p.bk, True), qkv_spec(2, p.bk, True),
              pl.BlockSpec((None, None, rows, p.bk), lambda g, w, h, j: (w, h, 0, j)),
              token_spec, token_spec,
              pl.BlockSpec((p.ipg, None, None, rows), lambda g, w, h, j: (g, w, h, 0))]
  dbias_spec = pl.BlockSpec((None, None, None, rows, p.bk), lambda g, w, h, j: (g, w, h, 0, j))
  dbias_shape = jax.ShapeDtypeStruct((groups, p.nw, p.heads, p.n, p.n), jnp.float32)
  if p.nk == 1:
    out_specs = [pl.BlockSpec((p.ipg, None, rows, 3, None, p.dp),
                              lambda g, w, h, j: (g, w, 0, 0, h, 0)), dbias_spec]
    out_shape = [jax.ShapeDtypeStruct(qkv6.shape, qkv6.dtype), dbias_shape]
  else:
    kv_spec = pl.BlockSpec((p.ipg, None, p.bk, None, p.dp), lambda g, w, h, j: (g, w, j, h, 0))
    out_specs = [pl.BlockSpec((None, p.ipg, None, rows, None, p.dp),
                              lambda g, w, h, j: (j, g, w, 0, h, 0)), kv_spec, kv_spec, dbias_spec]
    out_shape = [jax.ShapeDtypeStruct((p.nk,) + tokens, jnp.float32),
                 jax.ShapeDtypeStruct(tokens, qkv6.dtype),
                 jax.ShapeDtypeStruct(tokens, qkv6.dtype), dbias_shape]
  results = pl.pallas_call(
      functools.partial(_bwd_kernel, plan=p),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(), interpret=p.interpret, name="swin_window_attention_bwd",
  )(qkv6, qkv6, qkv6, bias, out, d_out, lse)
  if p.nk == 1:
    d_qkv, d_bias = results
  else:
    dq, dk, dv, d_bias = results
    d_qkv = jnp.stack([dq.sum(0).astype(qkv6.dtype), dk, dv], axis=3)
  return d_qkv, d_bias.sum(0)


def _attention_fn(qkv6, bias, plan: _Plan):
  return _forward(qkv6, bias, plan)[0]


def _attention_fwd(qkv6, bias, plan: _Plan):
  out, lse = _forward(qkv6, bias, plan)
  return out, (qkv6, bias, out, lse)


def _attention_bwd(plan: _Plan, residuals, d_out):
  qkv6, bias, out, lse = residuals
  return _backward(qkv6, bias, out, lse, d_out.astype(qkv6.dtype), plan)


_attention = jax.custom_vjp(_attention_fn, nondiff_argnums=(2,))
_attention.defvjp(_attention_fwd, _attention_bwd)
