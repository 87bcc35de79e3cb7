"""The trainer's accounting read back: seconds from metrics.jsonl (`metrics.timed_seconds`, which
the benchmark's loop cells and the study read) and the micro-batch count that fits a device
(`step.fewest_micro_batches`, which the trainer's memory check and the kernel bench use)."""
import json

import pytest

from eesmm_jax import metrics
from eesmm_jax import step as step_lib


def write_rows(path, rows, tail=""):
  with open(path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)


def test_timed_seconds_skip_the_first_step_and_count_a_resumed_step_once(tmp_path):
  # Batch 10: rows at steps 1 (compiles), 3, 5; a resume from step 3 logs 5 again, then 7; a
  # torn last line (a kill mid-write) is left out.
  rows = [{"step": 1, "images_per_sec": 1.0}, {"step": 3, "images_per_sec": 20.0},
          {"step": 5, "images_per_sec": 10.0}, {"step": 5, "images_per_sec": 40.0},
          {"step": 7, "images_per_sec": 20.0}]
  write_rows(tmp_path, rows, tail='{"step": 9, "images_')
  steps, seconds = metrics.timed_seconds(str(tmp_path), 10)
  # Steps 2-3 at 20 img/s (1 s), 4-5 at the resumed row's 40 (0.5 s), 6-7 at 20 (1 s).
  assert steps == 6 and seconds == pytest.approx(2.5)


def test_timed_seconds_of_a_run_that_logged_only_its_first_step(tmp_path):
  write_rows(tmp_path, [{"step": 1, "images_per_sec": 5.0}])
  assert metrics.timed_seconds(str(tmp_path), 4) == (0, 0.0)


def test_fewest_micro_batches_that_fit():
  # 10 fixed bytes and 100 of activations at 2 micro-batches: j fits when 10 + 200 / j <= 60.
  even = lambda j: j % 2 == 0
  assert step_lib.fewest_micro_batches(10, 100, 2, 60, lambda j: True) == 4
  assert step_lib.fewest_micro_batches(10, 100, 2, 60, lambda j: j % 3 == 0) == 6
  assert step_lib.fewest_micro_batches(10, 100, 2, 60, even, start=6) == 6
  assert step_lib.fewest_micro_batches(10, 100, 2, 10, even) is None  # fixed bytes alone fill it
  assert step_lib.fewest_micro_batches(10, 100, 1, 500, even, start=1) == 2
