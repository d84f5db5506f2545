"""Benchmarks of the fused ops and the whole model: harness, cases, report, plots.

`ssiu bench` (ssiu/bench_cli.py) runs `suite.run_suite`; `bench/run.py` and
`pytest bench/ --benchmark-only` are thin front ends in the repository.
"""
