"""The prepared GPU check (bench/gpu_check.py) runs on a CPU: its dry run, budgets, parsing
of test results and the verdict, so that a broken script is caught before a GPU is lent.

The whole dry run (`make gpu-check DRY=1`: every part at toy size, through the Triton
interpreter, about 100 s on 2 cores) is part of the default run, so CI catches a broken
script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check, gpu_verdict

REPO = Path(__file__).resolve().parents[1]


def _dry_run(
    tmp_path: Path, *args: str, timeout: float
) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry", "--out", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in out.iterdir()), files
    doc = json.loads((out / "gpu_check.json").read_text())
    lines = proc.stdout.rstrip().splitlines()
    assert any(ln.startswith("VERDICT") for ln in lines[-45:]), lines[-45:]
    assert lines[-1].endswith("not measured."), lines[-1]  # the verdict's count comes last
    return proc, doc


def test_whole_dry_run(tmp_path):
    """Every part at toy size (`make gpu-check DRY=1`, about 100 s on 2 idle cores): none
    fails, rows were measured, and nothing measured on a GPU reads as met."""
    _, doc = _dry_run(tmp_path, "--budget", "900", timeout=1200)
    parts = doc["parts"]
    assert not [k for k, v in parts.items() if v["status"].startswith("failed")], parts
    assert parts["install"]["result"]["mode"].startswith("shim checked"), parts["install"]
    assert parts["env"]["result"]["copy_bw"] > 0
    assert set(parts["env"]["result"]["matrix_flops"]) == {"bfloat16", "float32"}
    tests = parts["tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] >= 1, tests
    for part in ("ops", "e2e"):
        rows = parts[part]["result"]["rows"]
        assert rows and not [r for r in rows if r["status"].startswith(("mismatch", "error"))]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# SSIU GPU check")
    measured = [v for v in doc["verdict"] if v["status"] in ("met", "NOT met")]
    assert {v["target"] for v in measured} <= {
        "GPU tests pass (pytest -m gpu)",
        "top-k keep set same fwd/bwd",
    }, measured


def test_part_over_budget_is_stopped_and_the_rest_go_on(tmp_path):
    run = gpu_check.Run(tmp_path, dry=True, dry_tests="")
    slow = run.part("slow", [sys.executable, "-c", "import time; time.sleep(60)"], budget=1)
    assert slow["status"].startswith("stopped at its budget") and slow["seconds"] < 15
    fast = run.part("fast", [sys.executable, "-c", "print('hello')"], budget=10)
    assert fast["status"] == "ok"
    assert "hello" in (tmp_path / "gpu_check.log").read_text()


def test_pytest_outcomes_from_junit_and_from_a_stopped_log(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped message="no"/></testcase>'
        "</testsuite></testsuites>"
    )
    r = gpu_check.parse_junit(xml)
    assert (r["total"], r["passed"], r["failed"], r["skipped"]) == (3, 1, 1, 1)
    assert r["cases"][1]["message"] == "boom"
    log = (
        "tests/test_gpu.py::test_a[x] PASSED   [ 10%]\n"
        "[gw1] [ 20%] FAILED tests/test_x.py::test_b\n"
        "tests/test_y.py::test_c SKIPPED (no)\n"
    )
    r = gpu_check.parse_pytest_log(log)
    assert (r["passed"], r["failed"], r["skipped"], r["incomplete"]) == (1, 1, 1, True)


def _row(op, mode, provider, ms, preset="train", **extra):
    return dict(op=op, mode=mode, provider=provider, preset=preset, median_ms=ms,
                status="ok" if ms is not None else "not measured (no GPU)", **extra)  # fmt: skip


def test_verdict_met_not_met_and_not_measured():
    ops = [
        _row("msgm", "fwd+bwd", "eager", 3.0),
        _row("msgm", "fwd+bwd", "fused", 1.0),
        _row("msgm", "fwd+bwd", "compile", 1.2),
        _row("msgm", "fwd", "fused", 0.5, copy_bw_fraction=0.7, saved_bytes=10),
        _row("msgm", "fwd", "eager", 1.0, saved_bytes=100),
        _row("esam", "fwd+bwd", "fused", None),
    ]
    e2e = [
        _row("train_step_x4", "train", "eager", 90.0, peak_mem_bytes=100),
        _row("train_step_x4", "train", "fused", 40.0, peak_mem_bytes=30, images_per_s=1000.0),
        _row("inference_x4", "infer", "eager", 20.0),
        _row("inference_x4", "infer", "fused+cudagraph", 1.5, graph_launches=1),
    ]
    doc = {"parts": {
        "ops": {"status": "ok", "result": {"rows": ops}},
        "e2e": {"status": "ok", "result": {"rows": e2e, "launches": {
            "train_triton": {"launches": 300}, "infer_triton": {"launches": 80}}}},
    }}  # fmt: skip
    got = {v["target"]: (v["value"], v["status"]) for v in gpu_verdict.targets(doc)}
    assert got["msgm fwd+bwd fused >= 3.0x eager"] == ("3.00x", "met")
    assert got["msgm fwd+bwd fused >= 1.5x torch.compile(ref)"] == ("1.20x", "NOT met")
    assert got["msgm fwd >= 60% of copy bandwidth"] == ("70%", "met")
    assert got["msgm saved activations <= 0.5 x eager"] == ("0.10x", "met")
    assert got["esam fwd+bwd fused >= 4.0x eager"][1].startswith("not measured")
    assert got["training step fused >= 3x eager (images/s)"] == ("2.25x", "NOT met")
    assert got["training peak memory fused <= 40% of eager"] == ("30%", "met")
    assert got["inference 180x320 -> 720x1280 <= 2 ms (bf16, best fused)"] == ("1.500 ms", "met")
    assert got["inference fused >= 8x eager"] == ("13.33x", "met")
    assert got["CUDA-graph inference: 1 graph launch per call"][1] == "met"
    assert got["training step (fwd+bwd) launches <= 250"] == ("300", "NOT met")
    assert got["inference forward launches <= 90"] == ("80", "met")
    assert got["GPU tests pass (pytest -m gpu)"][1].startswith("not measured")
    table = gpu_verdict.verdict_table(gpu_verdict.targets(doc))
    assert table.splitlines()[0] == "| target | source | measured | verdict |"


def test_kernel_times_table_from_profiler_events():
    """The kernels part's arithmetic on synthetic profiler events (the part itself needs
    a GPU): per-call time and launches, modelled bytes -> GB/s and % of copy bandwidth."""
    from types import SimpleNamespace

    from bench import gpu_parts

    def event(name, us, device="DeviceType.CUDA"):
        return SimpleNamespace(name=name, device_type=device,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))  # fmt: skip

    events = [event("msgm_fwd_kernel", 300.0)] * 4 + [
        event("void at::native::elementwise_kernel<128, 4>(int)", 100.0),
        event("aten::add", 50.0, device="DeviceType.CPU"),
    ]
    times = gpu_parts.aggregate_device_events(events, calls=2)
    assert times["msgm_fwd_kernel"] == {"launches": 2.0, "ms": 0.6}
    assert times["void at::native::elementwise_kernel"]["launches"] == 0.5
    table = gpu_parts.kernel_table(times, {"msgm_fwd_kernel": 3e9}, copy_bw=4e12)
    first = table["rows"][0]
    assert first["kernel"] == "msgm_fwd_kernel" and abs(first["gb_per_s"] - 5000.0) < 1e-6
    assert abs(first["copy_fraction"] - 1.25) < 1e-9 and abs(table["kernel_ms"] - 0.65) < 1e-9
    doc = {"parts": {"kernels": {"status": "ok", "result": {"train": table}}}}
    assert "| msgm_fwd_kernel | 2.0 | 0.600 | 92% | 3.00 | 5000 | 125% |" in gpu_verdict.markdown(
        {**doc, "date": "-", "command": "-", "dry": False}, [], None
    )


def test_profile_bytes_ratio_from_ssiu_profile_json():
    """The verdict reads bytes / floor from `ssiu profile --json`'s own keys (the first
    GPU run printed "no `ssiu profile` figure": the lookup missed bytes.total/floor)."""
    train = {"bytes": {"triton": 17.7e9, "total": 19.06e9, "floor": 3.24e9}}  # the real keys
    doc = {"parts": {"profile": {"status": "ok", "result": {"train": train}}}}
    assert abs(gpu_verdict._profile_bytes_ratio(doc) - 19.06 / 3.24) < 1e-9


def test_working_tree_names_the_files_not_the_head(tmp_path, monkeypatch):
    """The report's tree hash is that of the files as they are (what a lent machine runs),
    equal to `git rev-parse COMMIT^{tree}` of the commit they match."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    run = lambda *a: subprocess.run([*git, *a], check=True, capture_output=True, text=True)
    run("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    run("add", "a.py")
    run("commit", "-qm", "one")
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    head_tree = lambda: run("rev-parse", "--short=12", "HEAD^{tree}").stdout.strip()
    assert gpu_check.working_tree() == head_tree()
    (tmp_path / "a.py").write_text("x = 2\n")  # the copied files are newer than HEAD
    newer = gpu_check.working_tree()
    assert newer != head_tree()
    run("commit", "-qam", "two")
    assert newer == head_tree()
