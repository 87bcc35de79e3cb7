"""The 'synthetic' source: uniformly random uint8 images, a pure function of (seed, step).

It follows the folder stream's rule (`tfdata`): global position i is an image drawn from
(seed, i), and step k's global batch is positions [k * B, (k + 1) * B), of which process p takes
rows [p * b, (p + 1) * b). So it is the same on any number of processes, and resumes at any step
with nothing to skip.
"""
from __future__ import annotations

from typing import Iterator, Optional

import ml_collections
import numpy as np

from eesmm_jax.data.common import process_rows


def synthetic_batches(config: ml_collections.ConfigDict, global_batch: int, start_step: int = 0,
                      *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[dict]:
  """Uniformly random uint8 pixels and labels in [0, 1000)."""
  first, local = process_rows(global_batch, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  size, seed = int(config.img_size), int(config.seed)
  step = start_step
  while True:
    images = np.empty((local, size, size, 3), np.uint8)
    labels = np.empty((local,), np.int32)
    for row in range(local):
      rng = np.random.default_rng([seed, step * global_batch + first + row])
      images[row] = rng.integers(0, 256, (size, size, 3), np.uint8)
      labels[row] = rng.integers(0, 1000)
    yield {"image": images, "label": labels}
    step += 1
