"""Microbenchmarks of the fused ops: `ssiu bench`, `pytest bench/ --benchmark-only`."""
