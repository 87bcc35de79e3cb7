"""The pretraining config's shape: every key a run reads, with SimMIM Swin-B 192 defaults.

Config files in configs/ start from `pretrain_config()` and change what their experiment changes,
so each reads as a description of the experiment. `img_size` and `seed` are shared references:
`--config.img_size=224` moves the model and the input pipeline together. The checks of a config,
and everything computed from it, are `plan.py`'s.
"""

import ml_collections

from eesmm_jax import data, objectives, optim


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
  # Slices of the batch run one after another inside each step, gradients averaged, one update:
  # the same batch on fewer or smaller devices (activations of one slice alive at a time).
  c.micro_batches = 1
  # The memory a train step may use per device, in GiB; None = what the accelerator reports. A
  # step that needs more stops before training, saying what would fit.
  c.device_memory_gb = ml_collections.config_dict.placeholder(float)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # A resume refuses a workdir written with another model shape, img_size, batch_size, objective
  # or mode (its config.json, workdir.RESUME_FIXED); name the keys here, comma-separated, to
  # resume anyway.
  c.resume_allow = ""
  # Shard params and optimizer state over the data axis (FSDP) instead of replicating them.
  c.fsdp = False
  # fp16: a run stops when this many steps in a row overflow (the loss itself is then broken).
  c.max_skipped_steps = 20
  # Weights to start from: a PyTorch .pth (official, timm or SimMIM layout) or a directory
  # written by `python -m eesmm_jax.convert to-flax` (fine-tuning also takes a workdir).
  c.init_from = ml_collections.config_dict.placeholder(str)
  # JAX's persistent compilation cache: a program compiled once (the train step takes 30-50 s
  # on a GPU) is read back by every later run and resume with the same shapes and flags. ''
  # turns it off.
  c.compilation_cache_dir = "~/.cache/eesmm_jax/jax_compilation_cache"

  c.model = ml_collections.ConfigDict()
  c.model.name = "swin_base"        # swin_tiny | swin_small | swin_base | swin_large
  c.model.img_size = c.get_ref("img_size")
  c.model.window_size = 6
  c.model.patch_size = 4
  c.model.drop_path_rate = 0.0
  # Rematerialisation of the encoder blocks in the backward pass: 'none', 'full' (keeps each
  # block's input only) or 'dots' (also the weight matmuls' outputs). Temporaries of a Swin-B
  # 192/6 train step at batch 8 (XLA's memory analysis): 2,342 / 1,360 / 1,900 MiB; the time it
  # costs is in docs/performance.md.
  c.model.remat = "none"
  # The backend-specific forms (eesmm_jax.ops): `impl` of the Linear and LayerNorm layers
  # ('xla' | 'xla_cpu'), `attention_impl` of the window attention ('xla' | 'xla_cpu' | 'cudnn' |
  # 'pallas'). 'auto' picks by the devices the run plans its mesh over: 'xla_cpu' on CPUs, else
  # 'xla' (the portable forms).
  c.model.impl = "auto"
  c.model.attention_impl = "auto"
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
  c = run_config(data.default_data_config())
  c.picture_every = 1000      # reconstruction grid PNG + TensorBoard image; 0 = never
  c.objective = objectives.default_objective_config()
  return c
