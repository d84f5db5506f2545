"""Microbenchmarks of the fused ops: `python bench/run.py`, `pytest bench/ --benchmark-only`."""
