"""Tests of the trainer: step, workdir, runs, scale-out, fine-tuning."""
