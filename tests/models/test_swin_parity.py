"""Swin forward, gradients and the mask-token path against timm (the PyTorch reference).

float32 with `jax.default_matmul_precision('highest')`; weights drawn by `torch_ref.perturb_` so
that every parameter matters, then loaded with our converter.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eesmm_jax import ops
from eesmm_jax.convert import flax_to_torch, torch_to_flax
from tests import torch_ref

pytestmark = pytest.mark.parity

# Every (impl, attention_impl) that runs on a CPU: the portable forms, the XLA:CPU ones, and
# whatever ops adds to its CPU lists (the Pallas kernel, interpreted, where this checkout has it).
FORMS = list(itertools.product(ops.CPU_IMPLS, ops.CPU_ATTENTION_IMPLS))
FORM_IDS = [f"{impl}-{attention}" for impl, attention in FORMS]


@pytest.mark.parametrize("variant,img_size,window_size,batch", [
    ("swin_base", 192, 6, 2),  # SimMIM's pretraining shape
    ("swin_base", 224, 7, 1),
])
def test_forward_logits_match_timm(variant, img_size, window_size, batch):
  ref = torch_ref.timm_swin(variant, img_size, window_size)
  model = torch_ref.flax_model_like(variant, img_size, window_size)
  params = torch_to_flax(ref.state_dict(), model)
  x = torch_ref.images(batch, img_size)
  with torch.no_grad():
    expected = ref(torch_ref.to_nchw(x)).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
  diff = np.abs(got - expected).max()
  print(f"{variant} {img_size}/w{window_size}: max |logits diff| = {diff:.3g} "
        f"(logit scale {np.abs(expected).max():.3g})")
  assert got.shape == (batch, 1000)
  assert diff <= 1e-4


@functools.lru_cache(maxsize=None)
def timm_tiny_logits():
  """timm's Swin-T 224/7 (perturbed), two images, and its logits: shared by every form."""
  ref = torch_ref.timm_swin("swin_tiny", 224, 7)
  x = torch_ref.images(2, 224)
  with torch.no_grad():
    return ref.state_dict(), x, ref(torch_ref.to_nchw(x)).numpy()


@pytest.mark.parametrize("impl,attention_impl", FORMS, ids=FORM_IDS)
def test_every_cpu_form_matches_timm_logits(impl, attention_impl):
  state, x, expected = timm_tiny_logits()
  model = torch_ref.flax_model_like("swin_tiny", 224, 7, impl=impl, attention_impl=attention_impl)
  params = torch_to_flax(state, model)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
  diff = np.abs(got - expected).max()
  print(f"swin_tiny 224/w7 {impl}/{attention_impl}: max |logits diff| = {diff:.3g} "
        f"(logit scale {np.abs(expected).max():.3g})")
  assert got.shape == (2, 1000)
  assert diff <= 1e-4


@functools.lru_cache(maxsize=None)
def timm_tiny_gradients():
  """timm's Swin-T 224/7 with 10 classes, a squared-error loss on two images, and the gradient
  of every parameter: shared by every form."""
  ref = torch_ref.timm_swin("swin_tiny", 224, 7, num_classes=10)
  x = torch_ref.images(2, 224)
  target = np.random.default_rng(3).standard_normal((2, 10)).astype(np.float32)
  out = ref(torch_ref.to_nchw(x))
  ((out - torch.from_numpy(target)) ** 2).mean().backward()
  expected = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  return ref.state_dict(), x, target, expected


@pytest.mark.parametrize("impl,attention_impl", FORMS, ids=FORM_IDS)
def test_gradients_match_timm_swin_tiny(impl, attention_impl):
  state, x, target, expected = timm_tiny_gradients()
  model = torch_ref.flax_model_like("swin_tiny", 224, 7, num_classes=10, impl=impl,
                                    attention_impl=attention_impl)
  params = torch_to_flax(state, model)

  def loss(p):
    return ((model.apply({"params": p}, x) - target) ** 2).mean()

  with jax.default_matmul_precision("highest"):
    grads = jax.jit(jax.grad(loss))(params)
  got = flax_to_torch(grads, model, layout="timm")
  assert set(got) == set(expected)
  worst = ("", 0.0)
  for name, g in expected.items():
    rel = np.linalg.norm(got[name] - g) / max(np.linalg.norm(g), 1e-12)
    assert np.linalg.norm(g) > 0, f"{name} gets no gradient in the reference"
    worst = max(worst, (name, rel), key=lambda t: t[1])
    assert rel <= 1e-3, f"{name}: relative gradient error {rel:.3g}"
  print(f"{impl}/{attention_impl}: worst relative gradient error {worst[1]:.3g} at {worst[0]}")


class TimmSimMIMEncoder(torch.nn.Module):
  """SimMIM's SwinTransformerForSimMIM.forward, written over timm's modules: patch embedding,
  then masked embeddings replaced by the mask token, then the stages and the final norm."""

  def __init__(self, swin_model):
    super().__init__()
    self.swin = swin_model
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, swin_model.embed_dim))

  def forward(self, x, mask):
    x = self.swin.patch_embed(x)  # timm >= 0.9 keeps NHWC
    w = mask.unsqueeze(-1).type_as(x)
    x = x * (1.0 - w) + self.mask_token * w
    return self.swin.norm(self.swin.layers(x))


def test_mask_token_path_matches_simmim_style_encoder():
  ref = TimmSimMIMEncoder(torch_ref.timm_swin("swin_tiny", 192, 6, num_classes=0))
  torch_ref.perturb_(ref, seed=5)
  ref.eval()
  model = torch_ref.flax_model_like("swin_tiny", 192, 6, num_classes=0, use_mask_token=True)
  state = {"encoder." + k.replace("swin.", "", 1): v for k, v in ref.state_dict().items()}
  params = torch_to_flax(state, model)
  x = torch_ref.images(2, 192)
  mask = (np.random.default_rng(4).random((2, 48, 48)) < 0.6).astype(np.int32)
  with torch.no_grad():
    expected = ref(torch_ref.to_nchw(x), torch.from_numpy(mask)).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda p, x, m: model.apply({"params": p}, x, m,
                                                          return_features=True))(params, x, mask))
    unmasked = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                           return_features=True))(params, x))
  diff = np.abs(got - expected).max()
  print(f"mask-token path: max |feature diff| = {diff:.3g}")
  assert got.shape == (2, 6, 6, 768)
  assert diff <= 1e-4
  # The mask must matter, or the comparison above would not test the token path.
  assert np.abs(unmasked - got).max() > 1e-2
