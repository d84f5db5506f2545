"""Benchmarks of the fused ops and the whole model: harness, cases, report, plots.

`ssiu bench` (ssiu/bench_cli.py) runs `suite.run_suite`; `pytest bench/ --benchmark-only`
(bench/test_bench_ops.py) is the pytest-benchmark front end in the repository.
"""
