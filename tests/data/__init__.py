"""Tests of the input."""
