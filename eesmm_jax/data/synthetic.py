"""The 'synthetic' source: uniformly random uint8 images, a pure function of (seed, step).

It follows the folder stream's rule (`tfdata`): global position i is an image drawn from
(seed, i), and step k's global batch is positions [k * B, (k + 1) * B), of which process p takes
rows [p * b, (p + 1) * b). So it is the same on any number of processes, and resumes at any step
with nothing to skip.

A batch is one jitted draw (`_rows`: `jax.random.bits` of every row's key, vmapped), made
where it is used: `synthetic_batches` gives this process's rows as numpy (drawn on the CPU),
`device_batches` the global batch already on the mesh, each device drawing its own rows, so the
host's work per step is one dispatch (a per-row NumPy generator cost about 350 us an image:
more than an EESMM step on a GPU).
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eesmm_jax.data.common import process_rows

NUM_LABELS = 1000


@functools.partial(jax.jit, static_argnums=(2,))
def _rows(seed, positions, size: int):
  """uint8 images [n, size, size, 3] and int32 labels [n] in [0, NUM_LABELS) of `positions`."""

  def row(position):
    key = jax.random.fold_in(jax.random.key(seed), position)
    pixels = jax.random.bits(jax.random.fold_in(key, 0), (size, size, 3), jnp.uint8)
    label = jax.random.randint(jax.random.fold_in(key, 1), (), 0, NUM_LABELS, jnp.int32)
    return pixels, label

  return jax.vmap(row)(positions)


def _check(config, start_step):
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  return int(config.img_size), int(config.seed)


def synthetic_batches(config: ml_collections.ConfigDict, global_batch: int, start_step: int = 0,
                      *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[dict]:
  """This process's rows as numpy: uniformly random uint8 pixels and labels in [0, 1000)."""
  first, local = process_rows(global_batch, process_index, process_count)
  size, seed = _check(config, start_step)
  cpu = jax.local_devices(backend="cpu")[0]
  step = start_step
  while True:
    positions = np.arange(local, dtype=np.int64) + step * global_batch + first
    with jax.default_device(cpu):
      images, labels = _rows(seed, positions.astype(np.uint32), size)
    yield {"image": np.asarray(images), "label": np.asarray(labels)}
    step += 1


def device_batches(config: ml_collections.ConfigDict, global_batch: int, start_step: int,
                   sharding) -> Iterator[dict]:
  """The global batch of every step from `start_step` on, drawn on the mesh: {'image', 'label'}
  sharded as `sharding` (over the batch axis), equal to the rows `synthetic_batches` gives."""
  size, seed = _check(config, start_step)
  label_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      *sharding.spec[:1]))
  draw = jax.jit(lambda step: _rows(seed, jnp.arange(global_batch, dtype=jnp.uint32)
                                    + step * global_batch, size),
                 out_shardings=(sharding, label_sharding))
  step = start_step
  while True:
    images, labels = draw(np.uint32(step))
    yield {"image": images, "label": labels}
    step += 1
