"""Tests of the method: masking, objectives, optimizer."""
