"""The trainer: SimMIM / EESMM pretraining, read top to bottom.

plan (config checked, model, objective, data size, steps, optimizer, shardings; `plan.py`) ->
checkpoint restore (or init) -> jitted, sharded train step -> loop (metrics, pictures,
checkpoints). What the loop is built from is shared with fine-tuning and the benchmark
(`step.py`).

The batch is sharded over the mesh's `data` axis and the params are replicated; the step is one
`jax.jit` with explicit shardings, and XLA inserts the gradient all-reduce. Per-process numpy
batches become global arrays with `jax.make_array_from_process_local_data`, so the same code
runs on one CPU, on 4 V100s and on several hosts (`jax.distributed`).

Resuming is exact: the data order is a pure function of (seed, step) (see data/tfdata.py), the
step rng is `fold_in(rng, step)`, and the checkpoint holds params, optimizer state, step and rng.
"""

from __future__ import annotations

import time

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from eesmm_jax import data, pictures, plan as plan_lib
from eesmm_jax import sharding
from eesmm_jax import step as step_lib
from eesmm_jax import workdir as workdir_lib
from eesmm_jax.models import weights

# ----------------------------------------------------------------------------------------------
# The run.


def pretrain(config: ml_collections.ConfigDict, workdir: str, devices=None,
                       stop_after: int | None = None) -> step_lib.TrainState:
  """Pretrains as `config` says, resuming from `workdir` if it holds a checkpoint.

  `devices` restricts the mesh (tests compare 1 and 8 devices in one process). `stop_after`
  ends the run early, with a checkpoint, at that step, as an interrupted run would: the schedule
  still spans the whole run.
  """
  # --- The plan: config checked, every run quantity computed, before anything compiles.
  p = plan_lib.pretraining(config, sharding.make_mesh(devices), workdir)
  workdir, steps = p.workdir, p.total_steps
  step_lib.use_compilation_cache(config.compilation_cache_dir)

  # --- Checkpoint restore, or init (optionally from pretrained encoder weights).
  def init():
    rng = jax.random.PRNGKey(config.seed)
    state = jax.jit(p.new_state, out_shardings=p.state_sharding)(rng)
    if not config.init_from:
      return state
    loaded, _ = weights.load_weights(config.init_from, p.encoder)
    params = {**state.params,
              "encoder": weights.merge_params(jax.device_get(state.params["encoder"]), loaded)}
    return jax.jit(p.new_state, out_shardings=p.state_sharding)(rng, params)

  with workdir_lib.Run(p, init) as run:  # lock, config.json, restore (or init), metrics log
    state, start = run.state, run.start

    # --- The step.
    # uint8 pixels: the step normalises them on the device (data.normalize). From prepared
    # shards they are the stored size, cropped and flipped to img_size in the step (p.loss_fn).
    images_shape = jax.ShapeDtypeStruct(
        (config.batch_size, p.input_size, p.input_size, p.encoder.in_chans),
        jax.numpy.uint8, sharding=p.data_sharding)
    train_step = step_lib.compile_train_step(p, state, images_shape)
    # The pictures' program compiles now, not at the first picture step mid-run.
    picture_rows = min(config.objective.num_mix * 4, config.batch_size)
    picture_fn = take_picture_rows = None
    if config.picture_every:
      replicated = NamedSharding(p.mesh, P())
      rows_shape = jax.ShapeDtypeStruct((picture_rows,) + images_shape.shape[1:],
                                        images_shape.dtype, sharding=replicated)
      picture_fn = jax.jit(lambda params, images, rng: p.loss_fn(params, images, rng, False)[1]
                           ).lower(state.params, rows_shape, jax.random.PRNGKey(0)).compile()
      take_picture_rows = jax.jit(lambda images: images[:picture_rows],
                                  out_shardings=replicated).lower(images_shape).compile()
      picture_key = jax.random.PRNGKey(config.seed)

    # --- Loop. The input runs on a thread of its own (`step.BackgroundInput`); a logged step's
    # row is written after the next step is dispatched, so reading its metrics never leaves the
    # device idle (checkpoint, picture and last steps read at once: they need the state).
    batches = step_lib.BackgroundInput(
        data.create_pretrain_iterator(config.data, config.batch_size, start_step=start,
                                      source=p.source, sharding=p.data_sharding),
        lambda batch: sharding.global_batch_from_local(batch["image"], p.data_sharding))
    host = step_lib.HostTimes(batches)
    picture_batch, deferred = None, None
    last = steps if stop_after is None else min(steps, stop_after)

    def write_row(step, metrics):
      # Unreadable files a folder source skips: left out when it was listed, or replaced
      # when their batch was built (the input appends those as it meets them).
      run.log.write(step, {**metrics, "bad_images": len(p.source.bad_images), **host.row()})

    sharding.line_up_processes("first step")
    run.log.start(start)
    with batches:
      for step in range(start + 1, last + 1):
        images = next(batches)
        with host.timed("dispatch"):
          state, metrics = train_step(state, images)
        with host.timed("boundary"):
          if deferred:
            write_row(*deferred)
            deferred = None
          if step == start + 1:
            jax.block_until_ready(metrics)  # timed before any log row restarts the clock
            if run.log.lead:
              print(f"first step ran in {time.perf_counter() - run.log.last_time:.1f} s (input "
                    f"start-up included)", flush=True)
          logged, periodic, preempted = run.boundary(step, last, metrics)
          if picture_fn and picture_batch is None:
            # Fixed images for the reconstruction grids, so the pictures compare over time.
            picture_batch = take_picture_rows(images)
          picture = picture_fn and (step % config.picture_every == 0 or step == steps)
          if logged:
            if periodic or preempted or picture or step == start + 1:
              write_row(step, metrics)
            else:
              deferred = (step, metrics)
          if step == start + 1:
            run.log.start(step)  # throughput is measured from here on (a first row includes it)
          if picture:
            aux = picture_fn(state.params, picture_batch, picture_key)
            # A picture the disk refuses stops the run at this step's save, with a checkpoint.
            run.log.attempt(step, f"the reconstruction picture in {workdir}/pictures",
                            lambda: pictures.write_reconstructions(workdir, step, aux,
                                                                   run.log.writer))
          if run.save(state, step, periodic, preempted):
            break
  return state
