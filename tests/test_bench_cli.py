"""`ssiu bench` on CPU at tiny shapes: report.json, report.md, valid PNGs, roofline rows."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from ssiu import bench_cli
from ssiu.benchmark import harness, report, suite

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY_E2E = {"train_step_x4": (1, 12, 12), "inference_x4": (1, 12, 12)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The suite as `ssiu bench --quick` runs it, at even tinier shapes (one run per module)."""
    out = tmp_path_factory.mktemp("bench")
    doc = suite.run_suite(
        out, quick=True, device="cpu", shape=(1, 64, 12, 12), e2e_shapes=TINY_E2E, reps=2,
        warmup=1, quick_cpu_compile={("layer_norm2d", "infer")}, log=None, command="test",
        ops=["msgm", "layer_norm2d", "esam_top16", "tail_x4", "moe_fs", "train_step_x4",
             "inference_x4"],
    )  # fmt: skip
    return out, doc


def _parser():
    parser = argparse.ArgumentParser(prog="ssiu")
    bench_cli.add_cli(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.slow  # the shared quick_run fixture: minutes on 2 cores
def test_files_written(quick_run):
    out, doc = quick_run
    names = {p.name for p in doc["paths"]}
    assert {"report.json", "report.md"} <= names
    if HAVE_MATPLOTLIB:
        assert names - {"report.json", "report.md"} == {
            "speedup.png",
            "bandwidth.png",
            "memory.png",
        }
    saved = json.loads((out / "report.json").read_text())
    for key in ("device", "device_name", "torch", "triton", "git_commit", "date", "driver"):
        assert key in saved["stamp"], key
    assert saved["stamp"]["torch"] == torch.__version__
    assert saved["rates"]["copy_bw"] > 0 and saved["rates"]["matrix_flops"] > 0
    assert len(saved["rows"]) == 5 * 4 * 4  # ops x modes x providers
    assert {r["op"] for r in saved["e2e"]} == {"train_step_x4", "inference_x4"}


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed (pip install matplotlib)")
@pytest.mark.slow  # the shared quick_run fixture: minutes on 2 cores
def test_pngs_are_valid_images(quick_run):
    from PIL import Image

    out, _ = quick_run
    for name in ("speedup.png", "bandwidth.png", "memory.png"):
        path = out / name
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


@pytest.mark.slow  # the shared quick_run fixture: minutes on 2 cores
def test_markdown_rows_and_honest_statuses(quick_run):
    out, doc = quick_run
    md = (out / "report.md").read_text()
    for op in ("msgm", "layer_norm2d", "esam_top16", "tail_x4", "moe_fs"):
        assert f"| {op} | quick | 1x64x12x12 | float32 | fwd+bwd |" in md, op
    line = next(ln for ln in md.splitlines() if ln.startswith("| msgm | quick"))
    assert "not measured (no GPU)" in line  # fused and fused+compile
    assert "skipped (--quick)" in line  # compile of msgm on a CPU in --quick
    assert "## Roofline" in md and "## End to end (x4)" in md and "## Notes" in md
    assert "| train_step_x4 | 1x3x12x12 | float32 | eager |" in md
    assert "| inference_x4 | 1x3x12x12 | float32 | fused | not measured (no GPU) |" in md
    if HAVE_MATPLOTLIB:
        assert "![speedup](speedup.png)" in md


@pytest.mark.slow  # the shared quick_run fixture: minutes on 2 cores
def test_rows_are_checked_timed_and_have_a_roofline(quick_run):
    _, doc = quick_run
    rows = doc["rows"] + doc["e2e"]
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["status"] == "ok" for r in eager)
    for r in eager:
        assert r["max_rel_err"] <= r["tolerance"] and r["median_ms"] > 0
        assert r["floor_ms"] == max(r["t_bytes_ms"], r["t_flops_ms"])
        assert r["floor_ratio"] == pytest.approx(r["median_ms"] / r["floor_ms"])
    fused = [r for r in rows if "fused" in r["provider"]]
    assert all(r["status"] == "not measured (no GPU)" and r["median_ms"] is None for r in fused)
    compiled = {(r["op"], r["mode"]): r for r in doc["rows"] if r["provider"] == "compile"}
    assert compiled[("msgm", "fwd")]["status"] == suite.SKIPPED_QUICK
    train = next(r for r in doc["e2e"] if r["op"] == "train_step_x4" and r["provider"] == "eager")
    assert train["images_per_s"] == pytest.approx(1e3 / train["median_ms"])


@pytest.mark.slow  # the shared quick_run fixture: minutes on 2 cores
def test_report_from_a_document_alone(quick_run):
    _, doc = quick_run
    md = report.markdown_report({**doc, "plots": []})
    assert md.startswith("# SSIU benchmark report") and "Device:" in md


def test_cli_parses_and_rejects_unknown_ops(tmp_path):
    args = _parser().parse_args(
        ["bench", "--quick", "--out", str(tmp_path), "--ops", "nope", "--no-plots"]
    )
    assert args.quick and args.func is bench_cli.run
    with pytest.raises(ValueError, match="unknown ops"):
        args.func(args)


def test_cli_runs_one_op(tmp_path):
    args = _parser().parse_args(
        ["bench", "--quick", "--out", str(tmp_path), "--ops", "layer_norm2d", "--modes",
         "fwd", "--providers", "eager,fused", "--no-e2e", "--reps", "2", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [(r["provider"], r["status"]) for r in doc["rows"]] == [
        ("eager", "ok"), ("fused", "not measured (no GPU)")
    ]  # fmt: skip


def test_suite_refuses_a_mismatching_provider(tmp_path):
    off = harness.Provider("off", lambda case: lambda inputs: case.op(inputs, "torch") * 1.01)
    harness.register_provider(off)
    try:
        doc = suite.run_suite(tmp_path, quick=True, device="cpu", shape=(1, 8, 6, 5), reps=2,
                              ops=["layer_norm2d"], modes=["fwd"], providers=["eager", "off"],
                              e2e_rows=False, plots=False, log=None)  # fmt: skip
    finally:
        del harness.PROVIDERS["off"]
    off_row = doc["rows"][1]
    assert off_row["status"].startswith("mismatch") and off_row["median_ms"] is None
    assert "## Not timed" in (tmp_path / "report.md").read_text()


def test_an_interrupted_run_leaves_what_it_measured(tmp_path):
    seen = []

    def log(line):
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C after two rows

    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(tmp_path, quick=True, device="cpu", shape=(1, 8, 6, 5), reps=2,
                        ops=["layer_norm2d"], modes=["fwd", "infer"], providers=["eager"],
                        e2e_rows=False, plots=False, log=log)  # fmt: skip
    doc = json.loads((tmp_path / "report.json").read_text())
    assert len(doc["rows"]) == 2 and doc["complete"] is False
    assert "Partial report" in (tmp_path / "report.md").read_text()


def test_the_suite_restores_inductor_settings(tmp_path):
    import torch._inductor.config as inductor_config

    before = inductor_config.compile_threads
    suite.run_suite(tmp_path, quick=True, device="cpu", shape=(1, 8, 6, 5), reps=1,
                    ops=["layer_norm2d"], modes=["fwd"], providers=["eager"],
                    e2e_rows=False, plots=False, log=None)  # fmt: skip
    assert inductor_config.compile_threads == before
