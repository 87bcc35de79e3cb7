"""Does EESMM pay off? SimMIM against EESMM at equal epochs and at equal compute, on real images.

  python -m eesmm_jax.tools.study --preset cpu-fashion --out /tmp/study_cpu      # <= 60 min, 2 cores
  python -m eesmm_jax.tools.study --preset gpu-fashion --out /tmp/study_gpu      # one H200 / H100
  python -m eesmm_jax.tools.study --preset gpu-fashion --out /tmp/q --quick      # the same, tiny
  python -m eesmm_jax.tools.study --preset digits --out /tmp/eesmm_study         # the quick demo

The paper's claim is that EESMM's cheaper step (n images blended into one encoder input) buys
representations as good as SimMIM's. This runs the comparison through the project's own code
only, on Fashion-MNIST (IDX files read into memory by numpy: no TensorFlow, so the GPU preset
runs on accelerator images without it) or on scikit-learn's 1,797 digits (the demo's data,
through tf.data):

* methods: SimMIM (num_mix = 1), EESMM n = 2 and n = 3. They share the encoder, data,
  augmentation, batch and optimizer; only the objective differs;
* baselines, in every table: raw pixels (the same linear probe and k-NN on the pixels), the
  same encoder at random init (probe, k-NN) and fine-tuned from scratch ('scratch' runs);
* budgets: several pretraining lengths per method, so that EESMM n at n x E epochs meets SimMIM
  at E epochs at about equal FLOPs; several seeds per cell;
* evaluations of every encoder: a linear probe and a k-NN (cosine, k = 20) on its frozen pooled
  features (`probe`), and end-to-end fine-tuning (`finetune.run`) with all labels and, on
  Fashion-MNIST, with fixed class-balanced 10% and 1% subsets of them (the same images for every
  method and seed);
* compute: the train step's FLOPs (`flops.step_flops`, the project's one count) times the
  steps run, and the trainer's measured step time (`metrics.timed_seconds`).

Writes, under --out: study.json ({'runs': one record per run, 'baselines': pixels' probe and
k-NN, the random encoder's, scratch's fine-tuning at each label fraction, ...}), study.md
(tables at equal epochs and of differences at equal epochs and equal compute, mean +- std over
seeds, differences beyond the seed spread in bold), study.png (accuracy against pretraining
FLOPs and time), recon.png (the same test images through SimMIM and EESMM n = 2). Each run lives
in runs/<name>/ (pretrain/, finetune*/, console.log with the trainers' own lines, record.json).

Resumable: a run whose record.json exists is skipped (written atomically once its evaluations
finish); a corrupt one is named in one line and its run redone from the start; a half-done run
resumes from its checkpoints. A preset's time budget (the GPU preset's) stops starting runs
when the next one would not finish inside it; the grid runs seed by seed, so a cut leaves
whole seeds, and the same command carries on. The console shows one progress line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging as pylogging
import math
import os
import shutil
import sys
import time
from typing import Callable, Optional

if __name__ == "__main__":  # before JAX and TensorFlow allocate (tools/allocator.py says why)
  from eesmm_jax.tools import allocator
  allocator.setup()

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

from eesmm_jax import cli, convert, data
from eesmm_jax import finetune, objectives, pictures, probe, train
from eesmm_jax import metrics as metrics_lib
from eesmm_jax import step as step_lib
from eesmm_jax import workdir as workdir_lib
from eesmm_jax.configs import demo as demo_config
from eesmm_jax.tools.benchmark import cells as bench_cells
from eesmm_jax.tools import flops

NUM_CLASSES = 10          # the digits, Fashion-MNIST's classes
KNN_K = 20
METHOD_NAMES = {"scratch": "random init / scratch", "simmim": "SimMIM"}
# The ablations, each one change to EESMM n = 2's objective.
ABLATIONS = (("mask_mode", "shared"), ("mask_mode", "complementary"), ("head", "subtract"),
             ("mix_loss_weight", 1.0), ("rotate", True))
# Equal-compute pairs: the cell whose FLOPs are nearest, if within this factor.
COMPUTE_MATCH = 1.5
# Fine-tuning with this percentage of the training labels -> the record's key.
FRACTION_KEYS = {100: "finetune_acc", 10: "finetune_acc_10pct", 1: "finetune_acc_1pct"}
FIGURE_IMAGES = 8         # test images in recon.png (4 blends of EESMM n = 2)


@dataclasses.dataclass(frozen=True)
class Preset:
  """One study's grid (budgets, seeds) and recipe (data, model, pretraining, fine-tuning)."""
  doc: str
  source: str              # 'digits' (tf.data folder) | 'fashion_mnist' (numpy, IDX files)
  budgets: dict            # num_mix -> pretraining epochs (1 = SimMIM)
  seeds: tuple
  model: dict              # config.model fields of the encoder, as in configs/demo.py
  batch_size: int          # pretraining images per step, a multiple of every num_mix
  finetune_epochs: dict    # percent of the training labels -> fine-tuning epochs
  finetune_batch: int
  finetune_lr: float       # after SimMIM's batch / 512 scaling
  ablation_epochs: float   # one of budgets[2]: the ablations' budget and baseline
  train_split: str = "train"
  test_split: str = "test"
  pretrain_lr: Optional[float] = None   # after the batch / 512 scaling; None = configs/demo.py's
  objective: tuple = ()    # (key, value) changes to configs/demo.py's objective, every method
  layer_decay: float = 0.9             # fine-tuning a pretrained encoder
  scratch_layer_decay: float = 0.9     # fine-tuning from scratch
  warmup_fraction: float = 0.1         # of every run, pretraining or fine-tuning
  drop_path: float = 0.1               # fine-tuning
  crop_padding: Optional[int] = None   # fine-tuning's padded random crop (IDX); 0 = flip only
  label_smoothing: float = 0.1
  log_every: int = 5                   # pretraining (fine-tuning: 10)
  eval_batch: int = 128
  time_budget: Optional[float] = None  # seconds for the whole invocation; None = no limit
  sweep: tuple = ()        # ((lr, epochs), ...) of the scratch recipe's sweep (--sweep)
  quick: tuple = ()        # (field, value) changes that make --quick

  @property
  def fractions(self) -> tuple:
    return tuple(sorted(self.finetune_epochs, reverse=True))

  def recipe(self) -> dict:
    """What a finished run depends on besides its own cell (budgets, seeds and the time budget
    do not count)."""
    skip = {"doc", "budgets", "seeds", "ablation_epochs", "time_budget", "sweep", "quick"}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in skip}

  def quick_version(self) -> "Preset":
    return dataclasses.replace(self, **dict(self.quick))


_SMALL_SWIN = dict(patch_size=4, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6))
_TINY_SWIN = dict(patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
# Fashion-MNIST: SimMIM's local target normalisation (its window scaled with the image: 47 px of
# 192 is about 8 of 32, odd), block masks of 8 px (the demo's, 16 blocks of a 32 px image).
_FASHION_OBJECTIVE = (("norm_target", True), ("norm_target_patch_size", 7),
                      ("mask_patch_size", 8))
# --quick: the preset's structure (methods, budget ratios, label fractions) on a tiny Swin, a
# few hundred images and two seeds (the fewest that give a spread), a few steps a run.
_FASHION_QUICK = (("model", _TINY_SWIN), ("train_split", "train[:1000]"),
                  ("test_split", "test[:200]"), ("batch_size", 48), ("finetune_batch", 16),
                  ("seeds", (0, 1)), ("budgets", {1: (0.1,), 2: (0.1, 0.2), 3: (0.3,)}),
                  ("ablation_epochs", 0.1), ("finetune_epochs", {100: 0.05, 10: 0.2, 1: 1.0}),
                  ("log_every", 1), ("eval_batch", 100), ("time_budget", None),
                  ("sweep", ((3e-3, 0.05), (1e-3, 0.05))))

PRESETS = {
    "digits": Preset(
        doc="""The quick demo of the tool on scikit-learn's digits (docs/study/): ~35 min on the
        2-core CPU VM.

        A 32 px Swin with 4 px patches (8 x 8 tokens: one token per pixel of the original 8 x 8
        digit) and the demo's widths. 96 images per step (a multiple of 1, 2 and 3; 14 steps an
        epoch). Budgets double (4, 8, 16 epochs), so EESMM n = 2 at 2E epochs meets SimMIM at E
        at nearly equal FLOPs (x1.04) and n = 3 at 8 meets SimMIM at 4 (x0.72). Fine-tuning: 5
        epochs at lr 3e-3 for every encoder, with all labels only (1,437 images: their 1% is
        not one per class).""",
        source="digits",
        budgets={1: (4, 8, 16), 2: (4, 8, 16), 3: (8,)},
        seeds=(0, 1, 2), model=_SMALL_SWIN, batch_size=96, finetune_epochs={100: 5},
        finetune_batch=64, finetune_lr=3e-3, ablation_epochs=8),
    "quick": Preset(
        doc="""The digits demo in a couple of minutes (its tests run it): SimMIM and EESMM n = 2,
        two seeds each, a 1-block-per-stage Swin of width 16, two steps a run.""",
        source="digits",
        budgets={1: (0.07,), 2: (0.07,)}, seeds=(0, 1), model=_TINY_SWIN, batch_size=48,
        finetune_epochs={100: 0.03}, finetune_batch=16, finetune_lr=3e-3, ablation_epochs=0.07),
    "cpu-fashion": Preset(
        doc="""Fashion-MNIST on the 2-core CPU VM in <= 60 min: the first 4,800 training images,
        the first 1,000 test images, three seeds.

        Why a subset: the encoder (the digits preset's 32 px Swin, 4 px patches, widths 48/96)
        pretrains at ~1,350 img/s (SimMIM) and fine-tunes at ~1,300 img/s on the 2 cores
        (medians of the trainers' progress lines in its run of 2026-12-03, 38 min 29 s in
        all: docs/study_fashion), so the full 60,000 images would
        give a few epochs per run in the hour. 4,800 images (480 a class, 25 steps of 192 a
        pretraining epoch) afford 3 budgets of SimMIM and EESMM n = 2 (2, 4 and 8 epochs: n = 2
        at 2E meets SimMIM at E at about equal FLOPs) and n = 3 at 8, x 3 seeds, each encoder
        fine-tuned at 100 / 10 / 1% of the labels. Fine-tuning: the scratch recipe (see the
        gpu-fashion preset) at 12 epochs, 10%: 36, 1%: 120 (30% and 10% of the full run's
        steps). With the 4 px padded random crop as well, scratch reached only 63.6% in 12
        epochs (3 seeds, 2026-12-03); the flip alone, 80.8% (docs/study_fashion). The time
        budget stops starting runs at 3,500 s; the grid goes seed by seed, so what is done is
        whole seeds.""",
        source="fashion_mnist", train_split="train[:4800]", test_split="test[:1000]",
        budgets={1: (2, 4, 8), 2: (2, 4, 8), 3: (8,)}, seeds=(0, 1, 2), model=_SMALL_SWIN,
        batch_size=192, pretrain_lr=1.5e-3, objective=_FASHION_OBJECTIVE,
        finetune_epochs={100: 12, 10: 36, 1: 120}, finetune_batch=128, finetune_lr=2e-3,
        layer_decay=0.9, scratch_layer_decay=1.0, warmup_fraction=0.1, drop_path=0.1,
        crop_padding=0,
        log_every=25, eval_batch=500, ablation_epochs=4, time_budget=3500.0,
        sweep=((1e-3, 4), (2e-3, 4), (4e-3, 4), (2e-3, 8)), quick=_FASHION_QUICK),
    "gpu-fashion": Preset(
        doc="""Fashion-MNIST on one H200 / H100 in <= 7 min: all 60,000 training images, the
        10,000 test images, five seeds, longer budgets.

        The same encoder and objective as cpu-fashion at 384 images per pretraining step (156
        steps an epoch). Budgets: SimMIM 8 epochs, EESMM n = 2 at 8 and 16, n = 3 at 8 and 24.
        Fine-tuning from scratch: AdamW, warm-up then cosine, label smoothing 0.1, drop path 0.1,
        no layer decay (SimMIM's fine-tuning recipe without its ImageNet-sized RandAugment,
        mixup, cutmix and erasing, which slow a few-epoch run, and without the padded random
        crop: on 4,800 images for 12 epochs it cost this encoder 17 points, 63.6% against the
        flip alone's 81.0%, measured 2026-12-03) at lr 2e-3 for 30 epochs of batch 256 (on
        the 2-core CPU VM, seed 0, 2026-12-03: 90.69% in 30 epochs, 89.61% in 15; `--sweep
        2e-3:30`); the pretrained encoders get the same with SimMIM's layer decay 0.9. 10%: 90
        epochs, 1%: 300 (30% and 10% of the full run's steps). The time budget stops starting
        runs at 400 s; the grid goes seed by seed, so what is done is whole seeds, and the same
        command carries on with the next.""",
        source="fashion_mnist", train_split="train", test_split="test",
        budgets={1: (8,), 2: (8, 16), 3: (8, 24)}, seeds=(0, 1, 2, 3, 4), model=_SMALL_SWIN,
        batch_size=384, pretrain_lr=1.5e-3, objective=_FASHION_OBJECTIVE,
        finetune_epochs={100: 30, 10: 90, 1: 300}, finetune_batch=256, finetune_lr=2e-3,
        layer_decay=0.9, scratch_layer_decay=1.0, warmup_fraction=0.1, drop_path=0.1,
        crop_padding=0,
        log_every=50, eval_batch=1000, ablation_epochs=8, time_budget=400.0,
        sweep=((1e-3, 15), (2e-3, 15), (4e-3, 15), (2e-3, 30)), quick=_FASHION_QUICK),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One cell's one seed: method, num_mix (0 = scratch), pretraining epochs, seed, ablation."""
  method: str
  num_mix: int
  epochs: float
  seed: int
  objective: tuple = ()    # (key, value) changes to the objective config: an ablation

  @property
  def ablation(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.objective)

  @property
  def name(self) -> str:
    method = f"eesmm{self.num_mix}" if self.method == "eesmm" else self.method
    parts = [method] + ([f"ep{self.epochs:g}"] if self.num_mix else []) + [f"s{self.seed}"]
    return "_".join(parts + [f"{k}-{v}" for k, v in self.objective])


def grid(preset: Preset, ablations: bool) -> list[Run]:
  """Every run of the study, seed by seed (a time budget then cuts between whole seeds), each
  seed's cheapest cells first; the ablations last."""
  runs = []
  for s in preset.seeds:
    cells = [Run("scratch", 0, 0, s)]
    for n, budgets in preset.budgets.items():
      cells += [Run("simmim" if n == 1 else "eesmm", n, e, s) for e in budgets]
    runs += sorted(cells, key=lambda r: (r.epochs / max(r.num_mix, 1), r.num_mix))
  if ablations:
    runs += [Run("eesmm", 2, preset.ablation_epochs, s, (change,))
             for s in preset.seeds for change in ABLATIONS]
  return runs


# ----------------------------------------------------------------------------------------------
# Configs: configs/demo.py's pretraining recipe and the fine-tune mode, at the preset's size.


def pretrain_config(preset: Preset, run: Run, data_dir: Optional[str]
                    ) -> ml_collections.ConfigDict:
  """The demo's recipe (augmentation, masks, optimizer) with the preset's data, model, batch
  and objective changes, the run's objective, length and seed."""
  c = demo_config.get_config()
  c.model.update(preset.model)
  c.seed = run.seed
  c.batch_size = preset.batch_size
  c.data.dataset = "folder" if preset.source == "digits" else preset.source
  c.data.data_dir = data_dir
  c.data.split = preset.train_split
  if preset.pretrain_lr is not None:
    c.optim.base_lr = preset.pretrain_lr * 512 / preset.batch_size
  c.objective.update(dict(preset.objective))
  c.objective.num_mix = run.num_mix
  c.objective.update(dict(run.objective))
  c.optim.epochs = run.epochs
  c.optim.warmup_epochs = preset.warmup_fraction * run.epochs
  c.log_every = preset.log_every  # metrics.jsonl's step time is the run's pretraining time
  c.checkpoint_every = 10 * preset.log_every  # a multiple: a resumed run re-logs the same steps
  c.picture_every = 0             # the study draws its own figure (recon.png)
  return c


def label_split(preset: Preset, percent: int) -> str:
  """The training split of fine-tuning on `percent`% of the labels: a fixed class-balanced
  subset (`data.idx.balanced_subset`), the same for every method and seed."""
  return preset.train_split if percent == 100 else f"{preset.train_split}[{percent:g}%]"


def finetune_config(pretrain: ml_collections.ConfigDict, preset: Preset,
                    init_from: Optional[str], percent: int = 100,
                    lr: Optional[float] = None, epochs: Optional[float] = None
                    ) -> ml_collections.ConfigDict:
  """Fine-tuning of `pretrain`'s encoder on `percent`% of its data's labels, the same recipe
  for every pretrained encoder (layer decay `preset.layer_decay`) and from scratch (its
  pretraining config only names the encoder, data and seed; `preset.scratch_layer_decay`).

  The augmentation is the source's basic one (digits: pretraining's random-resized crop and
  flip; Fashion-MNIST: a padded random crop and a flip) plus label smoothing: SimMIM's
  RandAugment / mixup / cutmix / erasing recipe is made for 100 epochs of ImageNet and only
  slows a short run on small images. Evaluation sees the whole image. `lr`, `epochs`: the
  sweep's values instead of the preset's.
  """
  c = finetune.finetune_config()
  c.mode = "finetune"
  c.seed = pretrain.seed
  c.img_size = pretrain.img_size
  for key in ("name", "patch_size", "window_size", "embed_dim", "depths", "num_heads"):
    c.model[key] = pretrain.model[key]
  c.model.num_classes = NUM_CLASSES
  c.model.drop_path_rate = preset.drop_path
  c.init_from = init_from
  c.data.update(dict(dataset=pretrain.data.dataset, data_dir=pretrain.data.data_dir,
                     split=label_split(preset, percent), eval_split=preset.test_split,
                     crop_scale=pretrain.data.crop_scale, eval_crop_pct=1.0,
                     crop_padding=preset.crop_padding))
  c.aug.update(dict(randaug_num_ops=0, reprob=0.0, mixup=0.0, cutmix=0.0,
                    label_smoothing=preset.label_smoothing))
  c.batch_size = preset.finetune_batch
  c.eval_batch_size = preset.eval_batch
  c.optim.base_lr = (lr or preset.finetune_lr) * 512 / c.batch_size
  c.optim.layer_decay = preset.layer_decay if init_from else preset.scratch_layer_decay
  c.optim.epochs = epochs or preset.finetune_epochs[percent]
  c.optim.warmup_epochs = preset.warmup_fraction * c.optim.epochs
  c.log_every = 10
  c.checkpoint_every = 1000
  return c


# ----------------------------------------------------------------------------------------------
# The encoder and its evaluations.


def encoder_params(encoder, state, seed: int):
  """The pretrained encoder's params from `state`, what the trainer returned (restored from the
  workdir's last checkpoint when the run had finished before), or, without a state (scratch),
  a random init from `seed`."""
  if state is not None:
    return state.params["encoder"]
  x = np.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), np.float32)
  return jax.jit(encoder.init)(jax.random.PRNGKey(seed), x)["params"]


def eval_images(preset: Preset, data_dir: Optional[str]) -> dict:
  """{split: [eval batches]} of the training and test splits as the fine-tune mode evaluates
  them (whole images): read once, for every encoder's frozen features and the pixels'."""
  config = finetune_config(pretrain_config(preset, Run("scratch", 0, 0, 0), data_dir), preset,
                           None)
  return {key: list(data.create_eval_iterator(config.data, preset.eval_batch, split))
          for key, split in (("train", preset.train_split), ("test", preset.test_split))}


def frozen_features(encoder, params, images: dict) -> dict:
  """{split: (pooled features [N, C], labels [N])}, both splits in one pass (one trace)."""
  x, y = probe.extract_features(encoder, params, images["train"] + images["test"])
  n = sum(int(b["mask"].sum()) for b in images["train"])
  return {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}


def pixel_features(images: dict) -> dict:
  """{split: (pixels [N, S * S], labels [N])}: the images the encoders see, one channel (the
  grey images' three are one affine map of it), flattened."""
  out = {}
  for split, batches in images.items():
    keep = [b["mask"].astype(bool) for b in batches]
    x = np.concatenate([b["image"][k][..., 0].reshape(int(k.sum()), -1)
                        for b, k in zip(batches, keep)])
    out[split] = (x, np.concatenate([b["label"][k] for b, k in zip(batches, keep)]))
  return out


def frozen_scores(train_xy: tuple, test_xy: tuple) -> dict:
  """Linear probe and k-NN top-1 on the test split, from (features, labels) of both splits."""
  return dict(probe_acc=probe.linear_probe_accuracy(train_xy, test_xy, NUM_CLASSES),
              knn_acc=probe.knn_accuracy(train_xy, test_xy, NUM_CLASSES, k=KNN_K))


def finetune_top1(workdir: str) -> float:
  """The fine-tune mode's final evaluation (its eval.json, written after the last step)."""
  with open(os.path.join(workdir, "eval.json")) as f:
    return float(json.load(f)["top1"])


_FLOPS: dict = {}


def flops_per_step(config: ml_collections.ConfigDict) -> float:
  """`flops.step_flops` of `config`'s pretraining step, once per model, objective and batch:
  seeds and budgets share it."""
  key = json.dumps([config.model.to_dict(), config.objective.to_dict(), config.batch_size,
                    config.dtype], sort_keys=True)
  if key not in _FLOPS:
    _FLOPS[key] = flops.step_flops(config)
  return _FLOPS[key]


# ----------------------------------------------------------------------------------------------
# Records on disk: read back, or named and redone when corrupt.


def say(line: str) -> None:
  """One line on the study's console (its lines all start with 'study: ')."""
  sys.stdout.write(f"study: {line}\n")
  sys.stdout.flush()


def _load_json(path: str):
  """The JSON at `path`; None when absent; raises ValueError (one line) when unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def fingerprint(preset: Preset, run) -> str:
  """Names what a record was computed with, so a rerun never mixes in another recipe's run."""
  what = dataclasses.asdict(run) if dataclasses.is_dataclass(run) else run
  text = json.dumps([preset.recipe(), what], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


RECORD_KEYS = ("method", "num_mix", "epochs", "seed", "probe_acc", "knn_acc", "fingerprint")


def read_record(run_dir: str, preset: Preset, run: Run) -> Optional[dict]:
  """The finished run's record, or None if it has not finished. A corrupt record.json is named
  in one line and the run's folder removed, so the run is redone from the start; one of another
  recipe is refused."""
  path = os.path.join(run_dir, "record.json")
  try:
    record = _load_json(path)
    if record is not None and (not isinstance(record, dict)
                               or any(k not in record for k in RECORD_KEYS)):
      raise ValueError(f"{path} is corrupt (not a record: keys "
                       f"{sorted(record) if isinstance(record, dict) else type(record).__name__})")
  except ValueError as e:
    say(f"{e}: run {run.name} is redone")
    shutil.rmtree(run_dir)
    return None
  if record is None:
    return None
  if record["fingerprint"] != fingerprint(preset, run):
    raise ValueError(f"{run_dir} holds run {run.name} of another recipe (data, model, batch or "
                     f"fine-tuning): use another --out, or remove that run to redo it")
  return record


def check_previous_outputs(out: str) -> None:
  """A corrupt study.json from an earlier invocation is named; it is written again at the end
  from the runs' records (which are what a rerun reads back)."""
  path = os.path.join(out, "study.json")
  try:
    _load_json(path)
  except ValueError as e:
    say(f"{e}: it is written again from the runs' records")


def pixel_baseline(out: str, preset: Preset, images: dict) -> dict:
  """Raw pixels' linear probe and k-NN (the encoders' protocol), kept in pixels.json."""
  path = os.path.join(out, "pixels.json")
  key = fingerprint(preset, {"pixels": [preset.source, preset.train_split, preset.test_split]})
  try:
    kept = _load_json(path)
  except ValueError as e:
    say(f"{e}: the pixel baseline is computed again")
    kept = None
  if isinstance(kept, dict) and kept.get("fingerprint") == key and "probe_acc" in kept:
    return {k: kept[k] for k in ("probe_acc", "knn_acc")}
  pixels = pixel_features(images)
  scores = frozen_scores(pixels["train"], pixels["test"])
  workdir_lib.write_json_atomically(path, {**scores, "fingerprint": key,
                                           "dims": int(pixels["train"][0].shape[1])})
  return scores


@contextlib.contextmanager
def run_console(path: str):
  """One run's console lines (the trainers' progress) and library log records (Orbax warns on
  every restore of a pretraining checkpoint) go to its console.log, not to the study's console."""
  library_log = pylogging.getLogger("absl")
  with open(path, "a") as log, contextlib.redirect_stdout(log):
    handler = pylogging.StreamHandler(log)
    library_log.addHandler(handler)
    library_log.propagate = False
    try:
      yield
    finally:
      library_log.removeHandler(handler)
      library_log.propagate = True


def finetune_dirname(percent: int) -> str:
  return "finetune" if percent == 100 else f"finetune_{percent:g}pct"


# The pretrained params of the figure's runs, kept while the study runs (a rerun restores them).
_KEPT: dict = {}


def execute(preset: Preset, run: Run, run_dir: str, data_dir: Optional[str], images: dict,
            phase: Callable[[str], None]) -> dict:
  """Pretrains (unless scratch), evaluates the frozen encoder, fine-tunes at each label
  fraction; -> the run's record.

  The trainers' console lines go to run_dir/console.log: the study's console is its progress
  line. `phase(what)` reports each stage to it.
  """
  pretrain_dir = os.path.join(run_dir, "pretrain")
  record = dict(method=run.method, num_mix=run.num_mix, epochs=run.epochs, seed=run.seed,
                ablation=run.ablation, steps=0, batch_size=preset.batch_size,
                flops_per_step=0.0, pretrain_flops=0.0, pretrain_seconds=0.0)
  config = pretrain_config(preset, run, data_dir)
  state = None
  with run_console(os.path.join(run_dir, "console.log")):
    if run.num_mix:
      phase("pretraining")
      state = train.pretrain(config, pretrain_dir)
      record["steps"] = int(state.step)
      record["flops_per_step"] = flops_per_step(config)
      record["pretrain_flops"] = record["flops_per_step"] * record["steps"]
      # The trainer's measured step time (compilation excluded) over every step run.
      timed, seconds = metrics_lib.timed_seconds(pretrain_dir, config.batch_size)
      record["pretrain_seconds"] = seconds * record["steps"] / max(timed, 1)
      if run.num_mix in (1, 2) and not run.objective and run.seed == preset.seeds[0]:
        _KEPT[(run.num_mix, run.epochs)] = state.params
    phase("linear probe and k-NN")
    encoder = step_lib.create_encoder(config, num_classes=0, use_mask_token=True)
    features = frozen_features(encoder, encoder_params(encoder, state, run.seed), images)
    record.update(frozen_scores(features["train"], features["test"]))
    for percent, key in FRACTION_KEYS.items():
      if percent not in preset.finetune_epochs:
        record[key] = None
        continue
      phase(f"fine-tuning on {percent}% of the labels")
      finetune_dir = os.path.join(run_dir, finetune_dirname(percent))
      finetune.run(finetune_config(config, preset, pretrain_dir if run.num_mix else None,
                                   percent), finetune_dir)
      record[key] = finetune_top1(finetune_dir)
  record.update(workdir=run_dir, fingerprint=fingerprint(preset, run))
  workdir_lib.write_json_atomically(os.path.join(run_dir, "record.json"), record)
  return record


class Progress:
  """One console line for the whole grid: runs done / total, elapsed, ETA, what runs now.

  The ETA weighs each run by its encoder passes over the training set (pretraining epochs / n,
  plus the fine-tuning epochs times their label fractions, plus one for compilation and the
  frozen evaluations) and extrapolates this invocation's time per pass; runs finished before
  count as done. The time budget uses the same estimate.
  """

  def __init__(self, preset: Preset, runs: list[Run]):
    self.stream = sys.stdout  # the console, also while a run's lines go to its console.log
    self.preset = preset
    self.total, self.done = len(runs), 0
    self.work_left = sum(self.work(preset, r) for r in runs)
    self.work_done = 0.0
    self.start = time.time()
    self.tty = self.stream.isatty()

  @staticmethod
  def work(preset: Preset, run: Run) -> float:
    tuning = sum(e * p / 100 for p, e in preset.finetune_epochs.items())
    return (run.epochs / run.num_mix if run.num_mix else 0.0) + tuning + 1.0

  def finished(self, work: float, ran: bool) -> None:
    self.done += 1
    self.work_left -= work
    if ran:
      self.work_done += work

  def seconds_for(self, work: float) -> Optional[float]:
    elapsed = time.time() - self.start
    return elapsed / self.work_done * work if self.work_done else None

  def show(self, what: str) -> None:
    elapsed = time.time() - self.start
    eta = self.seconds_for(self.work_left)
    line = (f"study: {self.done}/{self.total} runs done  elapsed {_hms(elapsed)}  ETA "
            f"{_hms(max(0.0, eta)) if eta is not None else '--:--:--'}  | {what}")
    if self.tty:  # rewritten in place
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")


def _hms(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def method_label(method: str, num_mix: int) -> str:
  return METHOD_NAMES.get(method) or f"EESMM n={num_mix}"


def open_data(preset: Preset, out: str, data_dir: Optional[str]) -> Optional[str]:
  """The data folder of the preset: the digits written once under `out`, or the IDX files'
  folder (None: the dataset's default), checked before anything compiles."""
  if preset.source == "digits":
    from eesmm_jax.tools import images as image_tools  # TensorFlow and scikit-learn
    return image_tools.write_digits_folder(os.path.join(out, "digits"))
  config = pretrain_config(preset, Run("simmim", 1, 1, 0), data_dir)
  for split in (preset.train_split, preset.test_split):
    config.data.split = split
    data.check_data_config(config.data)
  return data_dir


def run_study(preset_name: str, out: str, ablations: bool = False, quick: bool = False,
              data_dir: Optional[str] = None, time_budget: Optional[float] = None) -> dict:
  """Every run of the grid not finished yet (within the time budget), then study.json,
  study.md, study.png and recon.png."""
  start = time.time()
  command = (f"python -m eesmm_jax.tools.study --preset {preset_name} --out {out}"
             + " --quick" * quick + " --ablations" * ablations
             + (f" --data_dir {data_dir}" if data_dir else "")
             + (f" --time_budget {time_budget:g}" if time_budget is not None else ""))
  preset = PRESETS[preset_name].quick_version() if quick else PRESETS[preset_name]
  budget = preset.time_budget if time_budget is None else (time_budget or None)
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  check_previous_outputs(out)
  data_dir = open_data(preset, out, data_dir)
  images = eval_images(preset, data_dir)
  pixels = pixel_baseline(out, preset, images)
  runs = grid(preset, ablations)
  progress = Progress(preset, runs)
  records, stopped = [], []
  try:
    for run in runs:
      run_dir = os.path.join(out, "runs", run.name)
      record = None if stopped else read_record(run_dir, preset, run)
      ran = record is None
      if ran:
        work = Progress.work(preset, run)
        needed = progress.seconds_for(work)
        if stopped or (budget and needed is not None
                       and time.time() - start + needed > budget):
          stopped.append(run.name)
          continue
        os.makedirs(run_dir, exist_ok=True)
        cell = dataclasses.asdict(run) | dict(ablation=run.ablation)
        label = f"{cell_label(cell)}, seed {run.seed}"
        record = execute(preset, run, run_dir, data_dir, images,
                         lambda what: progress.show(f"{label}: {what}"))
      progress.finished(Progress.work(preset, run), ran)
      records.append(record)
    progress.show(f"writing {out}/study.json, study.md, study.png, recon.png")
  finally:
    progress.close()
  if stopped:
    say(f"stopped at the time budget of {budget:g} s: {len(stopped)} of {len(runs)} runs not "
        f"started ({', '.join(stopped[:3])}{', ...' if len(stopped) > 3 else ''}); the same "
        f"command carries on")
  figure = draw_reconstructions(out, preset, records, data_dir, images)
  count = lambda split: sum(int(b["mask"].sum()) for b in images[split])
  study = dict(preset=preset_name, quick=quick, command=command, runs=records,
               train_examples=count("train"), test_examples=count("test"),
               baselines=baselines(records, pixels), recipe=preset.recipe(),
               time_budget=budget, runs_not_started=stopped, figure=figure)
  write_outputs(out, study, preset, time.time() - start)
  return study


# ----------------------------------------------------------------------------------------------
# The figure: the same test images through SimMIM and EESMM n = 2.


def draw_reconstructions(out: str, preset: Preset, records: list[dict], data_dir: Optional[str],
                         images: dict) -> Optional[dict]:
  """recon.png: the first test images through SimMIM and EESMM n = 2 of the first seed at the
  longest budget both have, with the same masks (both draw them from one key for the same
  number of images); reconstructions de-normalised (`objectives.denormalize_targets`) when the
  target is locally normalised. None when the grid has no such pair."""
  seed = preset.seeds[0]
  done = {(r["num_mix"], r["epochs"]) for r in records if r["seed"] == seed and not r["ablation"]}
  common = sorted(e for n, e in done if n == 1 and (2, e) in done)
  if not common:
    return None
  epochs = common[-1]
  test = np.concatenate([b["image"][b["mask"].astype(bool)] for b in images["test"]])
  x = jax.numpy.asarray(test[:FIGURE_IMAGES])
  auxes = {}
  for n in (1, 2):
    run = Run("simmim" if n == 1 else "eesmm", n, epochs, seed)
    config = pretrain_config(preset, run, data_dir)
    params = _KEPT.get((n, epochs))
    if params is None:  # finished before this invocation: its last checkpoint, read back
      params = convert.latest_checkpoint_params(os.path.join(out, "runs", run.name, "pretrain"),
                                                encoder_only=False)
    encoder = step_lib.create_encoder(config, num_classes=0, use_mask_token=True)
    model = objectives.build_model(config.objective, encoder)
    loss_fn = objectives.build_objective(config.objective, model)
    auxes[n] = jax.device_get(jax.jit(lambda p, v: loss_fn(p, v, jax.random.PRNGKey(0),
                                                           False)[1])(params, x))
  simmim, eesmm = auxes[1], auxes[2]
  rows = []
  for i in range(len(x)):
    rows.append([simmim["images"][i, 0], simmim["inputs"][i], simmim["reconstructions"][i, 0],
                 eesmm["inputs"][i // 2], eesmm["reconstructions"][i // 2, i % 2]])
  labels = ["original", "SimMIM input", "SimMIM recon", "EESMM n=2 input", "EESMM n=2 recon"]
  grid_image = pictures.tile_grid(rows, labels, [f"test {i}" for i in range(len(x))])
  from PIL import Image
  Image.fromarray(grid_image).save(os.path.join(out, "recon.png"))
  return dict(path="recon.png", epochs=epochs, seed=seed, test_images=int(len(x)))


# ----------------------------------------------------------------------------------------------
# Outputs: cells (mean and spread over seeds), baselines, study.md, study.png.

COSTS = ("pretrain_flops", "pretrain_seconds")


def metrics(preset: Preset) -> tuple:
  """(record key, column name) of every evaluation the preset makes."""
  return ((("probe_acc", "linear probe"), ("knn_acc", f"k-NN (k={KNN_K})"))
          + tuple((FRACTION_KEYS[p], "fine-tune" + ("" if p == 100 else f" {p:g}%"))
                  for p in preset.fractions))


def _stats(values: list) -> tuple:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  a = np.array(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(records: list[dict]) -> list[dict]:
  """One cell per (ablation, method, num_mix, epochs): mean and sample std over its seeds."""
  groups = {}
  for r in records:
    groups.setdefault((r["ablation"], r["method"], r["num_mix"], r["epochs"]), []).append(r)
  cells = []
  for (ablation, method, num_mix, epochs), rows in sorted(groups.items()):
    cell = dict(ablation=ablation, method=method, num_mix=num_mix, epochs=epochs,
                seeds=len(rows), mean={}, std={})
    for key in list(FRACTION_KEYS.values()) + ["probe_acc", "knn_acc"] + list(COSTS):
      cell["mean"][key], cell["std"][key] = _stats([r.get(key) for r in rows])
    cells.append(cell)
  return cells


def baselines(records: list[dict], pixels: dict) -> dict:
  """The `baselines` record: raw pixels' probe and k-NN; the random-init encoder's probe and
  k-NN and fine-tuning from scratch at each label fraction (mean, std, seeds)."""
  scratch = [r for r in records if r["method"] == "scratch"]
  stat = lambda key: dict(zip(("mean", "std"), _stats([r.get(key) for r in scratch])),
                          seeds=len(scratch))
  return dict(pixels=dict(pixels),
              random_init={k: stat(k) for k in ("probe_acc", "knn_acc")},
              scratch={k: stat(k) for k in FRACTION_KEYS.values()})


def pixel_cell(pixels: dict) -> dict:
  """The pixels as a cell of one deterministic 'seed' (std 0), for the tables."""
  mean = {k: None for k in list(FRACTION_KEYS.values()) + list(COSTS)}
  mean.update(probe_acc=pixels["probe_acc"], knn_acc=pixels["knn_acc"])
  return dict(ablation="", method="pixels", num_mix=-1, epochs=0, seeds=1, mean=mean,
              std={k: (0.0 if v is not None else None) for k, v in mean.items()})


def beyond_spread(a: dict, b: dict, key: str) -> bool:
  """A difference larger than the seed spread: the two cells' mean +- std ranges do not
  overlap (|mean_a - mean_b| > std_a + std_b)."""
  if a["mean"][key] is None or b["mean"][key] is None:
    return False
  return abs(a["mean"][key] - b["mean"][key]) > a["std"][key] + b["std"][key]


def comparisons(cells: list[dict]) -> list[tuple[str, dict, dict]]:
  """(what, a, b) pairs whose a - b the study reports: EESMM against SimMIM at equal epochs and
  at (nearly) equal FLOPs, every pretrained cell against random init / scratch and against the
  pixels (when given as a cell), each ablation against its baseline (EESMM n = 2 at the same
  epochs)."""
  main = [c for c in cells if not c["ablation"] and c["method"] != "pixels"]
  find = lambda n, e: next((c for c in main if c["num_mix"] == n and c["epochs"] == e), None)
  scratch = find(0, 0)
  pixels = next((c for c in cells if c["method"] == "pixels"), None)
  simmim = [c for c in main if c["num_mix"] == 1]
  eesmm = [c for c in main if c["num_mix"] > 1]
  pairs = []
  for c in eesmm:
    if find(1, c["epochs"]):
      pairs.append(("equal epochs", c, find(1, c["epochs"])))
  for s in simmim:
    for n in sorted({c["num_mix"] for c in eesmm}):
      same_n = [c for c in eesmm if c["num_mix"] == n]
      nearest = min(same_n, key=lambda c: abs(math.log(c["mean"]["pretrain_flops"] /
                                                       s["mean"]["pretrain_flops"])))
      ratio = nearest["mean"]["pretrain_flops"] / s["mean"]["pretrain_flops"]
      if 1 / COMPUTE_MATCH <= ratio <= COMPUTE_MATCH:
        pairs.append((f"equal compute (FLOPs x{ratio:.2f})", nearest, s))
  if scratch:
    pairs += [("vs random init / scratch", c, scratch) for c in simmim + eesmm]
  if pixels:
    pairs += [("vs raw pixels", c, pixels) for c in simmim + eesmm + ([scratch] if scratch
                                                                     else [])]
  for c in cells:
    if c["ablation"] and find(c["num_mix"], c["epochs"]):
      pairs.append(("ablation", c, find(c["num_mix"], c["epochs"])))
  return pairs


def cell_label(c: dict) -> str:
  if c["method"] == "pixels":
    return "raw pixels"
  if not c["num_mix"]:
    return METHOD_NAMES["scratch"]
  text = f"{method_label(c['method'], c['num_mix'])} {c['epochs']:g} ep"
  return text + (f" ({c['ablation']})" if c["ablation"] else "")


def _pm(c: dict, key: str) -> str:
  if c["mean"][key] is None:
    return "-"
  return f"{100 * c['mean'][key]:.1f} ± {100 * c['std'][key]:.1f}"


def budget_verdict(cells: list[dict], preset: Preset) -> str:
  """Where SimMIM's probe first beats the random encoder's by more than the seed spread."""
  scratch = next((c for c in cells if c["method"] == "scratch" and not c["ablation"]), None)
  simmim = sorted((c for c in cells if c["num_mix"] == 1 and not c["ablation"]),
                  key=lambda c: c["epochs"])
  if not scratch or not simmim:
    return "No SimMIM and random-init cells to compare."
  for c in simmim:
    if (c["mean"]["probe_acc"] - scratch["mean"]["probe_acc"]
        > c["std"]["probe_acc"] + scratch["std"]["probe_acc"]):
      return (f"SimMIM's linear probe beats the random-init encoder's by more than the seed "
              f"spread from {c['epochs']:g} epochs on ({_pm(c, 'probe_acc')} against "
              f"{_pm(scratch, 'probe_acc')}).")
  last = simmim[-1]
  return (f"SimMIM's linear probe does not beat the random-init encoder's by more than the seed "
          f"spread at any budget up to {last['epochs']:g} epochs ({_pm(last, 'probe_acc')} "
          f"against {_pm(scratch, 'probe_acc')}): the preset's compute ran out first.")


def markdown(study: dict, preset: Preset, wall_seconds: float) -> str:
  records = study["runs"]
  cols = metrics(preset)
  cells = summarize(records)
  pixels = pixel_cell(study["baselines"]["pixels"])
  scratch = next((c for c in cells if c["method"] == "scratch" and not c["ablation"]), None)
  seeds = sorted({r["seed"] for r in records})
  train_n = study.get("train_examples")
  lines = [
      f"# Does EESMM pay off? Preset `{study['preset']}`" + (" (--quick)" if study["quick"]
                                                             else ""), "",
      f"`{study['command']}`: {len(records)} runs; this invocation took {_hms(wall_seconds)} "
      f"({bench_cells.cpu_model()}, {os.cpu_count()} cores, "
      f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
      f"{time.strftime('%Y-%m-%d')}).", ""]
  if study["runs_not_started"]:
    lines += [f"**Stopped at the time budget** ({study['time_budget']:g} s): "
              f"{len(study['runs_not_started'])} runs not started; the same command carries on.",
              ""]
  lines += [
      "## Setup", "",
      f"* Data: {preset.source}, pretraining and fine-tuning on split `{preset.train_split}`"
      f"{f' ({train_n} images)' if train_n else ''}, every accuracy on split "
      f"`{preset.test_split}` ({study.get('test_examples')} images); "
      + ("28 px images zero-padded to 32 px (no interpolation), grey repeated to 3 channels."
         if preset.source != "digits" else "8 px digits resized to 32 px (bilinear)."),
      f"* Encoder: Swin {preset.model}, 32 px.",
      f"* Pretraining: {preset.batch_size} images per step, configs/demo.py's recipe "
      f"(AdamW, warm-up + cosine, random-resized crop and flip)"
      + (f" at lr {preset.pretrain_lr:g}" if preset.pretrain_lr else "")
      + (f", objective changes {dict(preset.objective)}" if preset.objective else "") + ".",
      f"* Frozen evaluations: a linear probe (full-batch AdamW on standardised pooled features) "
      f"and a cosine k-NN (k={KNN_K}); the same on the raw pixels.",
      f"* Fine-tuning: AdamW at lr {preset.finetune_lr:g} (after SimMIM's batch/512 scaling), "
      f"batch {preset.finetune_batch}, warm-up {preset.warmup_fraction:.0%} + cosine, label "
      f"smoothing {preset.label_smoothing}, drop path {preset.drop_path}; layer decay "
      f"{preset.scratch_layer_decay} from scratch, {preset.layer_decay} for every pretrained "
      f"encoder; epochs "
      + ", ".join(f"{e:g} at {p:g}% of the labels" for p, e in sorted(
          preset.finetune_epochs.items(), reverse=True))
      + (" (fixed class-balanced subsets, the same images for every method and seed)"
         if len(preset.finetune_epochs) > 1 else "") + ".",
      f"* Accuracies: top-1 (%) mean ± std over seeds {seeds}. Pretraining FLOPs: XLA's count "
      f"of one train step (`flops.step_flops`) times the steps; seconds: the trainer's "
      f"measured step time (compilation excluded).", "",
      "## Baselines", "",
      "| baseline | seeds | " + " | ".join(name for _, name in cols) + " |",
      "|---|---|" + "---|" * len(cols),
      "| raw pixels | - | " + " | ".join(_pm(pixels, k) for k, _ in cols) + " |"]
  if scratch:
    lines.append(f"| {METHOD_NAMES['scratch']} (frozen: random init; fine-tune: from scratch) "
                 f"| {scratch['seeds']} | " + " | ".join(_pm(scratch, k) for k, _ in cols)
                 + " |")
  lines += ["", "## At equal epochs", "",
            "| epochs | method | seeds | pretrain TFLOPs | pretrain s | "
            + " | ".join(name for _, name in cols) + " |",
            "|---|---|---|---|---|" + "---|" * len(cols),
            "| - | raw pixels | - | 0 | 0 | " + " | ".join(_pm(pixels, k) for k, _ in cols)
            + " |"]
  for c in sorted((c for c in cells if not c["ablation"]),
                  key=lambda c: (c["epochs"], c["num_mix"])):
    lines.append(f"| {c['epochs']:g} | {cell_label(c) if not c['num_mix'] else method_label(c['method'], c['num_mix'])} "
                 f"| {c['seeds']} | {(c['mean']['pretrain_flops'] or 0) / 1e12:.3g} "
                 f"| {c['mean']['pretrain_seconds'] or 0:.1f} | "
                 + " | ".join(_pm(c, key) for key, _ in cols) + " |")
  ablations = [c for c in cells if c["ablation"]]
  if ablations:
    lines += ["", f"## Ablations (EESMM n=2, {preset.ablation_epochs:g} epochs; baseline: "
              "independent masks, split head, no Loss3, no rotation)", "",
              "| objective change | seeds | pretrain TFLOPs | "
              + " | ".join(name for _, name in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    for c in ablations:
      lines.append(f"| {c['ablation']} | {c['seeds']} "
                   f"| {c['mean']['pretrain_flops'] / 1e12:.3g} | "
                   + " | ".join(_pm(c, key) for key, _ in cols) + " |")
  lines += ["", "## Differences (percentage points, first minus second)", "",
            "At equal compute each SimMIM budget meets the EESMM budget of nearest FLOPs (within "
            f"{COMPUTE_MATCH}x). **Bold**: larger than the seed spread, i.e. the two cells' "
            "mean ± std ranges do not overlap (|Δ| > std + std; the pixels' std is 0).", "",
            "| comparison | first | second | " + " | ".join(f"Δ {n}" for _, n in cols) + " |",
            "|---|---|---|" + "---|" * len(cols)]
  beyond, compared = 0, 0
  for what, a, b in comparisons(cells + [pixels]):
    deltas = []
    for key, _ in cols:
      if a["mean"][key] is None or b["mean"][key] is None:
        deltas.append("-")
        continue
      compared += 1
      text = f"{100 * (a['mean'][key] - b['mean'][key]):+.1f}"
      if beyond_spread(a, b, key):
        beyond += 1
        text = f"**{text}**"
      deltas.append(text)
    lines.append(f"| {what} | {cell_label(a)} | {cell_label(b)} | " + " | ".join(deltas) + " |")
  lines += ["", f"{beyond} of {compared} differences are larger than the seed spread.", "",
            "## Budget", "", budget_verdict(cells, preset), ""]
  if study.get("figure"):
    f = study["figure"]
    lines += ["## Reconstructions", "",
              f"![the same test images through SimMIM and EESMM n=2]({f['path']})", "",
              f"The first {f['test_images']} test images through SimMIM and EESMM n=2 of seed "
              f"{f['seed']} at {f['epochs']:g} epochs, with the same masks (60% of 8 px blocks); "
              "EESMM's input blends test images 2k and 2k+1. The decoder's whole output is "
              "shown"
              + (", de-normalised with each original's own local mean and std (the targets "
                 "are locally normalised), so a reconstruction looks like the image it "
                 "recovers." if dict(preset.objective).get("norm_target") else "."), ""]
  return "\n".join(lines)


def plot(study: dict, preset: Preset, path: str, title: str) -> bool:
  """Accuracy against pretraining FLOPs and against pretraining time: one line per method
  (mean over seeds, error bars one std), random init / scratch as a band, raw pixels dotted;
  one row per evaluation. False (and one line) where matplotlib is missing."""
  try:
    import matplotlib  # the `study` extra
  except ImportError:
    say("matplotlib is not installed: study.png is not drawn; the same command where it is "
        "draws it from the finished runs")
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = metrics(preset)
  cells = [c for c in summarize(study["runs"]) if not c["ablation"]]
  scratch = next((c for c in cells if not c["num_mix"]), None)
  pixels = study["baselines"]["pixels"]
  fig, axes = plt.subplots(len(cols), 2, figsize=(11, 3.4 * len(cols)), squeeze=False)
  x_axes = (("pretrain_flops", 1e12, "pretraining compute (TFLOPs, XLA's count)"),
            ("pretrain_seconds", 1.0, "pretraining time (s, trainer's step time)"))
  for row, (key, name) in enumerate(cols):
    for col, (x_key, unit, x_label) in enumerate(x_axes):
      ax = axes[row][col]
      for n in sorted({c["num_mix"] for c in cells if c["num_mix"]}):
        line = sorted((c for c in cells if c["num_mix"] == n), key=lambda c: c["epochs"])
        ax.errorbar([c["mean"][x_key] / unit for c in line],
                    [100 * c["mean"][key] for c in line],
                    yerr=[100 * c["std"][key] for c in line],
                    xerr=[c["std"][x_key] / unit for c in line],
                    marker="o", capsize=3, label=method_label(line[0]["method"], n))
        for c in line:
          ax.annotate(f"{c['epochs']:g} ep", (c["mean"][x_key] / unit, 100 * c["mean"][key]),
                      textcoords="offset points", xytext=(4, -10), fontsize=7)
      if scratch and scratch["mean"][key] is not None:
        mean, std = 100 * scratch["mean"][key], 100 * scratch["std"][key]
        ax.axhline(mean, color="grey", linestyle="--", label=METHOD_NAMES["scratch"])
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
      if key in pixels:
        ax.axhline(100 * pixels[key], color="black", linestyle=":", label="raw pixels")
      ax.set_xscale("log")
      ax.set_xlabel(x_label)
      ax.set_ylabel(f"{name} top-1 (%)")
      ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_outputs(out: str, study: dict, preset: Preset, wall_seconds: float) -> None:
  workdir_lib.write_json_atomically(os.path.join(out, "study.json"), study)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(markdown(study, preset, wall_seconds))
  plot(study, preset, os.path.join(out, "study.png"),
       f"SimMIM vs EESMM on {preset.source} (preset '{study['preset']}'"
       + (", --quick" if study["quick"] else "") + "): mean ± std over seeds")


# ----------------------------------------------------------------------------------------------
# The scratch recipe's sweep.


def sweep_point(text: str) -> tuple[float, float]:
  """'LR:EPOCHS' (e.g. '2e-3:15') -> (lr, epochs), both > 0."""
  try:
    lr, epochs = (float(v) for v in text.split(":"))
  except ValueError:
    lr = epochs = -1.0
  if not (lr > 0 and epochs > 0):
    raise ValueError(f"--sweep {text!r}: expected LR:EPOCHS, both positive (e.g. 2e-3:15)")
  return lr, epochs


def run_sweep(preset_name: str, out: str, quick: bool = False,
              data_dir: Optional[str] = None, points: Optional[tuple] = None) -> list[dict]:
  """Fine-tuning from scratch (first seed, all labels) at each (lr, epochs) of `points` (default
  preset.sweep): how the scratch recipe was chosen. -> rows, also in out/sweep.json and
  out/sweep.md."""
  start = time.time()
  preset = PRESETS[preset_name].quick_version() if quick else PRESETS[preset_name]
  if points:
    preset = dataclasses.replace(preset, sweep=tuple(points))
  if not preset.sweep:
    raise ValueError(f"preset {preset_name!r} has no sweep")
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  data_dir = open_data(preset, out, data_dir)
  pretrain = pretrain_config(preset, Run("scratch", 0, 0, preset.seeds[0]), data_dir)
  rows = []
  for lr, epochs in preset.sweep:
    run_dir = os.path.join(out, "sweep", f"lr{lr:g}_ep{epochs:g}")
    os.makedirs(run_dir, exist_ok=True)
    say(f"sweep: lr {lr:g}, {epochs:g} epochs")
    t = time.time()
    with run_console(os.path.join(run_dir, "console.log")):
      finetune.run(finetune_config(pretrain, preset, None, 100, lr=lr, epochs=epochs),
                   os.path.join(run_dir, "finetune"))
    rows.append(dict(lr=lr, epochs=epochs, finetune_acc=finetune_top1(
        os.path.join(run_dir, "finetune")), seconds=time.time() - t))
    say(f"sweep: lr {lr:g}, {epochs:g} epochs: top-1 {100 * rows[-1]['finetune_acc']:.2f}% "
        f"({_hms(rows[-1]['seconds'])}; the trainer's lines in {run_dir}/console.log)")
  workdir_lib.write_json_atomically(os.path.join(out, "sweep.json"), rows)
  lines = [f"# The scratch fine-tuning recipe's sweep, preset `{preset_name}`"
           + (" (--quick)" if quick else ""), "",
           f"Seed {preset.seeds[0]}, all labels of `{preset.train_split}`, test split "
           f"`{preset.test_split}`; batch {preset.finetune_batch}, the preset's recipe otherwise; "
           f"{_hms(time.time() - start)} on {jax.devices()[0].device_kind}.", "",
           "| lr | epochs | top-1 (%) | seconds |", "|---|---|---|---|"]
  lines += [f"| {r['lr']:g} | {r['epochs']:g} | {100 * r['finetune_acc']:.2f} | "
            f"{r['seconds']:.0f} |" for r in rows]
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  say(f"wrote {out}/sweep.json, sweep.md")
  return rows


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.study", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                      help="; ".join(f"{k}: {v.doc.splitlines()[0]}" for k, v in PRESETS.items()))
  parser.add_argument("--out", required=True, help="directory for the runs and study.*")
  parser.add_argument("--quick", action="store_true",
                      help="the preset's structure at a tiny size (a Fashion-MNIST preset: a "
                           "tiny Swin, 1,000 training and 200 test images, two seeds)")
  parser.add_argument("--data_dir", default=None,
                      help="the IDX files' folder (default: the dataset's, e.g. "
                           "/usr/share/datasets/fashion-mnist)")
  parser.add_argument("--time_budget", type=float, default=None,
                      help="seconds; no run starts that would end after it (default: the "
                           "preset's; 0 = none)")
  parser.add_argument("--ablations", action="store_true",
                      help="also EESMM n=2 at the preset's ablation budget with each objective "
                           "change (mask mode, head, Loss3, rotation)")
  parser.add_argument("--sweep", nargs="*", default=None, metavar="LR:EPOCHS",
                      help="instead of the study: the scratch fine-tuning recipe's lr / epochs "
                           "sweep (sweep.json, sweep.md), at the preset's points or at these")
  args = parser.parse_args(argv)
  if args.quick and not PRESETS[args.preset].quick:
    parser.error(f"--quick: preset {args.preset!r} has no quick version (the digits' is "
                 f"--preset quick)")
  # The console is for people: library logs (absl, Orbax) only when they warn, as the demo.
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Every seed and every rerun compiles the same steps again: the trainer's persistent cache,
  # from the first compile on (the trainer turns it on at its first run anyway).
  step_lib.use_compilation_cache(demo_config.get_config().compilation_cache_dir)
  try:
    if args.sweep is not None:
      return run_sweep(args.preset, args.out, args.quick, args.data_dir,
                       tuple(sweep_point(p) for p in args.sweep))
    return run_study(args.preset, args.out, args.ablations, args.quick, args.data_dir,
                     args.time_budget)
  except ValueError as e:
    if argv is not None:  # called from Python: the caller sees the error itself
      raise
    sys.exit(f"study: {e}")


if __name__ == "__main__":
  cli.run_main(main)
