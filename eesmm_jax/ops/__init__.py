"""Fused and CPU-tuned forms of the model's operations."""
