"""The PyTorch reference: microsoft/SimMIM's train step on timm's Swin (the benchmark's torch
rows), and its SimMIM module, which the objective's parity test also runs."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from eesmm_jax.tools import flops
from eesmm_jax.tools.benchmark.cells import throughput_fields, timed_steps

class TorchSimMIM(torch.nn.Module):
  """microsoft/SimMIM's `SimMIM` over timm's Swin modules: the encoder's forward is
  SwinTransformerForSimMIM's (patch embedding, masked embeddings replaced by the mask token, the
  stages, the final norm), then a 1x1 Conv2d + PixelShuffle head and the masked L1 loss over the
  masked pixels and channels."""

  def __init__(self, encoder, stride: int):
    super().__init__()
    self.encoder = encoder
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
    torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
    self.decoder = torch.nn.Sequential(
        torch.nn.Conv2d(encoder.num_features, 3 * stride ** 2, 1), torch.nn.PixelShuffle(stride))

  def forward(self, x, mask):
    z = self.encoder.patch_embed(x)  # timm >= 0.9 keeps NHWC
    w = mask.unsqueeze(-1).type_as(z)
    z = z * (1.0 - w) + self.mask_token * w
    z = self.encoder.norm(self.encoder.layers(z)).permute(0, 3, 1, 2)
    x_rec = self.decoder(z)
    patch = x.shape[-1] // mask.shape[-1]
    m = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous()
    return (torch.abs(x - x_rec) * m).sum() / (m.sum() + 1e-5) / 3


def torch_step(backbone: str, img_size: int, window: int, batch: int, dtype: str, mode: str,
               mask_ratio: float = 0.6, mask_patch: int = 32) -> Callable[[], float]:
  """microsoft/SimMIM's train step on timm's Swin: eager, or `torch.compile` of forward + loss
  (backward and AdamW stay eager, as SimMIM's loop around a compiled model would run). Returns
  the step: a call that runs one and returns its loss (after the device finished it)."""
  from timm.models.swin_transformer import SwinTransformer as TimmSwin

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cfg = flops.BACKBONES[backbone]
  encoder = TimmSwin(img_size=img_size, window_size=window, embed_dim=cfg["embed_dim"],
                     depths=cfg["depths"], num_heads=cfg["num_heads"], num_classes=0,
                     drop_path_rate=0.0)
  model = TorchSimMIM(encoder, stride=4 * 2 ** (len(cfg["depths"]) - 1)).to(dev)
  decay = [p for n, p in model.named_parameters()
           if p.ndim > 1 and "relative_position_bias_table" not in n and "mask_token" not in n]
  no_decay = [p for n, p in model.named_parameters()
              if not (p.ndim > 1 and "relative_position_bias_table" not in n
                      and "mask_token" not in n)]
  opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
  forward = torch.compile(model) if mode == "compile" else model
  amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
  x = torch.randn(batch, 3, img_size, img_size, device=dev)
  blocks = (img_size // mask_patch) ** 2
  num_masked = math.ceil(blocks * mask_ratio)
  scale = mask_patch // 4

  def one_step():
    # SimMIM's mask generator, drawn on the device (JAX draws its masks inside the step too).
    order = torch.rand(batch, blocks, device=dev).argsort(1).argsort(1)
    mask = (order < num_masked).view(batch, img_size // mask_patch, img_size // mask_patch)
    mask = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).int()
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
      loss = forward(x, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    return loss.detach().item()  # waits for the step (CUDA included)

  return one_step


def torch_cell(backbone: str, img_size: int, window: int, batch: int, dtype: str, mode: str,
               warmup: int):
  """`torch_step` after its first step (eager: one step; compile: tracing, inductor's codegen
  and one step, which give the compile time) and `warmup` - 1 more: (one_step, finish), as
  `jax_cell`."""
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  one_step = torch_step(backbone, img_size, window, batch, dtype, mode)
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  loss = one_step()  # eager: the first step; compile: tracing + inductor codegen + first step
  first = time.perf_counter() - t
  timed_steps(one_step, 0, max(warmup - 1, 0))

  def finish(times: list[float]) -> dict:
    peak, source = None, "unavailable on CPU"
    if dev.type == "cuda":
      peak, source = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
      torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return dict(compile_time_s=max(first - statistics.median(times), 0.0), flops_per_image=None,
                peak_bytes=peak, peak_bytes_source=source, loss=loss,
                finite=math.isfinite(loss), device=f"1 x {name}", device_kind=name,
                num_devices=1, **throughput_fields(batch, times, 1))

  return one_step, finish


