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

import json
import os
import signal
import threading
import time
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from flax.training.dynamic_scale import DynamicScale
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from eesmm_jax import config as config_lib
from eesmm_jax import convert, input_pipeline, objectives, optim, pictures
from eesmm_jax.models import swin

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimizer micro-steps taken; also the data position
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32[2] key; the step's key is fold_in(rng, step)
  # fp16 only: the loss scale. Steps skipped for non-finite gradients: in a row, and in all.
  dynamic_scale: Optional[DynamicScale] = None
  skipped_in_a_row: jax.Array = 0
  skipped_steps: jax.Array = 0


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite: the run stops, its last checkpoint kept."""


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
  """(state, images) -> (state, metrics); images are the global batch [n*B, H, W, C].

  A step whose loss or gradients are not finite leaves params and optimizer state untouched.
  In fp16 that is the normal overflow handling of dynamic loss scaling (the scale halves); in
  fp32/bf16 the host stops the run on `metrics['finite'] == 0`.
  """

  def train_step(state: TrainState, images: jax.Array):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_of = lambda p: loss_fn(p, images, rng, True)
    if state.dynamic_scale is not None:
      dynamic_scale, finite, (loss, aux), grads = state.dynamic_scale.value_and_grad(
          loss_of, has_aux=True)(state.params)
    else:
      dynamic_scale = None
      (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(optax.apply_updates(state.params, updates), state.params)
    opt_state = keep(opt_state, state.opt_state)
    skipped = jnp.where(finite, 0, state.skipped_in_a_row + 1)
    skipped_steps = state.skipped_steps + (1 - finite.astype(jnp.int32))

    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step // accum_steps),
                   finite=finite.astype(jnp.int32), skipped_in_a_row=skipped,
                   skipped_steps=skipped_steps)
    if dynamic_scale is not None:
      metrics["loss_scale"] = dynamic_scale.scale
    for k in range(aux["loss_components"].shape[0]):
      metrics[f"loss_component_{k}"] = aux["loss_components"][k]
    if "loss_mix" in aux:
      metrics["loss_mix"] = aux["loss_mix"]
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          dynamic_scale=dynamic_scale, skipped_in_a_row=skipped,
                          skipped_steps=skipped_steps)
    return state, metrics

  return train_step


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Shard a tensor's largest dimension that divides evenly over `data`; replicate the rest
  (biases, norms and small tables cost little and sharding them would only add collectives)."""
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % num_shards == 0 and shape[d] >= num_shards:
      spec = [None] * len(shape)
      spec[d] = "data"
      return P(*spec)
  return P()


def state_shardings(state_shapes, mesh, fsdp: bool):
  """Everything replicated; with FSDP, params and optimizer state sharded over `data`."""
  replicated = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), state_shapes)
  if not fsdp:
    return replicated
  shard = lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.size) if x.ndim else P())
  return replicated.replace(params=jax.tree_util.tree_map(shard, state_shapes.params),
                            opt_state=jax.tree_util.tree_map(shard, state_shapes.opt_state))


def new_train_state(params, tx, rng, dtype: str) -> TrainState:
  """Step 0. fp16 has no headroom for Swin's activations and gradients: dynamic loss scaling."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=rng,
                    dynamic_scale=DynamicScale() if dtype == "float16" else None,
                    skipped_in_a_row=zero, skipped_steps=zero)


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Async Orbax saves into <workdir>/checkpoints, keeping the last `keep`. A save is written to
  a temporary directory and renamed when complete, so a kill never leaves a half checkpoint
  that a restart would pick up."""
  return ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def restore_or_init(manager, state_shapes, state_sharding, init):
  """The latest checkpoint, restored onto this run's shardings (which also reshards one saved
  on another number of devices, or with(out) FSDP); else `init()`. None if nothing to resume."""
  latest = manager.latest_step()
  if latest is None:
    return init()
  check_checkpoint_fits(manager.item_metadata(latest), state_shapes,
                        f"at step {latest} in {os.path.dirname(str(manager.directory))}")
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      state_shapes, state_sharding)
  state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
  logging.info("resumed from %s at step %d", manager.directory, int(state.step))
  return state


def check_finite(step: int, metrics: dict, state: TrainState, manager, max_skipped: int):
  """Stops the run on a non-finite step (fp32/bf16), or on too many skipped in a row (fp16).

  It reads one scalar back per step: a non-finite step must stop the run before it is saved.
  """
  if not int(metrics["finite"]) and state.dynamic_scale is None:
    raise NonFiniteError(
        f"step {step}: the loss or the gradients are not finite (loss "
        f"{float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}); stopping. "
        f"{last_good(manager)} Try a lower optim.base_lr, or dtype 'float32'.")
  if int(metrics["skipped_in_a_row"]) > max_skipped:
    raise NonFiniteError(
        f"step {step}: {int(metrics['skipped_in_a_row'])} fp16 steps in a row overflowed "
        f"(loss scale now {float(metrics['loss_scale']):g}): the loss itself is not finite, not "
        f"just the fp16 range. {last_good(manager)} Try dtype 'bfloat16' or 'float32', or a "
        f"lower lr.")


def save_checkpoint(manager, state, step: int, periodic: bool, preemption) -> bool:
  """Saves when `periodic` or when preempted; True when the run must stop (preemption)."""
  if preemption.reached(step):
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    print(f"preempted (SIGTERM): saved a checkpoint at step {step} in "
          f"{os.path.dirname(str(manager.directory))}; the same command resumes from it",
          flush=True)
    return True
  if periodic:
    manager.save(step, args=ocp.args.StandardSave(state))
  return False


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{'params/encoder/norm/scale': shape} with one spelling for dict keys, attributes and
  tuple indices, so a saved checkpoint's metadata and the state's shapes compare."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_checkpoint_fits(metadata, state_shapes, where: str) -> None:
  """Refuses a checkpoint of another model or shape before anything is loaded."""
  saved, wanted = _leaf_shapes(metadata), _leaf_shapes(state_shapes)
  for key, shape in wanted.items():
    if key not in saved:
      raise ValueError(f"the checkpoint {where} does not fit this config: it has no {key} "
                       f"(the model expects shape {shape}); it was written by another model "
                       f"or objective: use another --workdir, or the config that wrote it")
    if saved[key] != shape:
      raise ValueError(f"the checkpoint {where} does not fit this config: first mismatch at "
                       f"{key}: checkpoint shape {saved[key]}, model expects {shape}")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise ValueError(f"the checkpoint {where} does not fit this config: it holds "
                     f"{extra[:5]} that the model does not have")


def last_good(manager) -> str:
  step = manager.latest_step()
  if step is None:
    return "No checkpoint was saved yet."
  return f"The last good checkpoint (step {step}) is kept in {manager.directory}."


class Preemption:
  """SIGTERM (or JAX's preemption notice on several processes) -> stop at a step boundary.

  Several processes must stop at the same step, so there we use JAX's preemption sync point,
  which agrees on the step through the distributed runtime; one process catches SIGTERM itself.
  """

  def __init__(self):
    self.requested = threading.Event()
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested.is_set()

  def close(self):
    if hasattr(self, "previous"):
      signal.signal(signal.SIGTERM, self.previous)


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
    # TensorBoard only: the console line below is the human-readable log.
    self.writer = (metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
                   if self.lead else metric_writers.MultiWriter([]))
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
  # --- Mesh, and the config checked before anything compiles.
  mesh = make_mesh(devices)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  config_lib.validate(config, workdir, mesh.size)
  workdir = os.path.abspath(workdir)
  n = config.objective.num_mix

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

  # --- State shapes and shardings (params replicated unless FSDP, batch over `data`).
  def init_state(rng):
    init_rng, state_rng = jax.random.split(rng)
    return new_train_state(init_params(init_rng), tx, state_rng, config.dtype)

  state_shapes = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
  state_sharding = state_shardings(state_shapes, mesh, config.fsdp)

  # --- Checkpoint restore, or init (optionally from a converted PyTorch encoder).
  def init():
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    if not config.init_from:
      return state
    encoder = load_init_from(config.init_from, state.params["encoder"], model.encoder)
    params = jax.device_put({**state.params, "encoder": encoder}, state_sharding.params)
    opt_state = jax.jit(tx.init, out_shardings=state_sharding.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  state = restore_or_init(manager, state_shapes, state_sharding, init)
  start = int(state.step)

  # --- The step.
  train_step = jax.jit(make_train_step(loss_fn, tx, schedule, ocfg.accum_steps),
                       in_shardings=(state_sharding, data_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  picture_fn = jax.jit(lambda params, images, rng: loss_fn(params, images, rng, False)[1])

  # --- Loop.
  batches = input_pipeline.create_pretrain_iterator(config.data, config.batch_size,
                                                    start_step=start)
  # Unreadable files a folder source skips (logged by name when it was listed).
  num_bad_images = len(input_pipeline.bad_images(config.data))
  log = MetricsLog(workdir, steps, config.batch_size, mesh.size)
  log.start(start)
  preemption = Preemption()
  picture_batch = None
  last = steps if stop_after is None else min(steps, stop_after)
  try:
    for step in range(start + 1, last + 1):
      images = global_batch_from_local(next(batches)["image"], data_sharding)
      state, metrics = train_step(state, images)
      check_finite(step, metrics, state, manager, config.max_skipped_steps)
      if picture_batch is None:
        # Fixed images for the reconstruction grids, so the pictures compare over time.
        picture_batch = images[: min(n * 4, images.shape[0])]
      if step % config.log_every == 0 or step == last:
        log.write(step, {**metrics, "bad_images": num_bad_images})
      if step == start + 1:
        # Throughput is measured from here on: the first step includes compilation.
        jax.block_until_ready(metrics)
        if log.lead:
          print(f"compiled and ran step {step} in {time.perf_counter() - log.last_time:.1f} s",
                flush=True)
        log.start(step)  # a first logged row includes it
      if config.picture_every and (step % config.picture_every == 0 or step == steps):
        aux = picture_fn(state.params, picture_batch, jax.random.PRNGKey(config.seed))
        pictures.write_reconstructions(workdir, step, aux, log.writer)
      if save_checkpoint(manager, state, step, step % config.checkpoint_every == 0 or
                         step == last, preemption):
        break
  finally:
    # Saves already started finish; one cut short by a kill is never restored.
    manager.wait_until_finished()
    manager.close()
    log.close()
    preemption.close()
  return state
