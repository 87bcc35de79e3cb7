"""The pretraining config's shape: every key a run reads, with SimMIM Swin-B 192 defaults.

Config files in configs/ start from `pretrain_config()` and change what their experiment changes,
so each reads as a description of the experiment. `img_size` and `seed` are shared references:
`--config.img_size=224` moves the model and the input pipeline together.
"""

import os
import tempfile

import ml_collections

from eesmm_jax import input_pipeline, objectives, optim
from eesmm_jax.models import swin


def run_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys every run reads (pretraining and fine-tuning alike), around its `data` config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.img_size = 192
  # Compute dtype: 'float32', 'bfloat16' (A100/H100/TPU) or 'float16'; params stay float32.
  c.dtype = "float32"
  # Images per step over all processes (pretraining: n images make one blended sample).
  c.batch_size = 2048
  # Steps of the run; None = optim.epochs over the dataset.
  c.total_steps = ml_collections.config_dict.placeholder(int)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # Shard params and optimizer state over the data axis (FSDP) instead of replicating them.
  c.fsdp = False
  # fp16: a run stops when this many steps in a row overflow (the loss itself is then broken).
  c.max_skipped_steps = 20
  # Weights to start from: a PyTorch .pth (official, timm or SimMIM layout) or a directory
  # written by `python -m eesmm_jax.convert to-flax` (fine-tuning also takes a workdir).
  c.init_from = ml_collections.config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict()
  c.model.name = "swin_base"        # swin_tiny | swin_small | swin_base | swin_large
  c.model.img_size = c.get_ref("img_size")
  c.model.window_size = 6
  c.model.patch_size = 4
  c.model.drop_path_rate = 0.0
  # Set these to override the named variant (e.g. a tiny Swin for tests and the demo).
  c.model.embed_dim = ml_collections.config_dict.placeholder(int)
  c.model.depths = ml_collections.config_dict.placeholder(tuple)
  c.model.num_heads = ml_collections.config_dict.placeholder(tuple)

  c.data = data
  c.data.img_size = c.get_ref("img_size")
  c.data.seed = c.get_ref("seed")
  c.optim = optim.default_optim_config()
  return c


def pretrain_config() -> ml_collections.ConfigDict:
  """SimMIM's Swin-B 192/window 6 pretraining, EESMM's objective defaults (n = 2)."""
  c = run_config(input_pipeline.default_data_config())
  c.picture_every = 1000      # reconstruction grid PNG + TensorBoard image; 0 = never
  c.objective = objectives.default_objective_config()
  return c


def validate(config: ml_collections.ConfigDict, workdir: str, num_devices: int) -> None:
  """Every check a run needs, before anything compiles or reads data: each bad value raises a
  ValueError that names the key and what would be accepted."""
  from eesmm_jax import masking, train  # train imports this module

  if config.model.name not in swin.VARIANTS:
    raise ValueError(f"config.model.name={config.model.name!r} is unknown; choose one of "
                     f"{sorted(swin.VARIANTS)}")
  try:
    encoder = train.create_encoder(config, num_classes=0, use_mask_token=True)
  except ValueError as e:
    raise ValueError(f"config.img_size / config.model: {e}") from None
  c = config.objective
  try:
    masking.check_mask_args(config.img_size, c.mask_patch_size, encoder.patch_size, c.mask_ratio)
  except ValueError as e:
    raise ValueError(f"config.objective: {e}") from None
  objectives.check_objective_config(c)

  if not isinstance(config.batch_size, int) or config.batch_size % (c.num_mix * num_devices):
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by num_mix x "
                     f"devices = {c.num_mix} x {num_devices} (= {c.num_mix * num_devices}), so "
                     f"every device blends whole groups of images")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
  if config.total_steps is not None and config.total_steps < 1:
    raise ValueError(f"config.total_steps must be None (use optim.epochs) or >= 1, got "
                     f"{config.total_steps}")

  input_pipeline.check_data_config(config.data)
  # Builds the schedule once: refuses a warm-up longer than the run, bad milestones, ...
  optim.make_schedule(train.optim_config(config, encoder), config.batch_size,
                      train.steps_per_epoch(config))

  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} is not writable ({e.strerror}); checkpoints, "
                     f"metrics and pictures go there") from None
