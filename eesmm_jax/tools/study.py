"""Does EESMM pay off? SimMIM against EESMM at equal epochs and at equal compute, on real images.

  python -m eesmm_jax.tools.study --preset digits --out /tmp/eesmm_study [--ablations]
  python -m eesmm_jax.tools.study --preset quick --out /tmp/eesmm_study_quick    # the tests' preset

The paper's claim is that EESMM's cheaper step (n images blended into one encoder input) buys
representations as good as SimMIM's. This runs the comparison on scikit-learn's 1,797 real digit
images (the demo's data and fixed train/test split), through the project's own code only:

* methods: no pretraining ('scratch', the same encoder at random init), SimMIM (num_mix = 1),
  EESMM n = 2 and n = 3. They share the encoder, data, augmentation, batch and optimizer
  (configs/demo.py's recipe at the preset's size); only the objective differs;
* budgets: several pretraining lengths per method, several seeds per cell;
* pretraining: `train.pretrain`, one workdir per run;
* evaluations of every encoder: a linear probe and a k-NN (cosine, k = 20) on its frozen pooled
  features (`probe`), and end-to-end fine-tuning through the fine-tune mode (`finetune.run`);
* compute: the train step's FLOPs as XLA counts them (`flops.step_flops`) times the steps run,
  and the trainer's measured step time;
* `--ablations`: EESMM n = 2 at one budget with each of mask mode shared / complementary, the
  subtract head, Loss3 (mix_loss_weight 1) and rotation.

Writes, under --out: study.json (one record per run), study.md (tables at equal epochs and at
equal compute, mean +- std over seeds, and which differences exceed the seed spread), study.png
(accuracy against pretraining FLOPs and against pretraining time). Each run lives in
runs/<name>/ (pretrain/, finetune/, console.log with the trainer's own lines, record.json).

Resumable: a run whose record.json exists is skipped (the record is written atomically once its
evaluations finish), and a half-done run resumes from its checkpoints, since the trainer and the
fine-tune mode resume from their workdirs. The console shows one progress line for the grid.
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

from eesmm_jax import cli, data
from eesmm_jax import finetune, probe, train
from eesmm_jax import step as step_lib
from eesmm_jax import workdir as workdir_lib
from eesmm_jax.configs import demo as demo_config
from eesmm_jax.tools import benchmark
from eesmm_jax.tools import flops
from eesmm_jax.tools import images as image_tools

NUM_CLASSES = 10          # the digits
KNN_K = 20
WARMUP_FRACTION = 0.1     # of every run, pretraining or fine-tuning (the demo's 5 of 50 epochs)
METHOD_NAMES = {"scratch": "scratch (no pretraining)", "simmim": "SimMIM"}
# The ablations of the issue, each one change to EESMM n = 2's objective.
ABLATIONS = (("mask_mode", "shared"), ("mask_mode", "complementary"), ("head", "subtract"),
             ("mix_loss_weight", 1.0), ("rotate", True))
# Equal-compute pairs: the cell whose FLOPs are nearest, if within this factor.
COMPUTE_MATCH = 1.5


@dataclasses.dataclass(frozen=True)
class Preset:
  """One study's grid (budgets, seeds) and recipe (model, batch, fine-tuning schedule)."""
  doc: str
  budgets: dict            # num_mix -> pretraining epochs (1 = SimMIM)
  seeds: tuple
  model: dict              # config.model fields of the encoder, as in configs/demo.py
  batch_size: int          # pretraining images per step, a multiple of every num_mix
  finetune_epochs: float
  finetune_batch: int
  ablation_epochs: float   # one of budgets[2]: the ablations' budget and baseline

  def recipe(self) -> dict:
    """What a finished run depends on besides its own cell (budgets and seeds do not count)."""
    return dict(model=self.model, batch_size=self.batch_size,
                finetune_epochs=self.finetune_epochs, finetune_batch=self.finetune_batch)


PRESETS = {
    "digits": Preset(
        doc="""The committed study (docs/study/): 34 min 55 s on the quiet 2-core CPU VM.

        A 32 px Swin with 4 px patches (8 x 8 tokens: one token per pixel of the original 8 x 8
        digit, so no content is lost; the demo's 2 px patches cost 4x the tokens) and the demo's
        widths. 96 images per step (a multiple of 1, 2 and 3; 14 steps an epoch). Budgets double
        (4, 8, 16 epochs), so EESMM n = 2 at 2E epochs meets SimMIM at E at nearly equal FLOPs
        (x1.04) and n = 3 at 8 meets SimMIM at 4 (x0.72); n = 3 gets that one budget, all the
        grid affords. Fine-tuning: 5 epochs at lr 3e-3 for every encoder (from scratch this
        reaches ~50%, 10 epochs ~57%: short, so pretraining has room to show).

        Why this size: timed on 2026-11-27 on this VM under a load average of 8-10 from other
        jobs (the demo config ran at 118 img/s there against 253-330 quiet: 2.5x slower), a run
        costs about 55 s of fixed overhead, each distinct pretraining length ~150 s of
        compilation once, pretraining 8 / 6 / 4.6 s an epoch (SimMIM / n=2 / n=3) and
        fine-tuning 12 s an epoch. The 24 runs then take ~90 min at that load, ~36 min on a
        quiet machine; --ablations adds 15 runs (~23 min quiet).""",
        budgets={1: (4, 8, 16), 2: (4, 8, 16), 3: (8,)},
        seeds=(0, 1, 2),
        model=dict(patch_size=4, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6)),
        batch_size=96, finetune_epochs=5, finetune_batch=64, ablation_epochs=8),
    "quick": Preset(
        doc="""Every record field in a couple of minutes (the tests run it): scratch, SimMIM and
        EESMM n = 2, two seeds each (the fewest that give a spread), a 1-block-per-stage Swin of
        width 16, two steps a run.""",
        budgets={1: (0.07,), 2: (0.07,)},
        seeds=(0, 1),
        model=dict(patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        batch_size=48, finetune_epochs=0.03, finetune_batch=16, ablation_epochs=0.07),
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
  """Every run of the study, cheapest cells first so that early tables cover every method."""
  runs = [Run("scratch", 0, 0, s) for s in preset.seeds]
  for n, budgets in preset.budgets.items():
    runs += [Run("simmim" if n == 1 else "eesmm", n, e, s) for e in budgets for s in preset.seeds]
  if ablations:
    runs += [Run("eesmm", 2, preset.ablation_epochs, s, (change,))
             for change in ABLATIONS for s in preset.seeds]
  return sorted(runs, key=lambda r: (bool(r.objective), r.epochs, r.num_mix, r.seed))


# ----------------------------------------------------------------------------------------------
# Configs: the demo's pretraining recipe and the fine-tune mode, at the preset's size.


def pretrain_config(preset: Preset, run: Run, data_dir: str) -> ml_collections.ConfigDict:
  """The demo's recipe (data, augmentation, masks, optimizer) with the preset's model and batch,
  the run's objective, length and seed."""
  c = demo_config.get_config()
  c.model.update(preset.model)
  c.seed = run.seed
  c.batch_size = preset.batch_size
  c.data.data_dir = data_dir
  c.objective.num_mix = run.num_mix
  c.objective.update(dict(run.objective))
  c.optim.epochs = run.epochs
  c.optim.warmup_epochs = WARMUP_FRACTION * run.epochs
  c.log_every = 5             # metrics.jsonl's step time is the run's pretraining time
  c.checkpoint_every = 50     # a multiple of log_every: a resumed run re-logs the same steps
  c.picture_every = 0         # the study reads no pictures (the demo shows them)
  return c


def finetune_config(pretrain: ml_collections.ConfigDict, preset: Preset,
                    init_from: Optional[str]) -> ml_collections.ConfigDict:
  """A short fine-tuning of `pretrain`'s encoder on its data and seed, the same for every method
  (scratch too: its pretraining config only names the encoder, data and seed).

  The augmentation is pretraining's (random-resized crop, flip) plus label smoothing: SimMIM's
  RandAugment / mixup / cutmix / erasing recipe is made for 100 epochs of ImageNet and only
  slows a few-epoch run on 1,437 small images. lr 3e-3 (after the batch / 512 scaling): from
  scratch it beat 1e-3 at 10 epochs (57% against 52%). Evaluation sees the whole image (crop
  1.0): a digit fills its frame.
  """
  c = finetune.finetune_config()
  c.mode = "finetune"
  c.seed = pretrain.seed
  c.img_size = pretrain.img_size
  for key in ("name", "patch_size", "window_size", "embed_dim", "depths", "num_heads"):
    c.model[key] = pretrain.model[key]
  c.model.num_classes = NUM_CLASSES
  c.init_from = init_from
  c.data.update(dict(dataset=pretrain.data.dataset, data_dir=pretrain.data.data_dir,
                     split="train", eval_split="test", crop_scale=pretrain.data.crop_scale,
                     eval_crop_pct=1.0))
  c.aug.update(dict(randaug_num_ops=0, reprob=0.0, mixup=0.0, cutmix=0.0))
  c.batch_size = preset.finetune_batch
  c.eval_batch_size = 128
  c.optim.base_lr = 3e-3 * 512 / c.batch_size
  c.optim.epochs = preset.finetune_epochs
  c.optim.warmup_epochs = WARMUP_FRACTION * preset.finetune_epochs
  c.log_every = 10
  c.checkpoint_every = 100
  return c


# ----------------------------------------------------------------------------------------------
# The encoder and its evaluations.


def study_encoder(config: ml_collections.ConfigDict):
  """The Swin of `config.model` as pretraining builds it (mask token, no head): the one place
  the study builds an encoder, for the FLOPs count and the frozen features."""
  return step_lib.create_encoder(config, num_classes=0, use_mask_token=True)


def encoder_params(encoder, state, seed: int):
  """The pretrained encoder's params from `state`, what the trainer returned (restored from the
  workdir's last checkpoint when the run had finished before), or, without a state (scratch),
  a random init from `seed`."""
  if state is not None:
    return state.params["encoder"]
  x = np.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), np.float32)
  return jax.jit(encoder.init)(jax.random.PRNGKey(seed), x)["params"]


def eval_images(preset: Preset, data_dir: str) -> dict:
  """{split: [eval batches]} of the train and test splits as the fine-tune mode evaluates them
  (whole images): read once, for every encoder's frozen features."""
  config = finetune_config(pretrain_config(preset, Run("scratch", 0, 0, 0), data_dir), preset,
                           None)
  return {split: list(data.create_eval_iterator(config.data, 256, split))
          for split in ("train", "test")}


def frozen_features(encoder, params, images: dict) -> dict:
  """{split: (pooled features [N, C], labels [N])}, both splits in one pass (one trace)."""
  x, y = probe.extract_features(encoder, params, images["train"] + images["test"])
  n = sum(int(b["mask"].sum()) for b in images["train"])
  return {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}


def frozen_scores(train_xy: tuple, test_xy: tuple) -> dict:
  """Linear probe and k-NN top-1 on the test split, from (features, labels) of both splits."""
  return dict(probe_acc=probe.linear_probe_accuracy(train_xy, test_xy, NUM_CLASSES),
              knn_acc=probe.knn_accuracy(train_xy, test_xy, NUM_CLASSES, k=KNN_K))


def finetune_top1(workdir: str) -> float:
  """The fine-tune mode's final evaluation (its eval.json, written after the last step)."""
  with open(os.path.join(workdir, "eval.json")) as f:
    return float(json.load(f)["top1"])


def trainer_seconds(workdir: str, batch_size: int) -> float:
  """Pretraining time as the trainer measured it: each metrics.jsonl row's steps at its
  images/s. Compilation is left out (the trainer times from the end of each session's first
  step), so a run that hit the compilation cache and one that did not, or one that was resumed,
  read the same; steps re-run after a resume count once."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      rows[row["step"]] = row["images_per_sec"]
  seconds, previous = 0.0, 0
  for step in sorted(rows):
    seconds += (step - previous) * batch_size / rows[step]
    previous = step
  return seconds


_FLOPS: dict = {}


def flops_per_step(config: ml_collections.ConfigDict) -> float:
  """XLA's FLOPs of one pretraining step of `config` (`flops.step_flops`), compiled once per
  model, objective and batch: seeds and budgets share it."""
  key = json.dumps([config.model.to_dict(), config.objective.to_dict(), config.batch_size,
                    config.dtype], sort_keys=True)
  if key not in _FLOPS:
    encoder = study_encoder(config)
    _FLOPS[key] = flops.step_flops(encoder, config.objective, config.batch_size)
  return _FLOPS[key]


# ----------------------------------------------------------------------------------------------
# One run, and the grid.


def fingerprint(preset: Preset, run: Run) -> str:
  """Names what a record was computed with, so a rerun never mixes in another recipe's run."""
  text = json.dumps([preset.recipe(), dataclasses.asdict(run)], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(run_dir: str, preset: Preset, run: Run) -> Optional[dict]:
  """The finished run's record, or None if it has not finished."""
  try:
    with open(os.path.join(run_dir, "record.json")) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  if record["fingerprint"] != fingerprint(preset, run):
    raise ValueError(f"{run_dir} holds run {run.name} of another recipe (model, batch or "
                     f"fine-tuning): use another --out, or remove that run to redo it")
  return record


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


def execute(preset: Preset, run: Run, run_dir: str, data_dir: str, images: dict,
            phase: Callable[[str], None]) -> dict:
  """Pretrains (unless scratch), evaluates the frozen encoder, fine-tunes; -> the run's record.

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
      record["pretrain_seconds"] = trainer_seconds(pretrain_dir, config.batch_size)
    phase("linear probe and k-NN")
    encoder = study_encoder(config)
    features = frozen_features(encoder, encoder_params(encoder, state, run.seed), images)
    record.update(frozen_scores(features["train"], features["test"]))
    phase("fine-tuning")
    finetune_dir = os.path.join(run_dir, "finetune")
    finetune.run(finetune_config(config, preset, pretrain_dir if run.num_mix else None),
                 finetune_dir)
    record["finetune_acc"] = finetune_top1(finetune_dir)
  record.update(workdir=run_dir, fingerprint=fingerprint(preset, run))
  workdir_lib.write_json_atomically(os.path.join(run_dir, "record.json"), record)
  return record


class Progress:
  """One console line for the whole grid: runs done / total, elapsed, ETA, what runs now.

  The ETA weighs each run by its encoder passes over the training set (pretraining epochs / n,
  plus the fine-tuning epochs, plus one for compilation and the frozen evaluations) and
  extrapolates this session's time per pass; runs finished before this session count as done.
  """

  def __init__(self, preset: Preset, runs: list[Run]):
    self.stream = sys.stdout  # the console, also while a run's lines go to its console.log
    self.total, self.done = len(runs), 0
    self.work_left = sum(self.work(preset, r) for r in runs)
    self.work_done = 0.0
    self.start = time.time()
    self.tty = self.stream.isatty()

  @staticmethod
  def work(preset: Preset, run: Run) -> float:
    return (run.epochs / run.num_mix if run.num_mix else 0.0) + preset.finetune_epochs + 1.0

  def finished(self, work: float, ran: bool) -> None:
    self.done += 1
    self.work_left -= work
    if ran:
      self.work_done += work

  def show(self, what: str) -> None:
    elapsed = time.time() - self.start
    eta = (_hms(max(0.0, elapsed / self.work_done * self.work_left)) if self.work_done
           else "--:--:--")
    line = (f"study: {self.done}/{self.total} runs done  elapsed {_hms(elapsed)}  ETA {eta}  "
            f"| {what}")
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


def run_study(preset_name: str, out: str, ablations: bool = False) -> list[dict]:
  """Every run of the grid not finished yet, then study.json, study.md and study.png."""
  start = time.time()
  command = (f"python -m eesmm_jax.tools.study --preset {preset_name} --out {out}"
             + " --ablations" * ablations)
  preset = PRESETS[preset_name]
  out = os.path.abspath(out)
  data_dir = image_tools.write_digits_folder(os.path.join(out, "digits"))
  images = eval_images(preset, data_dir)
  runs = grid(preset, ablations)
  progress = Progress(preset, runs)
  records = []
  try:
    for run in runs:
      run_dir = os.path.join(out, "runs", run.name)
      record = read_record(run_dir, preset, run)
      ran = record is None
      if ran:
        os.makedirs(run_dir, exist_ok=True)
        cell = dataclasses.asdict(run) | dict(ablation=run.ablation)
        label = f"{cell_label(cell)}, seed {run.seed}"
        record = execute(preset, run, run_dir, data_dir, images,
                         lambda what: progress.show(f"{label}: {what}"))
      progress.finished(Progress.work(preset, run), ran)
      records.append(record)
    progress.show(f"writing {out}/study.json, study.md, study.png")
  finally:
    progress.close()
  write_outputs(out, records, preset_name, command, time.time() - start)
  return records


# ----------------------------------------------------------------------------------------------
# Outputs: cells (mean and spread over seeds), study.md, study.png.

METRICS = (("probe_acc", "linear probe"), ("knn_acc", f"k-NN (k={KNN_K})"),
           ("finetune_acc", "fine-tune"))
COSTS = ("pretrain_flops", "pretrain_seconds")


def summarize(records: list[dict]) -> list[dict]:
  """One cell per (ablation, method, num_mix, epochs): mean and sample std over its seeds."""
  groups = {}
  for r in records:
    groups.setdefault((r["ablation"], r["method"], r["num_mix"], r["epochs"]), []).append(r)
  cells = []
  for (ablation, method, num_mix, epochs), rows in sorted(groups.items()):
    cell = dict(ablation=ablation, method=method, num_mix=num_mix, epochs=epochs,
                seeds=len(rows), mean={}, std={})
    for key in [m for m, _ in METRICS] + list(COSTS):
      values = np.array([r[key] for r in rows], np.float64)
      cell["mean"][key] = float(values.mean())
      cell["std"][key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    cells.append(cell)
  return cells


def beyond_spread(a: dict, b: dict, key: str) -> bool:
  """A difference larger than the seed spread: the two cells' mean +- std ranges do not
  overlap (|mean_a - mean_b| > std_a + std_b)."""
  return abs(a["mean"][key] - b["mean"][key]) > a["std"][key] + b["std"][key]


def comparisons(cells: list[dict]) -> list[tuple[str, dict, dict]]:
  """(what, a, b) pairs whose a - b the study reports: EESMM against SimMIM at equal epochs and
  at (nearly) equal FLOPs, every pretrained cell against scratch, each ablation against its
  baseline (EESMM n = 2 at the same epochs)."""
  main = [c for c in cells if not c["ablation"]]
  find = lambda n, e: next((c for c in main if c["num_mix"] == n and c["epochs"] == e), None)
  scratch = find(0, 0)
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
    pairs += [("vs no pretraining", c, scratch) for c in simmim + eesmm]
  for c in cells:
    if c["ablation"] and find(c["num_mix"], c["epochs"]):
      pairs.append(("ablation", c, find(c["num_mix"], c["epochs"])))
  return pairs


def cell_label(c: dict) -> str:
  if not c["num_mix"]:
    return METHOD_NAMES["scratch"]
  text = f"{method_label(c['method'], c['num_mix'])} {c['epochs']:g} ep"
  return text + (f" ({c['ablation']})" if c["ablation"] else "")


def _pm(c: dict, key: str) -> str:
  return f"{100 * c['mean'][key]:.1f} ± {100 * c['std'][key]:.1f}"


def markdown(records: list[dict], preset_name: str, command: str, wall_seconds: float) -> str:
  preset = PRESETS[preset_name]
  cells = summarize(records)
  seeds = sorted({r["seed"] for r in records})
  lines = [
      f"# Does EESMM pay off? Preset `{preset_name}`", "",
      f"`{command}`: {len(records)} runs; this invocation took {_hms(wall_seconds)} "
      f"({benchmark.cpu_model()}, {os.cpu_count()} cores, "
      f"{jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}).", "",
      f"Encoder: Swin {preset.model}, 32 px; pretraining {preset.batch_size} images per step "
      f"(configs/demo.py's recipe otherwise); fine-tuning {preset.finetune_epochs:g} epochs at "
      f"batch {preset.finetune_batch}. Accuracies: top-1 (%) on the digits' fixed 360 test "
      f"images, mean ± std over seeds {seeds}. Pretraining FLOPs: XLA's count of one train step "
      f"times the steps; seconds: the trainer's measured step time (compilation excluded).", "",
      "## At equal epochs", "",
      "| epochs | method | seeds | pretrain TFLOPs | pretrain s | "
      + " | ".join(name for _, name in METRICS) + " |",
      "|---|---|---|---|---|" + "---|" * len(METRICS)]
  for c in sorted((c for c in cells if not c["ablation"]),
                  key=lambda c: (c["epochs"], c["num_mix"])):
    lines.append(f"| {c['epochs']:g} | {method_label(c['method'], c['num_mix'])} | {c['seeds']} "
                 f"| {c['mean']['pretrain_flops'] / 1e12:.3g} "
                 f"| {c['mean']['pretrain_seconds']:.1f} | "
                 + " | ".join(_pm(c, key) for key, _ in METRICS) + " |")
  ablations = [c for c in cells if c["ablation"]]
  if ablations:
    lines += ["", f"## Ablations (EESMM n=2, {preset.ablation_epochs:g} epochs; baseline: "
              "independent masks, split head, no Loss3, no rotation)", "",
              "| objective change | seeds | pretrain TFLOPs | "
              + " | ".join(name for _, name in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for c in ablations:
      lines.append(f"| {c['ablation']} | {c['seeds']} "
                   f"| {c['mean']['pretrain_flops'] / 1e12:.3g} | "
                   + " | ".join(_pm(c, key) for key, _ in METRICS) + " |")
  lines += ["", "## Differences (percentage points, first minus second)", "",
            "At equal compute each SimMIM budget meets the EESMM budget of nearest FLOPs (within "
            f"{COMPUTE_MATCH}x). **Bold**: larger than the seed spread, i.e. the two cells' "
            "mean ± std ranges do not overlap (|Δ| > std + std).", "",
            "| comparison | first | second | " + " | ".join(f"Δ {n}" for _, n in METRICS) + " |",
            "|---|---|---|" + "---|" * len(METRICS)]
  beyond = 0
  pairs = comparisons(cells)
  for what, a, b in pairs:
    deltas = []
    for key, _ in METRICS:
      text = f"{100 * (a['mean'][key] - b['mean'][key]):+.1f}"
      if beyond_spread(a, b, key):
        beyond += 1
        text = f"**{text}**"
      deltas.append(text)
    lines.append(f"| {what} | {cell_label(a)} | {cell_label(b)} | " + " | ".join(deltas) + " |")
  lines += ["", f"{beyond} of {len(pairs) * len(METRICS)} differences are larger than the seed "
            "spread.", ""]
  return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
  """Accuracy against pretraining FLOPs and against pretraining time: one line per method
  (mean over seeds, error bars one std), scratch as a band; one row per evaluation."""
  import matplotlib  # the `study` extra
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cells = [c for c in summarize(records) if not c["ablation"]]
  scratch = next((c for c in cells if not c["num_mix"]), None)
  fig, axes = plt.subplots(len(METRICS), 2, figsize=(11, 3.6 * len(METRICS)), squeeze=False)
  x_axes = (("pretrain_flops", 1e12, "pretraining compute (TFLOPs, XLA's count)"),
            ("pretrain_seconds", 1.0, "pretraining time (s, trainer's step time)"))
  for row, (key, name) in enumerate(METRICS):
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
      if scratch:
        mean, std = 100 * scratch["mean"][key], 100 * scratch["std"][key]
        ax.axhline(mean, color="grey", linestyle="--", label=METHOD_NAMES["scratch"])
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
      ax.set_xscale("log")
      ax.set_xlabel(x_label)
      ax.set_ylabel(f"{name} top-1 (%)")
      ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(out: str, records: list[dict], preset_name: str, command: str,
                  wall_seconds: float) -> None:
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(records, f, indent=1)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(markdown(records, preset_name, command, wall_seconds))
  plot(records, os.path.join(out, "study.png"),
       f"SimMIM vs EESMM on digits (preset '{preset_name}'): mean ± std over seeds")


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="python -m eesmm_jax.tools.study", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                      help="; ".join(f"{k}: {v.doc.splitlines()[0]}" for k, v in PRESETS.items()))
  parser.add_argument("--out", required=True, help="directory for the runs and study.*")
  parser.add_argument("--ablations", action="store_true",
                      help="also EESMM n=2 at the preset's ablation budget with each objective "
                           "change (mask mode, head, Loss3, rotation)")
  args = parser.parse_args(argv)
  # The console is for people: library logs (absl, Orbax) only when they warn, as the demo.
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Every seed and every rerun compiles the same steps again: keep them on disk.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out),
                                                                "jax_cache"))
  return run_study(args.preset, args.out, args.ablations)


if __name__ == "__main__":
  cli.run_main(main)
