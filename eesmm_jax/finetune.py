"""Fine-tuning, evaluation and linear probing of a pretrained Swin encoder, read top to bottom.

Three modes of the same command line (`config.mode`, see `finetune_config`):

* 'finetune': SimMIM's fine-tuning recipe (Sec. 4.1.2 of the EESMM paper): the pretrained encoder
  (ours, or a converted PyTorch SimMIM / Swin checkpoint) without the decoder, average pooling
  and a linear head; AdamW with layer-wise lr decay, warm-up plus cosine; drop path; RandAugment
  and random erasing in tf.data (`data.finetune_input`; the IDX datasets: a padded random crop
  and a flip in numpy, `data.idx`), mixup / cutmix / label smoothing on device
  (`augment`). A change of image or window size (192 / window 6 -> 224 / window 7) resizes the
  relative position bias tables bicubically (`convert`). Resumes from `workdir` like pretraining.
* 'eval': top-1 / top-5 of a classifier (`init_from`: a fine-tuning workdir, a .pth with a head,
  or a convert directory) on `data.eval_split`.
* 'probe': linear probe of a frozen encoder's pooled features (`probe.py`).

The trainer core (`step.py`) and the plan (`plan.py`) are shared with pretraining: mesh, global
batches, state, shardings, checkpoint checks, the jitted step (with the fp16 loss scale and the
non-finite stop), metrics and preemption. Evaluation counts every real example once: the eval
input pads the last batches of every process and marks padding in 'mask', and the step sums
masked counts over the global batch.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from eesmm_jax import augment
from eesmm_jax import config as config_lib
from eesmm_jax import data, probe
from eesmm_jax import plan as plan_lib
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax import workdir as workdir_lib
from eesmm_jax.models import swin
from eesmm_jax.models import weights

MODES = ("finetune", "eval", "probe")


def finetune_config() -> ml_collections.ConfigDict:
  """Every key the fine-tune / eval / probe modes read, with SimMIM's Swin-B 224 fine-tuning
  defaults (microsoft/SimMIM simmim_finetune__swin_base__img224_window7__100ep)."""
  c = config_lib.run_config(data.finetune_data_config())
  c.mode = "finetune"           # 'finetune' | 'eval' | 'probe'
  c.img_size = 224
  c.eval_batch_size = 1024      # padded: any dataset size works
  c.eval_every = 0              # steps; 0 = evaluate at the end only
  # finetune/probe start from init_from (also a pretraining or fine-tuning workdir: its latest
  # checkpoint); eval evaluates it. None = random init.
  c.model.window_size = 7
  c.model.drop_path_rate = 0.1     # SimMIM Swin-B 100 ep; the paper: B 0.2 / L 0.3 (800 ep)
  c.model.num_classes = ml_collections.config_dict.placeholder(int)  # None = the dataset's

  c.aug = augment.default_aug_config()

  c.optim.base_lr = 1.25e-3     # all three scaled by batch / 512
  c.optim.warmup_lr = 2.5e-7
  c.optim.min_lr = 2.5e-7
  c.optim.eps = 1e-8
  c.optim.layer_decay = 0.9     # 0.8 for 800-epoch pretrained models
  c.optim.warmup_epochs = 20
  c.optim.epochs = 100

  c.probe = ml_collections.ConfigDict()
  c.probe.steps = 500           # full-batch AdamW steps on standardised features
  c.probe.learning_rate = 0.05
  c.probe.weight_decay = 1e-3
  return c


# ----------------------------------------------------------------------------------------------
# The plan, and the weights to start from.


def _check(config: ml_collections.ConfigDict, workdir: str, num_devices: int) -> int:
  """Every check a mode needs before it compiles or reads an image; -> the number of classes."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} is unknown; choose one of {MODES} (or "
                     "'pretrain', with a pretraining config)")
  plan_lib.check_run_config(config, trains=config.mode == "finetune")
  step_lib.create_encoder(config)  # the model name, sizes and dtype
  data.check_data_config(config.data)
  classes = data.num_classes(config.data)
  if config.model.num_classes is not None and config.model.num_classes != classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{config.data.dataset!r} has {classes} classes: set it to {classes} or "
                     f"leave it None")
  if config.mode in ("eval", "probe") and not config.init_from:
    raise ValueError(f"config.mode={config.mode!r} needs config.init_from: the checkpoint to "
                     f"evaluate or probe")
  if config.mode == "eval" and os.path.isdir(config.init_from):
    _check_head_classes(config)
  for key in ("batch_size", "eval_batch_size"):
    if not isinstance(config[key], int) or config[key] < 1 or config[key] % num_devices:
      raise ValueError(f"config.{key}={config[key]} must be a positive multiple of the "
                       f"{num_devices} devices")
  if config.mode == "finetune":
    if config.batch_size % 2:
      raise ValueError(f"config.batch_size={config.batch_size} must be even (mixup pairs each "
                       "image with the reversed batch)")
    if config.eval_every < 0:
      raise ValueError(f"config.eval_every must be >= 0 (0 = at the end), got "
                       f"{config.eval_every}")
    augment.check_aug_config(config.aug)
    data.check_finetune_input(config.data, config.aug)
  plan_lib.check_workdir(workdir)
  return classes


def _check_head_classes(config) -> None:
  """The head of a fine-tuned workdir scores its own training classes: evaluating it on a
  folder whose classes are others (or in another order) would count right answers as wrong."""
  trained = workdir_lib.recorded_classes(config.init_from)
  current = data.class_names(config.data)
  if trained is None or current is None or trained == current:
    return
  only_trained = sorted(set(trained) - set(current))
  only_here = sorted(set(current) - set(trained))
  diff = "; ".join(part for part in (
      only_trained and f"{len(only_trained)} only in its training ({', '.join(only_trained[:5])})",
      only_here and f"{len(only_here)} only here ({', '.join(only_here[:5])})") if part)
  raise ValueError(f"init_from {config.init_from!r} was fine-tuned on other classes than "
                   f"{config.data.data_dir!r} split {config.data.split!r} has: "
                   f"{diff or 'the same names in another order'}; evaluate on its training data's "
                   f"classes")


def plan_finetuning(config, mesh, workdir: str, num_classes: int) -> plan_lib.Plan:
  """Fine-tuning's plan (`_check` done): the classifier, its loss, steps, optimizer, state."""
  model = step_lib.create_encoder(config, mesh, num_classes=num_classes)
  x = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
  return plan_lib.build(config, mesh, workdir, encoder=model, model=model,
                        loss_fn=make_loss_fn(model, num_classes, config.aug),
                        init_params=lambda rng: model.init(rng, x)["params"],
                        source=data.open_source(config.data), num_classes=num_classes)


def initial_params(config, model: swin.SwinTransformer, rng: jax.Array,
                   need_head: bool = False) -> dict:
  """Random init, overwritten by `config.init_from` where given (head: only if it fits)."""
  x = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
  params = jax.tree_util.tree_map(np.asarray, jax.jit(model.init)(rng, x)["params"])
  if not config.init_from:
    return params
  loaded, head_loaded = weights.load_weights(config.init_from, model)
  if need_head and not head_loaded:
    raise ValueError(f"config.init_from={config.init_from!r} has no classifier head with "
                     f"{model.num_classes} classes: 'eval' needs a fine-tuned model")
  if not head_loaded and model.num_classes:
    logging.info("init_from %s: no head for %d classes, a fresh one is trained",
                 config.init_from, model.num_classes)
  return weights.merge_params(params, loaded)


# ----------------------------------------------------------------------------------------------
# Steps.


def make_loss_fn(model: swin.SwinTransformer, num_classes: int, aug: ml_collections.ConfigDict):
  """loss_fn(params, batch, rng, train) for `step.make_train_step`: mixup / cutmix and label
  smoothing on device, soft-target cross-entropy, drop path."""

  def loss_fn(params, batch, rng, train: bool):
    mix_rng, dropout_rng = jax.random.split(rng)
    images = data.normalize(batch["image"])  # uint8 from the numpy input; floats unchanged
    images, targets = augment.mix_batch(mix_rng, images, batch["label"], num_classes, aug)
    logits = model.apply({"params": params}, images, train=train, rngs={"dropout": dropout_rng})
    loss = augment.soft_cross_entropy(logits, targets).mean()
    return loss, {}

  return loss_fn


def make_eval_step(model: swin.SwinTransformer):
  """(params, batch) -> sums over the real (mask) examples of the global batch."""

  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"]).astype(jnp.float32)
    labels, real = batch["label"], batch["mask"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = jnp.argmax(logits, -1) == labels
    hit5 = jnp.any(top5 == labels[:, None], axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = lambda hits: jnp.sum(hits & real, dtype=jnp.int32)
    return dict(correct_top1=count(hit1), correct_top5=count(hit5), count=count(real),
                loss_sum=jnp.sum(jnp.where(real, loss, 0.0)))

  return eval_step


def evaluate(eval_step, params, batches, data_sharding: NamedSharding) -> dict:
  """Top-1, top-5 and mean loss over every real example of `batches` (this process's padded
  eval batches; several processes each feed their own)."""
  totals = None
  for local in batches:
    batch = {k: sharding.global_batch_from_local(local[k], data_sharding)
             for k in ("image", "label", "mask")}
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("the evaluation split is empty")
  totals = jax.device_get(totals)
  n = int(totals["count"])
  return dict(top1=int(totals["correct_top1"]) / n, top5=int(totals["correct_top5"]) / n,
              loss=float(totals["loss_sum"]) / n, count=n)


def _eval_batches(config):
  return data.create_eval_iterator(config.data, config.eval_batch_size, split=config.data.eval_split)


def _write_json(workdir: str, name: str, row: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(row, f, indent=1)


# ----------------------------------------------------------------------------------------------
# The modes.


def run(config: ml_collections.ConfigDict, workdir: str, devices=None,
        stop_after: Optional[int] = None):
  """The command line's entry for `config.mode` in MODES."""
  if config.get("mode") not in MODES:
    raise ValueError(f"config.mode={config.get('mode')!r} is unknown; choose one of {MODES}")
  mesh = sharding.make_mesh(devices)
  workdir = os.path.abspath(workdir)
  num_classes = _check(config, workdir, mesh.size)
  if config.mode == "eval":
    return evaluate_checkpoint(config, workdir, mesh, num_classes)
  if config.mode == "probe":
    return linear_probe(config, workdir, num_classes)
  return finetune(config, workdir, mesh, num_classes, stop_after)


def evaluate_checkpoint(config, workdir: str, mesh, num_classes: int) -> dict:
  """'eval': top-1 / top-5 of init_from on data.eval_split -> <workdir>/eval.json."""
  model = step_lib.create_encoder(config, mesh, num_classes=num_classes)
  params = initial_params(config, model, jax.random.PRNGKey(config.seed), need_head=True)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  result = evaluate(jax.jit(make_eval_step(model)), params, _eval_batches(config),
                    NamedSharding(mesh, P("data")))
  result["init_from"] = config.init_from
  _write_json(workdir, "eval.json", result)
  print(f"eval {config.data.dataset}/{config.data.eval_split}: top-1 {result['top1']:.2%}  "
        f"top-5 {result['top5']:.2%}  ({result['count']} images)", flush=True)
  return result


def linear_probe(config, workdir: str, num_classes: int) -> dict:
  """'probe': frozen encoder, centre-crop pooled features of data.split and data.eval_split,
  a linear classifier -> <workdir>/probe.json."""
  if jax.process_count() > 1:
    raise ValueError("config.mode='probe' runs on one process (features are gathered in host "
                     "memory); launch it without several processes")
  encoder = step_lib.create_encoder(config, num_classes=0)
  params = initial_params(config, encoder, jax.random.PRNGKey(config.seed))

  def features(split):
    batches = data.create_eval_iterator(config.data, config.eval_batch_size, split=split)
    return probe.extract_features(encoder, params, batches)

  train_xy, test_xy = features(config.data.split), features(config.data.eval_split)
  predict, train_accuracy = probe.fit_linear_classifier(
      *train_xy, num_classes, steps=config.probe.steps,
      learning_rate=config.probe.learning_rate, weight_decay=config.probe.weight_decay)
  result = dict(top1=float((predict(test_xy[0]) == test_xy[1]).mean()),
                train_top1=train_accuracy, count=int(len(test_xy[1])),
                init_from=config.init_from)
  _write_json(workdir, "probe.json", result)
  print(f"linear probe {config.data.dataset}/{config.data.eval_split}: top-1 "
        f"{result['top1']:.2%} (train {train_accuracy:.2%}, {result['count']} test images)",
        flush=True)
  return result


def finetune(config, workdir: str, mesh, num_classes: int,
             stop_after: Optional[int] = None) -> step_lib.TrainState:
  """'finetune': trains as `config` says, resuming from `workdir` if it holds a checkpoint, and
  evaluates at the end; a run stopped after its last save still evaluates when restarted."""
  # --- The plan: classifier, loss, steps, optimizer, state and shardings.
  p = plan_finetuning(config, mesh, workdir, num_classes)
  steps = p.total_steps
  step_lib.use_compilation_cache(config.compilation_cache_dir)

  # --- Checkpoint restore, or init from the pretrained encoder.
  def init():
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # plan.new_state's split
    params = jax.device_put(initial_params(config, p.model, init_rng), p.state_sharding.params)
    return jax.jit(p.new_state, out_shardings=p.state_sharding)(jax.random.PRNGKey(config.seed),
                                                                 params)

  with workdir_lib.Run(p, init) as run:  # lock, config.json, restore (or init), metrics log
    state, start = run.state, run.start

    # --- The steps.
    s = config.img_size
    train_step = step_lib.compile_train_step(p, state, {
        "image": jax.ShapeDtypeStruct((config.batch_size, s, s, 3),
                                      data.finetune_image_dtype(config.data),
                                      sharding=p.data_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                      sharding=p.data_sharding)})
    # The evaluation compiles now too, not at its first use mid-run or after the last step.
    e = config.eval_batch_size
    eval_step = jax.jit(make_eval_step(p.model)).lower(state.params, {
        "image": jax.ShapeDtypeStruct((e, s, s, 3), jnp.float32, sharding=p.data_sharding),
        "label": jax.ShapeDtypeStruct((e,), jnp.int32, sharding=p.data_sharding),
        "mask": jax.ShapeDtypeStruct((e,), jnp.bool_, sharding=p.data_sharding)}).compile()

    # --- Loop: the input on a thread of its own (`step.BackgroundInput`).
    batches = step_lib.BackgroundInput(
        data.create_finetune_iterator(config.data, config.aug, config.batch_size,
                                      start_step=start),
        lambda local: {k: sharding.global_batch_from_local(local[k], p.data_sharding)
                       for k in ("image", "label")})
    last = steps if stop_after is None else min(steps, stop_after)

    def run_eval(step):
      result = evaluate(eval_step, state.params, _eval_batches(config), p.data_sharding)
      run.log.write_row(step, {f"eval_{k}": v for k, v in result.items()})
      if run.log.lead:
        print(f"step {step:>7d}  eval top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
              f"({result['count']} images)", flush=True)
      return result

    sharding.line_up_processes("first step")
    run.log.start(start)
    with batches:
      for step in range(start + 1, last + 1):
        state, metrics = train_step(state, next(batches))
        logged, periodic, preempted = run.boundary(step, last, metrics)
        if logged:
          run.log.write(step, metrics)
        if run.save(state, step, periodic, preempted):
          break
        if config.eval_every and step % config.eval_every == 0 and step != steps:
          run_eval(step)
    # The final evaluation comes after the final save, so it is recorded in eval.json: a run
    # stopped in between finds its last step saved and no eval.json for it, and evaluates now.
    if int(state.step) == steps and _final_eval_step(workdir) != steps:
      result = run_eval(steps)
      _write_json(workdir, "eval.json", {**result, "step": steps})
  return state


def _final_eval_step(workdir: str) -> Optional[int]:
  try:
    with open(os.path.join(workdir, "eval.json")) as f:
      return json.load(f).get("step")
  except (OSError, ValueError):
    return None
