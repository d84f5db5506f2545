"""pytest-benchmark front end of the harness: `pytest bench/ --benchmark-only`.

Parametrised over op x provider x mode. Shape: SSIU_BENCH_PRESET ("train" or "quick";
default train on CUDA, quick on CPU); SSIU_BENCH_ROUNDS: rounds of the backward-only
benchmarks (default 20). A provider that cannot run here is skipped with
the reason; one whose output differs from the float64 reference fails, untimed.
pytest-benchmark times wall clock, so each call waits for the GPU; `python bench/run.py`
gives the do_bench (CUDA event) times that the report uses.
"""

from __future__ import annotations

import os

import pytest

from bench import harness

CASES = harness.get_cases()
PRESET = os.environ.get("SSIU_BENCH_PRESET") or None
ROUNDS = int(os.environ.get("SSIU_BENCH_ROUNDS", "20"))


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_op(benchmark, op, provider, mode):
    prep = harness.prepare(CASES[op], provider, mode, preset=PRESET)
    if prep.status.startswith("not measured") or prep.status.startswith("error"):
        pytest.skip(prep.status)
    if prep.status != "ok":
        pytest.fail(prep.status)  # never report a speed for a wrong result
    benchmark.group = f"{op} {mode} {'x'.join(map(str, prep.shape))} {prep.dtype}"
    benchmark.extra_info.update(
        shape=list(prep.shape),
        dtype=str(prep.dtype),
        max_rel_err=prep.max_rel_err,
        tolerance=prep.tolerance,
        bytes_moved=harness.bytes_moved(prep.inputs, prep.output, mode),
    )
    call, setup = prep.synced()
    if setup is None:
        benchmark(call)
    else:  # backward alone: a fresh forward before each round, outside the timing
        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=2)
