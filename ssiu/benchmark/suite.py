"""Run every op's benchmark and the end-to-end rows; write report.json, report.md, PNGs.

`run_suite(out_dir, quick=True)` is what `ssiu bench --quick` calls.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ssiu.benchmark import e2e, harness, report

# On a CPU, --quick compiles only these (case, mode) pairs: torch.compile of every case
# takes minutes on a small CPU; the two cheapest ops and the whole model (~35 s for the
# training step, ~10 s for inference on 2 cores, cold cache) are compiled. Everything
# else compiled says SKIPPED_QUICK. On CUDA --quick compiles
# everything (at the small shapes).
QUICK_CPU_COMPILE = {
    ("layer_norm2d", "fwd"),
    ("layer_norm2d", "infer"),
    ("train_step_x4", "train"),
    ("inference_x4", "infer"),
}
SKIPPED_QUICK = "skipped (--quick)"
# In the report while the run is going on (it is rewritten after every row).
PARTIAL_NOTE = (
    "Partial report: written after every row while the run went on; the run did not finish "
    "(or is still running)."
)


def _skip(quick: bool, device: torch.device, provider: str, key: tuple, allowed) -> str | None:
    if quick and device.type == "cpu" and provider == "compile" and key not in allowed:
        return SKIPPED_QUICK
    return None


def _restores_inductor_config(fn):
    """Run `fn` with Inductor's config restored afterwards (`_serial_inductor` changes it
    for the timings only, not for the rest of the process)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            import torch._inductor.config as inductor_config
        except ImportError:
            return fn(*args, **kwargs)
        with inductor_config.patch(compile_threads=inductor_config.compile_threads):
            return fn(*args, **kwargs)

    return wrapper


@_restores_inductor_config
def run_suite(
    out_dir: str | Path,
    *,
    quick: bool = False,
    ops: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    providers: Sequence[str] = harness.PROVIDER_NAMES,
    presets: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    shape: Sequence[int] | None = None,
    e2e_rows: bool = True,
    e2e_shapes: dict | None = None,
    reps: int | None = None,
    warmup: int | None = None,
    plots: bool = True,
    quick_cpu_compile: set | None = None,
    command: str = "",
    log: Callable[[str], None] | None = print,
) -> dict:
    """Check and time every (op, preset, mode, provider) and the end-to-end rows.

    quick: the tiny "quick" preset (and, on a CPU, few torch.compile runs); otherwise the
    "train" and "infer" presets. shape: one (N, C, H, W) for every op (overrides presets).
    e2e_shapes: {row name: (batch, h, w)} instead of the preset's. quick_cpu_compile: the
    (op, mode) pairs compiled under quick on a CPU (default QUICK_CPU_COMPILE). Returns the document
    written to out_dir/report.json, with "paths" of everything written.
    """
    log = log or (lambda s: None)
    device = torch.device(device) if device is not None else harness.default_device()
    dtype = dtype or harness.default_dtype(device)
    presets = list(presets or (["quick"] if quick else ["train", "infer"]))
    if reps is None:
        reps = 5 if quick else 20
    if warmup is None:
        warmup = 1 if quick else 3
    cases = harness.get_cases()
    names = list(ops or cases)
    unknown = [n for n in names if n not in cases and n not in e2e.MODE]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {sorted(cases) + sorted(e2e.MODE)}")
    bad = [m for m in (modes or ()) if m not in harness.MODES + ("train",)]
    if bad:
        raise ValueError(f"unknown modes {bad}; known: {harness.MODES + ('train',)}")
    bad = [p for p in providers if p not in harness.PROVIDERS]
    if bad:
        raise ValueError(f"unknown providers {bad}; known: {tuple(harness.PROVIDERS)}")
    allowed = QUICK_CPU_COMPILE if quick_cpu_compile is None else set(quick_cpu_compile)
    load = _load_average()
    if device.type == "cpu":
        _serial_inductor()
    started = time.perf_counter()
    rates = harness.device_rates(device, dtype)
    rows, e2e_out = [], []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "stamp": harness.environment_stamp(device),
        "rates": rates,
        "command": command,
        "quick": quick,
        "rows": rows,  # filled in as measured
        "e2e": e2e_out,
        "load_average": load,
        "notes": [],
        "elapsed_s": None,
        "complete": False,
    }

    def measured(row: dict, into: list) -> None:
        """Keep a row, show it, and rewrite the report: an interrupted run leaves what
        it measured."""
        into.append(row)
        doc["notes"] = _notes(quick, device, rows + e2e_out, load) + [PARTIAL_NOTE]
        doc["elapsed_s"] = round(time.perf_counter() - started, 1)
        _write_reports(doc, out)
        log(_line(row))

    for name in (n for n in names if n in cases):
        for preset in presets:
            for mode in harness.PRESET_MODES[preset]:
                if modes and mode not in modes:
                    continue
                for provider in providers:
                    row = harness.measure(
                        cases[name],
                        provider,
                        mode,
                        shape=shape,
                        preset=preset,
                        dtype=dtype,
                        device=device,
                        reps=reps,
                        warmup=warmup,
                        rates=rates,
                        skip=_skip(quick, device, provider, (name, mode), allowed),
                    )
                    measured(row, rows)
    if e2e_rows:
        wanted = [n for n in names if n in e2e.MODE] if ops else list(e2e.MODE)
        for preset in presets:
            shapes = e2e_shapes or e2e.SHAPES[preset]
            for name, (batch, h, w) in shapes.items():
                if name not in wanted or (modes and e2e.MODE[name] not in modes):
                    continue
                for provider in providers:
                    skip = _skip(quick, device, provider, (name, e2e.MODE[name]), allowed)
                    row = e2e.measure_e2e(
                        name,
                        batch,
                        h,
                        w,
                        provider,
                        device=device,
                        dtype=dtype,
                        reps=reps,
                        warmup=warmup,
                        rates=rates,
                        preset=preset,
                        skip=skip,
                    )
                    measured(row, e2e_out)
    doc["notes"] = _notes(quick, device, rows + e2e_out, load)
    doc["complete"] = True
    paths = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            doc["notes"].append("No plots: matplotlib is not installed (pip install matplotlib).")
        else:
            paths = report.write_plots(doc, out)
    doc["plots"] = [p.name for p in paths]
    doc["elapsed_s"] = round(time.perf_counter() - started, 1)
    json_path, md_path = _write_reports(doc, out)
    doc["paths"] = [json_path, md_path, *paths]
    log(f"wrote {', '.join(str(p) for p in doc['paths'])} in {doc['elapsed_s']} s")
    return doc


def _write_reports(doc: dict, out: Path) -> tuple[Path, Path]:
    """report.json and report.md, each written to a temporary file then renamed (a run
    killed mid-write leaves the previous version, never half a file)."""
    paths = out / "report.json", out / "report.md"
    texts = json.dumps(doc, indent=1, default=str), report.markdown_report(doc)
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def _line(row: dict) -> str:
    t = "-" if row["median_ms"] is None else f"{row['median_ms']:.3f} ms"
    return (
        f"{row['op']:14} {row['shape']:16} {row['mode']:8} {row['provider']:14} {t:>12}  "
        f"{row['status']}"
    )


def _serial_inductor() -> None:
    """Compile in this process on a CPU: inductor's pool of compile workers otherwise
    keeps starting up in the background after the first compile and competes with the
    timed runs (seen on 2 cores: a 0.05 ms op timed at 24 ms, the eager training step
    at 7x its time). Timings only; on CUDA the pool is left alone."""
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    except (ImportError, AttributeError):
        pass


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages of the machine when the run started (Unix)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _notes(quick: bool, device: torch.device, rows: list[dict], load=None) -> list[str]:
    notes = []
    cores = os.cpu_count() or 1
    if load and device.type == "cpu" and load[0] > 0.5 * cores:
        notes.append(
            f"The CPU was shared: load average {load[0]:.2f} on {cores} cores when the run "
            "started, so other processes competed for it and the CPU times are noisy."
        )
    if device.type != "cuda":
        notes.append(
            "No GPU: the fused providers run only on CUDA (on a CPU they would run the Triton "
            "interpreter), so their rows say 'not measured (no GPU)'. CPU times check the "
            "harness on tiny shapes; they say nothing about the kernels."
        )
    if any(r["status"] == SKIPPED_QUICK for r in rows):
        compiled = sorted(
            {
                (r["op"], r["mode"])
                for r in rows
                if r["provider"] == "compile" and r["status"] != SKIPPED_QUICK
            }
        )
        notes.append(
            "--quick on a CPU: torch.compile runs only for "
            + (", ".join(f"{op} {mode}" for op, mode in compiled) or "nothing")
            + " (compiling every case takes minutes on a small CPU); "
            "the other compile rows say 'skipped (--quick)'."
        )
    if quick:
        notes.append(
            "--quick: tiny shapes (ops 2x64x16x16; training step batch 2 of 16x16 "
            "LR; inference 1x3x24x32), few repetitions: not the canonical workloads."
        )
    return notes


def main_log(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
