"""eesmm_jax.ops.pallas_attention: the fused window-attention kernels, run in Pallas' interpreter
on the CPU, against plain XLA einsums; and their lowering for the GPU's Triton backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesmm_jax.models import swin
from eesmm_jax.ops import pallas_attention as pa

HEADS, HEAD_DIM = 2, 32
SCALE = HEAD_DIM ** -0.5


def reference(qkv, bias, scale):
  """softmax(scale q k^T + bias[w % nW]) v in float32 einsums (windows batch-major)."""
  b_, n, _, heads, d = qkv.shape
  qkv = qkv.astype(jnp.float32)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale
  nw = bias.shape[0]
  logits = (logits.reshape(b_ // nw, nw, heads, n, n) + bias).reshape(b_, heads, n, n)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b_, n, heads * d)


def inputs(window, shifted, images, dtype=jnp.float32, seed=0):
  """qkv, bias (relative-position-like values plus swin's -100 shift mask) and a cotangent."""
  n = window * window
  if shifted:  # a 2 x 2-window map shifted by half a window: nW = 4, with -100 entries
    mask = swin.shifted_window_mask(2 * window, 2 * window, window, window // 2)
    assert mask.shape[0] == 4 and (mask == -100).any()
  else:
    mask = np.zeros((1, n, n), np.float32)
  nw = mask.shape[0]
  rng = np.random.default_rng(seed)
  rel = 0.5 * rng.standard_normal((HEADS, n, n)).astype(np.float32)
  bias = jnp.asarray(rel[None] + mask[:, None])
  qkv = rng.standard_normal((images * nw, n, 3, HEADS, HEAD_DIM)).astype(np.float32)
  cot = rng.standard_normal((images * nw, n, HEADS * HEAD_DIM)).astype(np.float32)
  return jnp.asarray(qkv).astype(dtype), bias, jnp.asarray(cot).astype(dtype)


def kernel_and_reference(qkv, bias, cot, **kwargs):
  """(out, d_qkv, d_bias) of the kernels and of the reference, under 'highest' matmuls."""
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(lambda a, b: pa.window_attention(a, b, SCALE, interpret=True, **kwargs),
                       qkv, bias)
    got = (out, *vjp(cot))
    out_r, vjp_r = jax.vjp(lambda a, b: reference(a, b, SCALE), qkv.astype(jnp.float32), bias)
    want = (out_r, *vjp_r(cot.astype(jnp.float32)))
  return got, want


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("window", [6, 7, 12])  # N = 36, 49 (one 64 block), 144 (several)
def test_float32_values_and_gradients_match_xla(window, shifted):
  qkv, bias, cot = inputs(window, shifted, images=2 if shifted else 3)
  got, want = kernel_and_reference(qkv, bias, cot)
  assert got[0].shape == (qkv.shape[0], window ** 2, HEADS * HEAD_DIM)
  assert got[0].dtype == jnp.float32
  for name, g, w in zip(("out", "d_qkv", "d_bias"), got, want):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("window,shifted,images,kwargs", [
    # several query and key blocks at N = 49, and backward programs looping over two images
    (7, True, 2, dict(block_q=16, block_k=32, images_per_program=2)),
    # one block per window, three images per backward program: the bias gradient sums them
    (6, False, 3, dict(images_per_program=3)),
])
def test_block_and_image_group_choices_give_the_same_result(window, shifted, images, kwargs):
  qkv, bias, cot = inputs(window, shifted, images, seed=1)
  got, want = kernel_and_reference(qkv, bias, cot, **kwargs)
  for name, g, w in zip(("out", "d_qkv", "d_bias"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_matches_within_bf16_rounding():
  qkv, bias, cot = inputs(7, True, images=2, dtype=jnp.bfloat16, seed=2)
  got, want = kernel_and_reference(qkv, bias, cot)
  assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
  for name, g, w in zip(("out", "d_qkv", "d_bias"), got, want):
    err = np.abs(np.asarray(g.astype(jnp.float32)) - np.asarray(w)).max()
    assert err <= 2e-2 * np.abs(np.asarray(w)).max(), name


def test_forward_keeps_no_logits_for_the_backward():
  # The forward's outputs and saved residuals: nothing [B_, heads, N, N] (only the bias itself).
  qkv, bias, _ = inputs(7, True, images=2)
  jaxpr = jax.make_jaxpr(
      lambda a, b: jax.vjp(lambda x, y: pa.window_attention(x, y, SCALE, interpret=True), a, b)
  )(qkv, bias)
  n = 49
  shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars] + \
           [v.aval.shape for v in jaxpr.jaxpr.outvars]
  square = [s for s in shapes if s[-2:] == (n, n)]
  assert square and all(np.prod(s) <= bias.size for s in square), square


def one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as info:
    fn()
  assert "\n" not in str(info.value)


def test_bad_shapes_are_refused_in_one_line():
  qkv, bias, _ = inputs(6, True, images=2)  # B_ = 8, nW = 4
  attend = pa.window_attention
  one_line_error(lambda: attend(qkv, bias[:3], SCALE, interpret=True),
                 r"nW = 3 must divide qkv's B_ = 8")
  one_line_error(lambda: attend(qkv.reshape(8, 36, 3, 64), bias, SCALE, interpret=True),
                 r"qkv must be \[B_, N, 3, heads, head_dim\].*\(8, 36, 3, 64\)")
  one_line_error(lambda: attend(qkv, bias[:, :, :, :35], SCALE, interpret=True),
                 r"bias must be \[nW, heads, N, N\] = \[nW, 2, 36, 36\]")
  one_line_error(lambda: attend(qkv, bias, SCALE, interpret=True, block_q=24),
                 "block_q must be a power of two >= 16")
  one_line_error(lambda: attend(qkv, bias, SCALE, interpret=True, images_per_program=3),
                 "images_per_program must divide the 2 images")
  one_line_error(lambda: attend(qkv.astype(jnp.int32), bias, SCALE, interpret=True),
                 "qkv must be a float array")


def test_kernels_lower_for_the_triton_backend(monkeypatch):
  # Pallas' Triton lowering runs in Python, so it can be exercised without a GPU: export for
  # CUDA, and verify each Triton module it builds. Compiling and running them needs the GPU.
  triton_lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
  lower = triton_lowering.lower_jaxpr_to_triton_module
  verified = []

  def lower_and_verify(*args, **kwargs):
    result = lower(*args, **kwargs)
    verified.append(result.module.operation.verify())
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  skip = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for window, dtype in [(6, jnp.bfloat16), (7, jnp.float16), (12, jnp.float32)]:
    n = window * window
    qkv = jax.ShapeDtypeStruct((8, n, 3, HEADS, HEAD_DIM), dtype)
    bias = jax.ShapeDtypeStruct((4, HEADS, n, n), jnp.float32)

    def step(qkv, bias):
      out, vjp = jax.vjp(lambda a, b: pa.window_attention(a, b, SCALE), qkv, bias)
      return vjp(out)

    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=skip)
    text = exported(qkv, bias).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2, window  # the forward and the backward
  assert verified == [True] * 6
