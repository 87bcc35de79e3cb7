"""Tests of the model, its kernels and weights."""
