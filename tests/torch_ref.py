"""The PyTorch reference side of the parity tests: timm's Swin with every parameter perturbed."""

import numpy as np
import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin

from eesmm_jax.models import swin

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def timm_swin(variant: str, img_size: int, window_size: int, num_classes: int = 1000,
              seed: int = 0, **overrides) -> TimmSwin:
  """A timm Swin with weights drawn so that every parameter matters: LayerNorm scales and biases
  away from 1 and 0, biases non-zero, bias tables O(1) so the relative position terms (and any
  mistake in their indexing) move the attention."""
  cfg = {**swin.VARIANTS[variant], **overrides}
  model = TimmSwin(img_size=img_size, window_size=window_size, num_classes=num_classes,
                   embed_dim=cfg["embed_dim"], depths=cfg["depths"], num_heads=cfg["num_heads"],
                   drop_path_rate=0.0)
  perturb_(model, seed)
  return model.eval()


def perturb_(module: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("relative_position_bias_table"):
        p.copy_(noise)
      elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:  # Linear / Conv weights: unit-variance outputs for unit-variance inputs
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[-1]
        p.copy_(noise / fan_in ** 0.5)


def flax_model_like(variant: str, img_size: int, window_size: int, num_classes: int = 1000,
                    **kwargs) -> swin.SwinTransformer:
  return swin.create_model(variant, img_size=img_size, window_size=window_size,
                           num_classes=num_classes, drop_path_rate=0.0, **kwargs)


def images(batch: int, img_size: int, seed: int = 1) -> np.ndarray:
  """NHWC float32 images, roughly ImageNet-normalised."""
  return np.random.default_rng(seed).standard_normal((batch, img_size, img_size, 3)).astype(
      np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
