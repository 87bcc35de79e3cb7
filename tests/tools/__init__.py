"""Tests of the tools: benchmark, study, allocator."""
