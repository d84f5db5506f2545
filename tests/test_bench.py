"""The benchmark harness (ssiu.benchmark.harness): rows, correctness refusal, roofline.

CPU only and tiny: eager everywhere, torch.compile for one op in one mode.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from ssiu.benchmark import harness

TINY = (1, 8, 6, 5)  # H, W not multiples of anything
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cases():
    return harness.get_cases()


def measure(case, provider, mode, **kw):
    return harness.measure(case, provider, mode, shape=TINY, device=CPU, reps=3, warmup=1, **kw)


def test_cases_registered_with_training_inference_and_quick_shapes(cases):
    assert {"msgm", "layer_norm2d", "esam", "esam_top16", "moe_fs", "tail_x4"} <= set(cases)
    for case in cases.values():
        assert case.shapes["train"] == (40, 64, 64, 64)
        assert case.shapes["infer"] == (1, 64, 180, 320)
        assert case.shapes["quick"][1] == 64
        shape = (1, 8, 16, 12)  # ESAM needs even sides; 16x12 pads its half grid
        inputs = case.make_inputs(shape, torch.float32, CPU)
        again = case.make_inputs(shape, torch.float32, CPU)
        assert all(torch.equal(inputs[k], again[k]) for k in inputs)  # deterministic
        out = case.op(inputs, "torch")
        assert out.shape == ((1, 3, 64, 48) if case.name == "tail_x4" else shape)


@pytest.mark.parametrize("mode", harness.MODES)
def test_eager_rows(cases, mode):
    row = measure(cases["msgm"], "eager", mode)
    assert row["status"] == "ok"
    assert row["op"] == "msgm" and row["provider"] == "eager" and row["mode"] == mode
    assert row["shape"] == "1x8x6x5" and row["dtype"] == "float32"
    assert row["median_ms"] > 0 and row["p20_ms"] <= row["p80_ms"] and row["reps"] == 3
    assert row["max_rel_err"] <= row["tolerance"]
    if mode == "infer":
        assert row["saved_bytes"] == 0  # inference_mode: autograd saves nothing
    else:
        assert row["saved_bytes"] > 0  # activations autograd keeps for backward
    assert row["peak_mem_bytes"] is None  # CUDA only
    assert row["copy_bw_fraction"] is None  # no copy bandwidth figure for a CPU
    assert row["gbps"] == pytest.approx(row["bytes_moved"] / (row["median_ms"] * 1e-3) / 1e9)
    for key in ("date", "git_commit", "device_name", "torch", "triton", "python"):
        assert row[key], key
    assert row["device"] == "cpu" and row["torch"] == torch.__version__


def test_prepared_backward_runs_a_fresh_forward_per_call(cases):
    prep = harness.prepare(cases["layer_norm2d"], "eager", "bwd", shape=TINY, device=CPU)
    assert prep.status == "ok" and prep.setup is not None
    call, setup = prep.synced()
    args, kwargs = setup()
    grads = prep.call(*args, **kwargs)
    assert [g.shape for g in grads] == [t.shape for t in prep.inputs.values()]
    args, _ = setup()  # the graph of one forward is used once: a new one per call
    call(*args)
    prep = harness.prepare(cases["layer_norm2d"], "eager", "fwd", shape=TINY, device=CPU)
    call, setup = prep.synced()
    assert setup is None
    call()


def test_bytes_moved_counts_inputs_and_outputs_once(cases):
    inputs = cases["layer_norm2d"].make_inputs(TINY, torch.float32, CPU)
    out = torch.empty(TINY)
    x, params = 4 * 8 * 6 * 5, 4 * (8 + 8)
    assert harness.bytes_moved(inputs, out, "fwd") == x + params + x
    # backward: read dy and the inputs, write a gradient per input
    assert harness.bytes_moved(inputs, out, "bwd") == x + (x + params) * 2
    assert harness.bytes_moved(inputs, out, "fwd+bwd") == 2 * x + params + x + 2 * (x + params)


def test_achieved_bandwidth_as_fraction_of_h100_copy():
    gbps, frac = harness.achieved_bandwidth(3 * 10**9, 2.0, "NVIDIA H100 80GB HBM3")
    assert gbps == pytest.approx(1500.0) and frac == pytest.approx(0.5)
    assert harness.achieved_bandwidth(10**9, 1.0, "AMD EPYC") == (pytest.approx(1000.0), None)
    assert harness.achieved_bandwidth(10**9, 1.0, "x", copy_bw=2e12)[1] == pytest.approx(0.5)


def test_fused_is_not_measured_on_cpu(cases):
    row = measure(cases["layer_norm2d"], "fused", "fwd+bwd")
    assert row["status"] == "not measured (no GPU)"
    assert row["median_ms"] is None and row["gbps"] is None


def test_mismatching_provider_is_refused(cases):
    off = harness.Provider(
        "off_by_1pct", lambda case: lambda inputs: case.op(inputs, "torch") * 1.01
    )
    harness.register_provider(off)
    try:
        row = measure(cases["layer_norm2d"], "off_by_1pct", "fwd")
        bwd = measure(cases["layer_norm2d"], "off_by_1pct", "bwd")
    finally:
        del harness.PROVIDERS["off_by_1pct"]
    assert row["status"].startswith("mismatch: output relative norm error 0.01")
    assert "at [" in row["status"] and "> tol" in row["status"]
    assert row["median_ms"] is None and row["gbps"] is None and row["saved_bytes"] is None
    assert bwd["status"].startswith("mismatch") and bwd["median_ms"] is None


def test_gradient_mismatch_is_refused(cases):
    case = cases["layer_norm2d"]

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    bad = harness.Provider(
        "wrong_grad", lambda c: lambda inputs: WrongGrad.apply(c.op(inputs, "torch"))
    )
    harness.register_provider(bad)
    try:
        fwd = measure(case, "wrong_grad", "fwd")
        both = measure(case, "wrong_grad", "fwd+bwd")
    finally:
        del harness.PROVIDERS["wrong_grad"]
    assert fwd["status"] == "ok"  # the forward is right
    assert both["status"].startswith("mismatch: grad x") and both["median_ms"] is None


@pytest.mark.slow
def test_compile_provider_on_cpu(cases):
    row = measure(cases["layer_norm2d"], "compile", "fwd")
    assert row["status"] == "ok", row["status"]
    assert row["median_ms"] > 0 and row["max_rel_err"] <= row["tolerance"]


def test_infer_mode_saves_nothing_and_counts_forward_bytes(cases):
    row = measure(cases["layer_norm2d"], "eager", "infer")
    assert row["status"] == "ok" and row["saved_bytes"] == 0
    fwd = measure(cases["layer_norm2d"], "eager", "fwd")
    assert row["bytes_moved"] == fwd["bytes_moved"]


def test_roofline_on_a_known_shape(cases):
    """MSGM at 2x64x16x16 fp32: bytes = inputs once + output once; FLOPs = 2(4C^2 + 9C)
    per pixel; floor = max of the two times."""
    shape, c, px = (2, 64, 16, 16), 64, 2 * 16 * 16
    inputs = cases["msgm"].make_inputs(shape, torch.float32, CPU)
    out = cases["msgm"].op(inputs, "torch")
    fmap, weights = 4 * px * c, 4 * (4 * (c * c + c) + 9 * c + c)
    assert harness.bytes_moved(inputs, out, "fwd") == 2 * fmap + weights + fmap
    flops = cases["msgm"].flops(shape)
    assert flops == 2 * px * (4 * c * c + 9 * c)
    assert harness.mode_flops(flops, "fwd+bwd") == 3 * flops
    rates = {"copy_bw": 1e9, "matrix_flops": 1e10}
    moved = 3 * fmap + weights
    r = harness.roofline(moved, flops, 10.0, rates)
    assert r["t_bytes_ms"] == pytest.approx(moved / 1e9 * 1e3)
    assert r["t_flops_ms"] == pytest.approx(flops / 1e10 * 1e3)
    assert r["floor_ms"] == max(r["t_bytes_ms"], r["t_flops_ms"])
    assert r["floor_ratio"] == pytest.approx(10.0 / r["floor_ms"])
    assert harness.roofline(moved, flops, None, {})["floor_ms"] is None
    # ESAM: 16x12 -> half grid 8x6, padded to one 8x8 block; tail x4: 1x1s + 3x3 at 4x
    assert cases["esam"].flops((1, 64, 16, 12)) == 2 * 64 * (3 * c * c + 2 * 100 * c + 9 * c)
    assert cases["tail_x4"].flops((1, 64, 4, 4)) == 2 * (
        16 * c * 4 * c + 64 * c * 4 * c + 256 * 9 * c * 3
    )


def test_h100_rates_come_from_design():
    rates = harness.device_rates(torch.device("cuda"), torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert rates["copy_bw"] == 3.0e12 and rates["matrix_flops"] == 800e12
    fp32 = harness.device_rates(torch.device("cuda"), torch.float32, "NVIDIA H100 80GB HBM3")
    assert fp32["matrix_flops"] == 67e12 and "DESIGN" in fp32["matrix_source"]


def test_result_files(cases, tmp_path):
    rows = [
        measure(cases["layer_norm2d"], "eager", "fwd"),
        measure(cases["layer_norm2d"], "fused", "fwd"),
    ]
    json_path, csv_path = harness.write_results(rows, tmp_path)
    harness.write_results(rows[:1], tmp_path)  # appends
    saved = json.loads(json_path.read_text())
    assert [r["provider"] for r in saved] == ["eager", "fused", "eager"]
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and tuple(table[0]) == harness.FIELDS
    assert table[1]["status"] == "not measured (no GPU)"


@pytest.mark.parametrize("provider, timed", [("compile", True), ("fused+compile", False)])
def test_only_the_compile_baseline_is_timed_outside_the_bound(monkeypatch, provider, timed):
    """A mismatching torch.compile of the reference (not our code) is still timed, its
    error kept in the row; our own providers are refused."""
    from ssiu.benchmark import e2e, report

    monkeypatch.setattr(e2e, "_check", lambda *a: ("mismatch: grad x 0.04 > tol 0.03", 0.04, 0.03))
    monkeypatch.setattr(e2e, "_model_for", lambda provider, base: base)
    runs_here = dataclasses.replace(harness.PROVIDERS[provider], unavailable=lambda d: None)
    monkeypatch.setitem(harness.PROVIDERS, provider, runs_here)
    row, call = e2e.prepare_e2e("inference_x4", 1, 16, 16, provider, device="cpu",
                                dtype=torch.float32)  # fmt: skip
    assert (call is not None) == timed
    assert (row["status"] == "ok") == timed and row["max_rel_err"] == 0.04
    assert report._outside_bound(row) and row["max_rel_err"] > row["tolerance"]
