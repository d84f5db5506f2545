"""One prepared GPU check: validate and benchmark everything in one call (`make gpu-check`).

    python3 bench/gpu_check.py            # on a CUDA machine, from the repository root
    python3 bench/gpu_check.py --dry      # the same parts at toy sizes on the CPU

Parts, each a subprocess with a hard time budget (stopped with its process group when
it runs over; what it measured so far is kept, the rest go on; time a part leaves unused
passes to the next, so the whole run ends within --budget seconds):

1. install  `pip install --no-deps --no-build-isolation --no-index -e .` (offline), or, if
            that fails, the import shim bench/gpu_shim (PYTHONPATH) for `ssiu.kernels`
2. env      device, driver, versions, measured copy bandwidth and matrix rates
3. tests    `pytest -m gpu` (parity in fp32/bf16/fp16 at C = 64, tests/test_gpu.py ...)
4. sanitizer compute-sanitizer memcheck and racecheck over a small fused fwd+bwd
5. kernels  each kernel's CUDA time in one fused training step and one inference, with
            the bytes `ssiu profile` models for it (achieved GB/s, % of copy bandwidth)
6. bisect   the whole model with only some modules fused, fp32 and bf16: which one makes
            its gradients further from float64 than eager's
7. sweep    MSGM forward/backward times under other tile, warp and stage configs
8. e2e      training step (x4, batch 40, 64x64, bf16), 180x320 inference, CUDA graphs,
            launch counts, saved activations; torch.compile rows last
9. ops      every op x fwd/bwd/fwd+bwd (training shape) and infer, for eager,
            compile, fused, fused+compile
10. profile `ssiu profile` (static launches and bytes) where ssiu.profile exists

Output (--out, default $OUT, else bench/reports/gpu-check-<date>): gpu_check.json (all
results), report.md (verdict, parts, tests, benchmark tables), gpu_check.log (every
part's output), speedup.png, bandwidth.png, memory.png: 6 files, rewritten after each
part. The verdict table (each target, measured value, met or not) is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench.*` when run as a script

from bench import gpu_verdict  # noqa: E402

# Seconds per part on a GPU (the default parts sum to 465: an 8-minute call, with room for the
# report; sweep is extra) and in the dry run (CPU, toy sizes: about 3 minutes on 2 shared cores).
BUDGETS = {"install": 20, "env": 15, "tests": 100, "sanitizer": 40, "kernels": 35, "bisect": 25,
           "sweep": 60, "e2e": 130, "ops": 80, "profile": 20}  # fmt: skip
DRY_BUDGETS = {"install": 20, "env": 15, "tests": 60, "sanitizer": 40, "kernels": 10, "bisect": 5,
               "sweep": 40, "e2e": 60, "ops": 60, "profile": 20}  # fmt: skip
# The dry run's pytest selection: the whole-model tests take minutes in the interpreter
# (`--dry-tests all` runs them too); the rest of tests/test_gpu.py is still collected.
DRY_TESTS = "keep_set or device_guard or cuda_graph"


class Run:
    """One GPU check: the work folder, the output folder, the environment of the parts."""

    def __init__(self, out: Path, dry: bool, dry_tests: str, tests_k: str = ""):
        self.out, self.dry, self.dry_tests, self.tests_k = out, dry, dry_tests, tests_k
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        if dry:
            self.env.update(TRITON_INTERPRET="1", SSIU_GPU_DRY="1", CUDA_VISIBLE_DEVICES="")
        self.doc = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "dry": dry,
            "git_commit": _git_commit(),
            "git_tree": working_tree(),
            "python": sys.executable,
            "parts": {},
        }
        self.log = out / "gpu_check.log"
        self.log.write_text(f"GPU check {self.doc['date']} (dry={dry})\n")

    def py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def part(self, name: str, argv: list[str], budget: float, env=None) -> dict:
        """Run argv with a hard timeout; record status, seconds and its log."""
        started = time.monotonic()
        log_path = self.work / f"{name}.log"
        print(f"\n=== {name} (budget {budget:.0f} s)", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                rc = proc.wait(timeout=max(budget, 1))
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status = f"stopped at its budget ({budget:.0f} s)"
        seconds = round(time.monotonic() - started, 1)
        text = log_path.read_text(errors="replace")
        with open(self.log, "a") as f:
            f.write(f"\n===== {name}: {status}, {seconds} s\n{text}")
        tail = "\n".join(text.rstrip().splitlines()[-8:])
        print(tail, f"\n--- {name}: {status} in {seconds} s", flush=True)
        record = {"status": status, "seconds": seconds, "budget": round(budget)}
        self.doc["parts"][name] = record
        return record

    def load(self, part: str) -> dict | None:
        path = self.work / f"{part}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def rows(self, part: str) -> list[dict]:
        path = self.work / f"{part}.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the part and every process it started (pytest workers, compute-sanitizer)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _git(*args: str, env: dict | None = None) -> str | None:
    """git's output here, or None where git fails or is missing."""
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, text=True, capture_output=True,
                              timeout=30, env=env)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_commit() -> str:
    return _git("rev-parse", "--short=12", "HEAD") or "unknown"


def working_tree() -> str:
    """The git tree hash of the files as they are here (tracked and untracked, not
    ignored), staged in a scratch index: on a lent machine the repository's metadata may
    be older than the tree that was copied there (the second H200 run's HEAD read the
    session's first commit), while `git rev-parse COMMIT^{tree}` of the commit that was
    run gives this same hash."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(scratch, "index"))
        if _git("add", "-A", ".", env=env) is None:
            return "unknown"
        return (_git("write-tree", env=env) or "unknown")[:12]


# ---------------------------------------------------------------------------- parts

PROBE = "import ssiu, ssiu.kernels; print(ssiu.__file__); print(ssiu.kernels.__file__)"


def _imports_this_checkout(run: Run, env: dict) -> bool:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    paths = proc.stdout.split()
    return (
        proc.returncode == 0
        and len(paths) == 2
        and all(Path(p).resolve().is_relative_to(REPO) for p in paths)
    )


def install(run: Run, budget: float) -> None:
    """An offline editable install, else the import shim; the parts then import this
    checkout's `ssiu` and `ssiu.kernels`. The dry run leaves the environment alone and
    checks the shim instead."""
    started = time.monotonic()
    shim_env = dict(run.env)
    shim_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "gpu_shim"),
                                              run.env["PYTHONPATH"]])  # fmt: skip
    if run.dry:
        ok = _imports_this_checkout(run, shim_env)
        mode = "shim checked (dry run: pip not run)" if ok else "shim BROKEN"
    elif _imports_this_checkout(run, run.env):
        mode = "already importable from this checkout"
    else:
        rec = run.part("install", run.py("-m", "pip", "install", "--no-deps",
                                          "--no-build-isolation", "--no-index", "-q", "-e",
                                          str(REPO)), budget)  # fmt: skip
        if rec["status"] == "ok" and _imports_this_checkout(run, run.env):
            mode = "pip install -e (offline)"
        else:
            run.env = shim_env
            mode = "import shim (bench/gpu_shim)"
            if not _imports_this_checkout(run, run.env):
                mode += " BROKEN"
    seconds = round(time.monotonic() - started, 1)
    status = "ok" if "BROKEN" not in mode else "failed"
    run.doc["parts"]["install"] = {"status": status, "seconds": seconds, "budget": round(budget),
                                   "result": {"mode": mode}}  # fmt: skip
    print(f"install: {mode}", flush=True)


def python_part(name: str):
    def go(run: Run, budget: float) -> None:
        argv = run.py("-m", "bench.gpu_parts", name, "--work", str(run.work))
        rec = run.part(name, argv + (["--dry"] if run.dry else []), budget)
        result = run.load(name) or {}
        rows = run.rows(name)
        if rows:
            result["rows"] = rows
        rec["result"] = result

    return go


def tests(run: Run, budget: float) -> None:
    junit = run.work / "junit.xml"
    argv = run.py("-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  "-o", "console_output_style=classic", "-rfE")  # fmt: skip
    if run.dry:
        argv += ["tests/test_gpu.py"] + ([] if run.dry_tests == "all" else ["-k", run.dry_tests])
    else:
        argv += ["-m", "gpu"] + (["-k", run.tests_k] if run.tests_k else [])
        if _has_module(run, "xdist"):
            argv += ["-n", "4"]  # Triton compiles in parallel; the GPU has room for four
        if _has_module(run, "pytest_timeout"):
            argv += ["--timeout", "100"]
    rec = run.part("tests", argv, budget)
    rec["result"] = (
        parse_junit(junit)
        if junit.exists()
        else parse_pytest_log((run.work / "tests.log").read_text(errors="replace"))
    )


def _has_module(run: Run, name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def parse_junit(path: Path) -> dict:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().replace("\n", " ")
        cases.append({"name": name, "outcome": outcome, "message": message[:500]})
    return _summarise(cases)


def parse_pytest_log(text: str) -> dict:
    """Outcomes from `pytest -v` lines, when pytest was stopped before writing its XML."""
    import re

    cases = {}
    pattern = re.compile(r"(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED)|(PASSED|FAILED|ERROR|"
                         r"SKIPPED)\s+(\S+::\S+)")  # fmt: skip
    for m in pattern.finditer(text):
        name, word = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        cases[name] = {"name": name, "outcome": {"ERROR": "error"}.get(word, word.lower()),
                       "message": ""}  # fmt: skip
    result = _summarise(list(cases.values()))
    result["incomplete"] = True
    return result


def _summarise(cases: list[dict]) -> dict:
    count = lambda o: sum(c["outcome"] == o for c in cases)
    return {"total": len(cases), "passed": count("passed"), "failed": count("failed"),
            "errors": count("error"), "skipped": count("skipped"), "cases": cases}  # fmt: skip


def sanitizer(run: Run, budget: float) -> None:
    """memcheck then racecheck over bench.gpu_parts sanitize_target; in the dry run (or
    where compute-sanitizer is missing) the target alone, to check that it runs."""
    started = time.monotonic()
    target = run.py("-m", "bench.gpu_parts", "sanitize_target", "--work", str(run.work))
    tool_path = shutil.which("compute-sanitizer")
    result = {}
    if run.dry or not tool_path:
        why = "dry run" if run.dry else "compute-sanitizer not found"
        rec = run.part("sanitizer", target + (["--dry"] if run.dry else []), budget)
        for tool in ("memcheck", "racecheck"):
            result[tool] = {"status": f"not run ({why}; target {rec['status']})"}
    else:
        for i, tool in enumerate(("memcheck", "racecheck")):
            left = budget - (time.monotonic() - started)
            share = left * (0.55 if i == 0 else 1.0)
            env = dict(run.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every buffer its own
            argv = [tool_path, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20",
                    *target]  # fmt: skip
            rec = run.part(f"sanitizer_{tool}", argv, share, env=env)
            text = (run.work / f"sanitizer_{tool}.log").read_text(errors="replace")
            result[tool] = _sanitizer_result(rec["status"], text)
    run.doc["parts"]["sanitizer"] = {
        "status": "ok" if all(r.get("errors") == 0 for r in result.values()) else "see result",
        "seconds": round(time.monotonic() - started, 1), "budget": round(budget),
        "result": result,
    }  # fmt: skip


def _sanitizer_result(status: str, text: str) -> dict:
    import re

    summary = [ln.strip() for ln in text.splitlines() if "SUMMARY" in ln]
    m = re.search(r"ERROR SUMMARY: (\d+) error", text) or re.search(r"\((\d+) errors?", text)
    errors = int(m.group(1)) if m else None
    if "Device not supported" in text or "not supported" in text.lower() and errors is None:
        status = "not supported on this device (skipped)"
    return {"status": status, "errors": errors, "summary": "; ".join(summary)[:300]}


PARTS = {
    "install": install,
    "env": python_part("env"),
    "tests": tests,
    "sanitizer": sanitizer,
    "kernels": python_part("kernels"),
    "bisect": python_part("bisect"),
    "sweep": python_part("sweep"),
    "e2e": python_part("e2e"),
    "ops": python_part("ops"),
    "profile": python_part("profile"),
}

# The default run (465 s of budgets); `sweep` is asked for by name (--parts).
DEFAULT_PARTS = [name for name in PARTS if name != "sweep"]


# ---------------------------------------------------------------------------- output


def write_outputs(run: Run, plots: bool) -> list[dict]:
    """gpu_check.json, report.md (verdict + benchmark tables) and, with plots, the PNGs."""
    verdict = gpu_verdict.targets(run.doc)
    run.doc["verdict"] = verdict
    bench_doc = _bench_doc(run)
    bench_md = None
    if bench_doc:
        try:
            _shim_in_process()
            from ssiu.benchmark import report

            if plots:
                report.write_plots(bench_doc, run.out)
            bench_md = report.markdown_report(bench_doc)
        except Exception as e:  # the report must still be written
            bench_md = f"# -\n\n(benchmark report failed: {type(e).__name__}: {e})"
    (run.out / "gpu_check.json").write_text(json.dumps(run.doc, indent=1, default=str))
    (run.out / "report.md").write_text(gpu_verdict.markdown(run.doc, verdict, bench_md))
    return verdict


def _shim_in_process() -> None:
    """This process started before any install, so its import system may not know
    `ssiu.kernels`: the shim's finder maps it to this checkout (as an install would)."""
    import importlib.util

    path = REPO / "bench" / "gpu_shim" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("_ssiu_gpu_shim", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _bench_doc(run: Run) -> dict | None:
    """The ops and e2e rows in `ssiu bench`'s document form, for its tables and plots."""
    parts = run.doc["parts"]
    rows = (parts.get("ops") or {}).get("result", {}).get("rows", [])
    e2e = (parts.get("e2e") or {}).get("result", {}).get("rows", [])
    if not rows and not e2e:
        return None
    stamp = {k: (rows + e2e)[0].get(k) for k in ("device", "device_name", "torch", "triton",
                                                   "python", "git_commit", "driver", "cuda",
                                                   "date")}  # fmt: skip
    rates = (parts.get("ops") or {}).get("result", {}).get("rates") or (
        (parts.get("e2e") or {}).get("result", {}).get("rates") or {}
    )
    return {"stamp": stamp, "rates": rates, "command": run.doc["command"], "rows": rows,
            "e2e": e2e, "notes": []}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dry", action="store_true", help="CPU, toy sizes, interpreter")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default $OUT, else bench/reports/gpu-check-<date>)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all parts (default: the sum of the part budgets)",
    )
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help="comma-separated subset, in order (default: all but sweep)")  # fmt: skip
    p.add_argument(
        "--dry-tests",
        default=DRY_TESTS,
        help="pytest -k expression of the dry run's tests ('all': every test)",
    )
    p.add_argument("--tests-k", default="", help="pytest -k expression of the GPU tests")
    p.add_argument(
        "--e2e-providers",
        default="",
        help="comma-separated e2e providers to run (default: all; e.g. 'compile' for a rerun)",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    budgets = DRY_BUDGETS if args.dry else BUDGETS
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    total = args.budget or sum(budgets[n] for n in names)
    scale = total / sum(budgets[n] for n in names)
    date = datetime.date.today().isoformat()
    out = args.out or Path(
        os.environ.get("OUT") or REPO / "bench" / "reports" / f"gpu-check-{date}"
    )
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry, args.dry_tests, args.tests_k)
    if args.e2e_providers:
        run.env["SSIU_E2E_PROVIDERS"] = args.e2e_providers
    started, planned = time.monotonic(), 0.0
    for name in names:
        planned += budgets[name] * scale
        # Unused time passes on: part i may run until the sum of budgets 1..i is spent.
        left = planned - (time.monotonic() - started)
        PARTS[name](run, max(left, 5.0))
        write_outputs(run, plots=False)
    verdict = write_outputs(run, plots=not args.no_plots)
    print(f"\nwrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print("parts: " + ", ".join(f"{k} {v['status']}" for k, v in run.doc["parts"].items()))
    print("\nVERDICT" + (" (DRY RUN: nothing measured on a GPU)" if args.dry else ""))
    print(gpu_verdict.verdict_table(verdict), flush=True)
    shutil.rmtree(run.work, ignore_errors=True)  # everything worth keeping is in `out`
    broken = [k for k, v in run.doc["parts"].items() if v["status"].startswith("failed")]
    return 1 if args.dry and broken else 0


if __name__ == "__main__":
    sys.exit(main())
