"""The trainer: SimMIM / EESMM pretraining, read top to bottom.

mesh -> model and objective -> input -> optimizer -> state shapes and shardings -> checkpoint
restore (or init) -> jitted, sharded train step -> loop (metrics, pictures, checkpoints).

The batch is sharded over the mesh's `data` axis and the params are replicated; the step is one
`jax.jit` with explicit shardings, and XLA inserts the gradient all-reduce. Per-process batches
from tf.data become global arrays with `jax.make_array_from_process_local_data`, so the same code
runs on one CPU, on 4 V100s and on several hosts (`jax.distributed`).

Resuming is exact: the data order is a pure function of (seed, step) (see input_pipeline), the
step rng is `fold_in(rng, step)`, and the checkpoint holds params, optimizer state, step and rng.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.sharding import NamedSharding, PartitionSpec as P

from eesmm_jax import convert, input_pipeline, objectives, optim, pictures
from eesmm_jax.models import swin

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimizer micro-steps taken; also the data position
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32[2] key; the step's key is fold_in(rng, step)


# ----------------------------------------------------------------------------------------------
# Pieces the loop is built from (also used by the benchmark, probe and tests).


def create_encoder(config: ml_collections.ConfigDict, **overrides) -> swin.SwinTransformer:
  """The Swin named by config.model, with any of its fields that are set overriding the variant."""
  m = config.model
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  kwargs = dict(img_size=m.img_size, window_size=m.window_size, patch_size=m.patch_size,
                drop_path_rate=m.drop_path_rate, dtype=DTYPES[config.dtype])
  for key in ("embed_dim", "depths", "num_heads"):
    if m.get(key) is not None:
      kwargs[key] = tuple(m[key]) if key != "embed_dim" else m[key]
  kwargs.update(overrides)
  return swin.create_model(m.name, **kwargs)


def create_pretrain_model(config):
  encoder = create_encoder(config, num_classes=0, use_mask_token=True)
  return objectives.build_model(config.objective, encoder)


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `devices` (default: all of them, over all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA propagates shardings through the model (JAX's default is now Explicit).
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def global_batch_from_local(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> one global array sharded over `data`."""
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  return max(1, input_pipeline.num_examples(config.data) // config.batch_size)


def total_steps(config: ml_collections.ConfigDict) -> int:
  return int(config.total_steps or config.optim.epochs * steps_per_epoch(config))


def optim_config(config: ml_collections.ConfigDict, encoder) -> ml_collections.ConfigDict:
  """config.optim with the encoder's depths (for layer ids) and total_steps folded in."""
  c = ml_collections.ConfigDict(config.optim.to_dict(), type_safe=False)
  c.depths = tuple(encoder.depths)
  if config.total_steps:
    c.epochs = config.total_steps / steps_per_epoch(config)
  return c


def make_train_step(loss_fn, tx, schedule, accum_steps: int):
  """(state, images) -> (state, metrics); images are the global batch [n*B, H, W, C]."""

  def train_step(state: TrainState, images: jax.Array):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, images, rng, True), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step // accum_steps))
    for k in range(aux["loss_components"].shape[0]):
      metrics[f"loss_component_{k}"] = aux["loss_components"][k]
    if "loss_mix" in aux:
      metrics["loss_mix"] = aux["loss_mix"]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def load_init_from(path: str, encoder_params: Any, encoder) -> Any:
  """Encoder params from a PyTorch .pth (official, timm or SimMIM layout) or from a directory
  written by `python -m eesmm_jax.convert to-flax`."""
  if os.path.isdir(path):
    params, src_model = convert.load_flax(path)
    state = convert.flax_to_torch(params, src_model, layout="official")
  else:
    import torch  # the `torch` extra
    state = torch.load(path, map_location="cpu", weights_only=True)
  params, extra = convert.torch_to_flax(state, encoder, return_extra=True)
  if extra:
    logging.info("init_from %s: left out %d non-encoder tensors (%s ...)", path, len(extra),
                 sorted(extra)[0])
  return jax.tree_util.tree_map(lambda new, old: jnp.asarray(new, old.dtype), params,
                                encoder_params)


class MetricsLog:
  """Console progress line, TensorBoard (clu writer) and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, total: int, global_batch: int, num_devices: int):
    self.lead = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        os.path.join(workdir, "tensorboard"), just_logging=not self.lead, asynchronous=False)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.lead else None
    self.total, self.global_batch, self.num_devices = total, global_batch, num_devices
    self.last_step, self.last_time = None, None

  def start(self, step: int):
    self.last_step, self.last_time = step, time.perf_counter()

  def write(self, step: int, metrics: dict) -> dict:
    now = time.perf_counter()
    rate = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
    row.update(step=step, images_per_sec=rate,
               images_per_sec_per_device=rate / self.num_devices)
    self.writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
    if self.lead:
      self.jsonl.write(json.dumps(row) + "\n")
      self.jsonl.flush()
      eta = (self.total - step) * self.global_batch / max(rate, 1e-9)
      print(f"step {step:>7d}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
            f"{rate:8.1f} img/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
    return row

  def close(self):
    self.writer.close()
    if self.jsonl:
      self.jsonl.close()


# ----------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None,
                       stop_after: int | None = None) -> TrainState:
  """Pretrains as `config` says, resuming from `workdir` if it holds a checkpoint.

  `devices` restricts the mesh (tests compare 1 and 8 devices in one process). `stop_after`
  ends the run early, with a checkpoint, at that step, as an interrupted run would: the schedule
  still spans the whole run.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  # --- Mesh.
  mesh = make_mesh(devices)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  n = config.objective.num_mix
  if config.batch_size % (n * mesh.size):
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by num_mix x "
                     f"devices = {n} x {mesh.size}, so every device blends whole groups")

  # --- Model and objective.
  model = create_pretrain_model(config)
  loss_fn = objectives.build_objective(config.objective, model)

  # --- Optimizer.
  steps = total_steps(config)
  ocfg = optim_config(config, model.encoder)
  size = config.model.img_size
  sample = jnp.zeros((1, size, size, model.encoder.in_chans), jnp.float32)
  token_mask = jnp.zeros((1, size // model.encoder.patch_size, size // model.encoder.patch_size),
                         jnp.int32)
  init_params = lambda rng: model.init(rng, sample, token_mask)["params"]
  param_shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, schedule = optim.make_optimizer(ocfg, param_shapes, config.batch_size,
                                      steps_per_epoch(config))

  # --- State shapes and shardings (params replicated, batch over `data`).
  def init_state(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  state_shapes = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
  state_sharding = jax.tree_util.tree_map(lambda _: replicated, state_shapes)

  # --- Checkpoint restore, or init (optionally from a converted PyTorch encoder).
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  if manager.latest_step() is not None:
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shapes, state_sharding)
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    logging.info("resumed from %s at step %d", workdir, int(state.step))
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    if config.init_from:
      encoder = load_init_from(config.init_from, state.params["encoder"], model.encoder)
      params = {**state.params, "encoder": encoder}
      state = state.replace(params=jax.device_put(params, state_sharding.params),
                            opt_state=jax.jit(tx.init, out_shardings=state_sharding.opt_state)(
                                params))
  start = int(state.step)

  # --- The step.
  train_step = jax.jit(make_train_step(loss_fn, tx, schedule, ocfg.accum_steps),
                       in_shardings=(state_sharding, data_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  picture_fn = jax.jit(lambda params, images, rng: loss_fn(params, images, rng, False)[1])

  # --- Loop.
  batches = input_pipeline.create_pretrain_iterator(config.data, config.batch_size,
                                                    start_step=start)
  log = MetricsLog(workdir, steps, config.batch_size, mesh.size)
  log.start(start)
  metrics = None
  picture_batch = None
  last = steps if stop_after is None else min(steps, stop_after)
  for step in range(start + 1, last + 1):
    images = global_batch_from_local(next(batches)["image"], data_sharding)
    state, metrics = train_step(state, images)
    if picture_batch is None:
      # Fixed images for the reconstruction grids, so the pictures are comparable over time.
      picture_batch = images[: min(n * 4, images.shape[0])]
    if step % config.log_every == 0 or step == steps:
      log.write(step, metrics)
    if config.picture_every and (step % config.picture_every == 0 or step == steps):
      aux = picture_fn(state.params, picture_batch, jax.random.PRNGKey(config.seed))
      pictures.write_reconstructions(workdir, step, aux, log.writer)
    if step % config.checkpoint_every == 0 or step == last:
      manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  log.close()
  return state
