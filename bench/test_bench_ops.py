"""pytest-benchmark front end of the harness: `pytest bench/ --benchmark-only`.

Parametrised over op x provider x mode (the modes of the preset), plus the end-to-end
training step and inference per provider. Shape:
SSIU_BENCH_PRESET ("train", "infer" or "quick"; default train on CUDA, quick on CPU);
SSIU_BENCH_ROUNDS: rounds of the backward-only benchmarks (default 20). A provider that
cannot run here is skipped with the reason; one whose output differs from the float64
reference fails, untimed. pytest-benchmark times wall clock, so each call waits for the
GPU; `ssiu bench` gives the do_bench (CUDA event) times that the report uses.
"""

from __future__ import annotations

import os

import pytest
import torch

from ssiu.benchmark import e2e, harness

CASES = harness.get_cases()
PRESET = os.environ.get("SSIU_BENCH_PRESET") or harness.default_preset(harness.default_device())
ROUNDS = int(os.environ.get("SSIU_BENCH_ROUNDS", "20"))


@pytest.mark.parametrize("mode", harness.PRESET_MODES[PRESET])
@pytest.mark.parametrize("provider", harness.PROVIDER_NAMES)
@pytest.mark.parametrize("op", sorted(CASES))
def test_op(benchmark, op, provider, mode):
    prep = harness.prepare(CASES[op], provider, mode, preset=PRESET)
    if prep.status.startswith("not measured"):
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
        flops=harness.mode_flops(CASES[op].flops(prep.shape), mode),
    )
    call, setup = prep.synced()
    if setup is None:
        benchmark(call)
    else:  # backward alone: a fresh forward before each round, outside the timing
        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=2)


E2E_PRESET = "quick" if PRESET == "quick" else None


@pytest.mark.parametrize("provider", harness.PROVIDER_NAMES)
@pytest.mark.parametrize(
    "name,preset",
    [(n, p) for p in ("train", "infer", "quick") for n in e2e.SHAPES[p]
     if (p == "quick") == (PRESET == "quick")],
)  # fmt: skip
def test_end_to_end(benchmark, name, preset, provider):
    """A whole x4 training step (images/s = batch / time) or inference, per provider."""
    device = harness.default_device()
    batch, h, w = e2e.SHAPES[preset][name]
    row, call = e2e.prepare_e2e(name, batch, h, w, provider, device=device,
                                dtype=harness.default_dtype(device), preset=preset)  # fmt: skip
    if call is None and row["status"].startswith("not measured"):
        pytest.skip(row["status"])
    if call is None:
        pytest.fail(row["status"])
    benchmark.group = f"{name} {row['shape']} {row['dtype']}"
    benchmark.extra_info.update(batch=batch, flops=row["flops"], max_rel_err=row["max_rel_err"])

    def run():
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
