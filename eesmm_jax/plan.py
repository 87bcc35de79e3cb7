"""A run planned once: config -> model, loss, data size, steps, optimizer, state and shardings.

Every check happens here, before anything compiles or reads an image, and every run quantity is
computed here once: the loops (`train.py`, `finetune.py`) and the benchmark read them from the
`Plan`. Each bad value raises one ValueError naming the key and what would be accepted.

    mesh = sharding.make_mesh()
    p = plan.pretraining(config, mesh, workdir)   # finetune.plan_finetuning for the other modes
    p.total_steps, p.steps_per_epoch, p.tx, p.state_sharding, ...
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable, Optional

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from eesmm_jax import data, masking, objectives, optim
from eesmm_jax.data import device_augment
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax.models import weights


@dataclasses.dataclass(frozen=True)
class Plan:
  config: ml_collections.ConfigDict
  workdir: Optional[str]
  mesh: jax.sharding.Mesh
  encoder: Any                    # the Swin (pretraining: inside `model`, with a mask token)
  model: Any                      # what is trained: the MIM model, or the classifier
  loss_fn: Callable               # (params, batch, rng, train) -> (loss, aux)
  init_params: Callable           # rng -> params
  source: data.Source             # the training split, opened once: size, bad images, listing
  steps_per_epoch: int
  total_steps: int
  tx: Any
  schedule: Callable
  accum_steps: int
  state_shapes: step_lib.TrainState   # ShapeDtypeStructs
  state_sharding: step_lib.TrainState
  num_classes: int = 0
  group: int = 1                  # rows that belong together in a batch (EESMM: the n images)
  input_size: int = 0             # the side of the images the step takes: img_size, or the
                                  # stored size of prepared shards (cropped in the step)

  @property
  def num_examples(self) -> int:
    return self.source.num_examples

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def new_state(self, rng: jax.Array, params=None) -> step_lib.TrainState:
    """Step 0 from `rng` (the state's shapes are this function's): fresh params, or `params`."""
    init_rng, state_rng = jax.random.split(rng)
    params = self.init_params(init_rng) if params is None else params
    return step_lib.new_train_state(params, self.tx, state_rng, self.config.dtype)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_run_config(config: ml_collections.ConfigDict, trains: bool = True) -> None:
  """The keys every run reads (see `config.run_config`), checked before anything is built: the
  sizes everything else divides by, and the form of `init_from` (a .pth, a `convert to-flax`
  directory, a workdir with checkpoints), so a wrong path stops here, not inside the init."""
  sizes = {"img_size": config.img_size, "model.patch_size": config.model.patch_size,
           "model.window_size": config.model.window_size}
  for key, value in sizes.items():
    if not _positive_int(value):
      raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
  if config.init_from:
    try:
      weights.check_source(config.init_from)
    except ValueError as e:
      raise ValueError(f"config.init_from={e}") from None
  if not trains:
    return
  if not _positive_int(config.batch_size):
    raise ValueError(f"config.batch_size must be a positive integer (images per step, over all "
                     f"processes), got {config.batch_size!r}")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if not _positive_int(config[key]):
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
  picture_every = config.get("picture_every", 0)
  if not isinstance(picture_every, int) or picture_every < 0:
    raise ValueError(f"config.picture_every must be >= 0 (steps between reconstruction "
                     f"pictures; 0 = never), got {picture_every}")
  if config.total_steps is not None and config.total_steps < 1:
    raise ValueError(f"config.total_steps must be None (use optim.epochs) or >= 1, got "
                     f"{config.total_steps}")


def check_workdir(workdir: str) -> str:
  """The absolute workdir, created; refused when it cannot be written."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} is not writable ({e.strerror}); checkpoints, "
                     f"metrics and pictures go there") from None
  return workdir


def build(config, mesh, workdir, *, encoder, model, loss_fn, init_params, source: data.Source,
          num_classes: int = 0, group: int = 1) -> Plan:
  """The parts every training run shares: steps, optimizer and schedule, state and shardings."""
  k = config.micro_batches
  if not isinstance(k, int) or k < 1 or config.batch_size % (group * mesh.size * k):
    raise ValueError(f"config.micro_batches={k} must be an integer >= 1 such that batch_size "
                     f"{config.batch_size} divides into {k} slices of whole groups of {group} "
                     f"on each of the {mesh.size} devices (batch_size % {group} x {mesh.size} x "
                     f"micro_batches == 0)")
  steps_per_epoch = max(1, source.num_examples // config.batch_size)
  total_steps = int(config.total_steps or config.optim.epochs * steps_per_epoch)
  ocfg = ml_collections.ConfigDict(config.optim.to_dict())
  if config.total_steps:  # the schedule spans the steps asked for
    ocfg.epochs = config.total_steps / steps_per_epoch
  param_shapes = jax.eval_shape(init_params, jax.random.key(0))
  # Raises on a bad schedule (a warm-up longer than the run, bad milestones) before compiling.
  tx, schedule = optim.make_optimizer(ocfg, param_shapes, config.batch_size, steps_per_epoch,
                                      depths=encoder.depths)
  plan = Plan(config=config, workdir=workdir, mesh=mesh, encoder=encoder, model=model,
              loss_fn=loss_fn, init_params=init_params, source=source,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps, tx=tx,
              schedule=schedule, accum_steps=int(ocfg.accum_steps), state_shapes=None,
              state_sharding=None, num_classes=num_classes, group=group,
              input_size=int(source.image_size or config.img_size))
  state_shapes = jax.eval_shape(plan.new_state, jax.random.key_data(jax.random.key(0)))
  return dataclasses.replace(plan, state_shapes=state_shapes,
                             state_sharding=sharding.state_shardings(state_shapes, mesh, config.fsdp))


def pretraining(config: ml_collections.ConfigDict, mesh, workdir: Optional[str] = None,
                **encoder_overrides) -> Plan:
  """SimMIM / EESMM pretraining as `config` says, checked; `workdir` None plans without one
  (the benchmark). `encoder_overrides` change encoder fields (the benchmark's attention)."""
  check_run_config(config)
  encoder = step_lib.create_encoder(config, mesh, num_classes=0, use_mask_token=True,
                                    **encoder_overrides)
  c = config.objective
  try:
    masking.check_mask_args(config.img_size, c.mask_patch_size, encoder.patch_size, c.mask_ratio)
  except ValueError as e:
    raise ValueError(f"config.objective: {e}") from None
  objectives.check_objective_config(c)
  if not isinstance(config.batch_size, int) or config.batch_size % (c.num_mix * mesh.size):
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by num_mix x "
                     f"devices = {c.num_mix} x {mesh.size} (= {c.num_mix * mesh.size}), so "
                     f"every device blends whole groups of images")
  source = data.open_source(config.data)
  if workdir is not None:
    workdir = check_workdir(workdir)

  model = objectives.build_model(c, encoder)
  side = config.img_size // encoder.patch_size
  sample = jax.numpy.zeros((1, config.img_size, config.img_size, encoder.in_chans))
  tokens = jax.numpy.zeros((1, side, side), jax.numpy.int32)
  loss_fn = objectives.build_objective(c, model)
  if source.image_size:
    # Prepared shards hold stored-size images: SimMIM's crop and flip are the step's first
    # stage, on the device (tf.data sources arrive augmented).
    loss_fn = device_augment.augment_then(loss_fn, config.img_size, config.data.crop_scale,
                                          config.data.crop_ratio)
  return build(config, mesh, workdir, encoder=encoder, model=model,
               loss_fn=loss_fn,
               init_params=lambda rng: model.init(rng, sample, tokens)["params"],
               source=source, group=c.num_mix)
