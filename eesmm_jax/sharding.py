"""The mesh and how arrays lie on it: the batch split over `data`, params replicated or FSDP.

Today's JAX sharding API: `jax.make_mesh`, `NamedSharding`, process-local rows made global with
`jax.make_array_from_process_local_data`; XLA inserts the collectives.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost


def is_lead() -> bool:
  """Process 0 alone writes the shared files and the console lines."""
  return jax.process_index() == 0


def say(message: str) -> None:
  if is_lead():
    print(message, flush=True)


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `devices` (default: all of them, over all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA propagates shardings through the model (JAX's default is now Explicit).
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def global_batch_from_local(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> one global array sharded over `data` (a source that draws its
  batches on the mesh, `data.synthetic.device_batches`, gives them global already)."""
  if isinstance(local, jax.Array):
    return local
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Shard a tensor's largest dimension that divides evenly over `data`; replicate the rest
  (biases, norms and small tables cost little and sharding them would only add collectives)."""
  for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
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


def line_up_processes(name: str, timeout_s: int = 1800) -> None:
  """Several processes wait for each other here, before their first collective: XLA:CPU's gloo
  collectives give a process 30 s to join a new one, less than one process can lead another at
  start-up on a loaded host (process 0 alone opens the TensorBoard writer, which imports
  TensorFlow). The distributed runtime's barrier waits as long as it is told."""
  if jax.process_count() > 1:
    # With a timeout, Orbax's barrier is the distributed runtime's, not a collective.
    multihost.sync_global_processes(name, timeout=timeout_s)
