"""The train step every trainer shares (pretraining, fine-tuning, the benchmark), and its state.

As big_vision keeps its update step beside `train.py`: the train state, the encoder built from a
config, the objective-agnostic step factory (micro-batches, accumulation, fp16 loss scaling,
non-finite skips), its compilation with the memory check, and the input's background thread. The mesh and
shardings are `sharding.py`'s, weights to start from `models/weights.py`'s, the workdir
`workdir.py`'s.

Imports only JAX, Flax, Optax and numpy: no TensorFlow, so a synthetic-data run works on
accelerator images without it.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale

from eesmm_jax import ops
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
# Model and state.


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' or None: leaves it off),
  for programs that took at least a second to compile (the steps, not the small helpers)."""
  if not directory:
    return
  path = os.path.expanduser(directory)
  if jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def create_encoder(config, mesh: Optional[jax.sharding.Mesh] = None,
                   **overrides) -> swin.SwinTransformer:
  """The Swin named by config.model, with any of its fields that are set overriding the variant.

  config.model.impl and .attention_impl (or an `impl=` / `attention_impl=` override) of 'auto'
  resolve here, once, for the devices of `mesh` (`ops.for_platform`); without a mesh, for
  jax.devices()[0], where a plain jax.jit runs (the probes' feature extraction)."""
  m = config.model
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  if m.name not in swin.VARIANTS:
    raise ValueError(f"config.model.name={m.name!r} is unknown; choose one of "
                     f"{sorted(swin.VARIANTS)}")
  kwargs = dict(img_size=m.img_size, window_size=m.window_size, patch_size=m.patch_size,
                drop_path_rate=m.drop_path_rate, dtype=DTYPES[config.dtype], remat=m.remat)
  for key in ("embed_dim", "depths", "num_heads"):
    if m.get(key) is not None:
      kwargs[key] = tuple(m[key]) if key != "embed_dim" else m[key]
  kwargs.update(overrides)
  device = (jax.devices() if mesh is None else mesh.devices.flat)[0]
  for key, check in (("impl", ops.check_impl), ("attention_impl", ops.check_attention_impl)):
    value = check(kwargs.get(key, m.get(key, "auto")), f"config.model.{key}", allow_auto=True)
    kwargs[key] = ops.for_platform(device.platform) if value == "auto" else value
  try:
    return swin.create_model(m.name, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.img_size / config.model: {e}") from None


def new_train_state(params, tx, rng, dtype: str) -> TrainState:
  """Step 0. fp16 has no headroom for Swin's activations and gradients: dynamic loss scaling."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=rng,
                    dynamic_scale=DynamicScale() if dtype == "float16" else None,
                    skipped_in_a_row=zero, skipped_steps=zero)


# ----------------------------------------------------------------------------------------------
# The step.


def micro_batched(loss_fn: Callable, micro_batches: int, group: int = 1) -> Callable:
  """`loss_fn` over the batch in `micro_batches` equal slices, one after another (a `lax.scan`,
  so only one slice's activations are alive), averaged: the gradient of the average is the
  average of the slices' gradients, so one optimizer update sees the whole batch.

  Equal to the unsplit loss when the loss is a mean over rows (the objectives' masked means are,
  up to their 1e-5 denominator guard: every image masks the same number of pixels) and its
  random draws do not depend on the slicing; slice i draws from fold_in(rng, i), so masks and
  drop path differ from the unsplit step's draws, not their distribution. Slice i takes every
  micro_batches-th group of `group` rows (EESMM's n images of a blend stay together), so on a
  batch sharded over `data` each device slices its own rows: no data moves.
  """
  if micro_batches == 1:
    return loss_fn

  def sliced_loss(params, batch, rng, train):
    def split(x):
      rows, rest = x.shape[0], x.shape[1:]
      x = x.reshape((rows // (group * micro_batches), micro_batches, group) + rest)
      return jnp.swapaxes(x, 0, 1).reshape((micro_batches, rows // micro_batches) + rest)

    slices = jax.tree_util.tree_map(split, batch)

    def one(total, i_and_slice):
      i, part = i_and_slice
      loss, aux = loss_fn(params, part, jax.random.fold_in(rng, i), train)
      total = jax.tree_util.tree_map(jnp.add, total, (loss, aux.get("metrics", {})))
      return total, None

    shapes = jax.eval_shape(lambda: loss_fn(params, jax.tree_util.tree_map(lambda x: x[0], slices),
                                            rng, train))
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  (shapes[0], shapes[1].get("metrics", {})))
    (loss, metrics), _ = jax.lax.scan(one, zero, (jnp.arange(micro_batches), slices))
    mean = lambda x: x / micro_batches
    return mean(loss), {"metrics": jax.tree_util.tree_map(mean, metrics)}

  return sliced_loss


def make_train_step(loss_fn: Callable, tx, schedule, accum_steps: int, micro_batches: int = 1,
                    group: int = 1):
  """(state, batch) -> (state, metrics), for any `loss_fn(params, batch, rng, train) ->
  (loss, aux)`: whatever the loss puts under aux['metrics'] is logged beside the step's own
  loss, grad_norm, lr, finite, skipped_in_a_row, skipped_steps (and loss_scale in fp16).
  `micro_batches` > 1 runs the batch in that many slices inside the step (`micro_batched`).

  A step whose loss or gradients are not finite leaves params and optimizer state untouched.
  In fp16 that is the normal overflow handling of dynamic loss scaling (the scale halves); in
  fp32/bf16 the host stops the run on `metrics['finite'] == 0`.
  """

  loss_fn = micro_batched(loss_fn, micro_batches, group)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_of = lambda p: loss_fn(p, batch, rng, True)
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

    metrics = dict(aux.get("metrics", {}), loss=loss, grad_norm=grad_norm,
                   lr=schedule(state.step // accum_steps), finite=finite.astype(jnp.int32),
                   skipped_in_a_row=skipped, skipped_steps=skipped_steps)
    if dynamic_scale is not None:
      metrics["loss_scale"] = dynamic_scale.scale
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          dynamic_scale=dynamic_scale, skipped_in_a_row=skipped,
                          skipped_steps=skipped_steps)
    return state, metrics

  return train_step


def jit_train_step(plan, loss_fn: Optional[Callable] = None):
  """The plan's step, jitted over its shardings with the state donated."""
  step = make_train_step(loss_fn or plan.loss_fn, plan.tx, plan.schedule, plan.accum_steps,
                         plan.config.micro_batches, plan.group)
  return jax.jit(step, in_shardings=(plan.state_sharding, plan.data_sharding),
                 out_shardings=(plan.state_sharding, plan.replicated), donate_argnums=0)


def step_bytes(compiled) -> Optional[int]:
  """Per-device bytes of a compiled step by XLA's memory analysis: arguments + outputs +
  temporaries, less the donated (aliased) buffers; None where the backend has no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def device_memory_bytes(config) -> Optional[int]:
  """config.device_memory_gb when stated, else what the accelerator reports (None on CPU)."""
  if config.device_memory_gb:
    return int(config.device_memory_gb * 2 ** 30)
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def fewest_micro_batches(fixed: int, temps: int, micro_batches: int, limit: int,
                         allowed: Callable[[int], bool], start: int = 1) -> Optional[int]:
  """The fewest micro-batches j >= `start` (at most 64, `allowed(j)`) with which a step fits in
  `limit` bytes: the `fixed` bytes (params, optimizer state, batch) stay, the activations
  (`temps` bytes at `micro_batches`) shrink with the slice. None where none fits."""
  return next((j for j in range(start, 65)
               if allowed(j) and fixed + temps * micro_batches / j <= limit), None)


def compile_train_step(plan, state: TrainState, batch) -> Any:
  """The plan's step compiled for `batch` (arrays or ShapeDtypeStructs with shardings), after
  checking that it fits the device: a step that cannot fit stops here, before any training,
  with both numbers and what would fit."""
  start = time.perf_counter()
  if jax.process_index() == 0:
    print("compiling the train step ...", flush=True)
  compiled = jit_train_step(plan).lower(state, batch).compile()
  needed, limit = step_bytes(compiled), device_memory_bytes(plan.config)
  gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
  if jax.process_index() == 0:
    print(f"compiled the train step in {time.perf_counter() - start:.1f} s"
          + (f"; it needs {gib(needed)} per device (XLA memory analysis)" if needed else ""),
          flush=True)
  if needed and limit and needed > limit:
    # Arguments (params, optimizer state, batch) stay; the temporaries scale with the slice.
    m = compiled.memory_analysis()
    fixed, temps = needed - m.temp_size_in_bytes, m.temp_size_in_bytes
    k = plan.config.micro_batches
    split = plan.group * plan.mesh.size
    fit = fewest_micro_batches(fixed, temps, k, limit, start=k + 1,
                               allowed=lambda j: plan.config.batch_size % (split * j) == 0)
    hint = (f"--config.micro_batches={fit} (about {gib(fixed + temps * k / fit)})"
            if fit else "a smaller config.batch_size")
    raise MemoryError(
        f"the train step needs {gib(needed)} per device (XLA memory analysis: {gib(fixed)} "
        f"params, optimizer state and batch, {gib(temps)} activations) but the device has "
        f"{gib(limit)}: use {hint}, or --config.model.remat=full (fewer activations kept)")
  return compiled


class BackgroundInput:
  """The input of a training loop, made on a thread of its own: `put(next(batches))` (host ->
  sharded device arrays) up to `size` batches ahead of the step that takes them.

  The training thread only takes the next ready batch, so it dispatches step k + 1 as soon as
  step k is dispatched, and after a host sync (a log, checkpoint or picture step) the device does
  not idle while a batch is made. Batches keep their order (one producer), so the stream stays a
  pure function of (seed, step). An error raised by the input is raised again by `next` on the
  training thread; `close` stops the thread. `times()`: cumulative seconds the producer spent
  making and putting batches, and the training thread waiting for one, and the batch count.
  """

  def __init__(self, batches, put: Callable, size: int = 2):
    self._queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._made = self._put = self._waited = 0.0
    self._count = self._taken = 0
    self._thread = threading.Thread(target=self._produce, args=(batches, put), daemon=True,
                                    name="eesmm-input")
    self._thread.start()

  def _produce(self, batches, put):
    try:
      while not self._stop.is_set():
        t0 = time.perf_counter()
        local = next(batches)
        t1 = time.perf_counter()
        item = put(local)
        self._made += t1 - t0
        self._put += time.perf_counter() - t1
        self._count += 1
        self._offer((True, item))
    except BaseException as e:  # noqa: BLE001 - handed to the training thread as it is
      self._offer((False, e))

  def _offer(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    ok, value = self._queue.get()
    self._waited += time.perf_counter() - t0
    if not ok:
      self._stop.set()
      raise value
    self._taken += 1
    return value

  def times(self) -> dict:
    return {"make": self._made, "put": self._put, "made": self._count, "wait": self._waited,
            "taken": self._taken}

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class HostTimes:
  """The training loop's host work per step, for its log rows: input (the producer's making
  and putting of a batch, the training thread's wait for one), the step's dispatch, and the
  boundary work (checks, logging, saving, pictures), each averaged over the steps since the
  previous row, in milliseconds."""

  def __init__(self, batches: BackgroundInput):
    self.batches, self.dispatch, self.boundary = batches, 0.0, 0.0
    self._last = dict(batches.times(), dispatch=0.0, boundary=0.0)

  @contextlib.contextmanager
  def timed(self, what: str):
    """A context adding its wall time to `what` ('dispatch' or 'boundary')."""
    t0 = time.perf_counter()
    yield
    setattr(self, what, getattr(self, what) + time.perf_counter() - t0)

  def row(self) -> dict:
    now = dict(self.batches.times(), dispatch=self.dispatch, boundary=self.boundary)
    d = {k: now[k] - self._last[k] for k in now}
    self._last = now
    made, taken = max(d["made"], 1), max(d["taken"], 1)
    per = {"make": made, "put": made, "wait": taken, "dispatch": taken, "boundary": taken}
    return {f"host_{k}_ms": 1e3 * d[k] / n for k, n in per.items()}
