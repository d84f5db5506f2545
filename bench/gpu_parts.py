"""The parts of the GPU check that run Python, one subprocess each (bench/gpu_check.py).

    python -m bench.gpu_parts PART --work DIR [--dry]

PART: env (device, versions, copy bandwidth, matrix rate), ops (every op x mode x
provider of the benchmark), e2e (training step, inference, CUDA-graph path, launch counts,
saved activations), sanitize_target (one small fused forward+backward for
compute-sanitizer), profile (`ssiu profile`, where that module exists). Each part writes
DIR/PART.json; the benchmark parts also append each row to DIR/PART.jsonl as soon as it
is measured, so a part stopped at its time budget keeps what it measured. --dry: CPU,
toy sizes, the fused kernels through the Triton interpreter where they run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _write(work: Path, part: str, doc: dict) -> None:
    (work / f"{part}.json").write_text(json.dumps(doc, indent=1, default=str))


def _append(work: Path, part: str, row: dict) -> None:
    with open(work / f"{part}.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(_line(row), flush=True)


def _line(row: dict) -> str:
    t = "-" if row.get("median_ms") is None else f"{row['median_ms']:.3f} ms"
    return f"{row['op']:16} {row['shape']:16} {row['mode']:8} {row['provider']:16} {t:>12}  " \
           f"{row['status']}"  # fmt: skip


def _guarded(fields: dict, measure, *args, **kwargs) -> dict:
    """measure(*args, **kwargs) or, where it raises (out of memory, a compile error), a row
    that says so: one failing row must not end the part."""
    from ssiu.benchmark import harness

    try:
        return measure(*args, **kwargs)
    except Exception as e:
        row = {f: None for f in harness.FIELDS}
        row.update(fields, status=harness.error_status(e))
        return row
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _device(dry: bool) -> torch.device:
    return torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median of `reps` timed calls (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------- env


def _run_text(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def part_env(work: Path, dry: bool) -> dict:
    """Device, driver, versions, tools, and the two roofline ceilings measured here:
    device-to-device copy bandwidth (bytes read + written) and the bf16 / fp32 matrix
    rates, on random data (never zeros: they run faster than real data)."""
    import triton

    device = _device(dry)
    doc = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "kernel": platform.release(),  # gVisor reports 4.4.0; Firecracker a *-fc-* kernel
        "cpu_cores": os.cpu_count(),
        "gpu_count": torch.cuda.device_count(),
        "tools": {t: shutil.which(t) for t in ("nvidia-smi", "compute-sanitizer", "ncu")},
    }
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                     "clocks.max.sm,power.limit", "--format=csv,noheader"])  # fmt: skip
    doc["nvidia_smi"] = smi
    doc["driver"] = smi.split(",")[1].strip() if smi and "," in smi else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        doc.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   l2_mib=getattr(props, "L2_cache_size", 0) / 2**20)  # fmt: skip
    else:
        doc["device_name"] = f"{platform.processor() or platform.machine()} (CPU, dry run)"
    n = 2**20 if dry else 2**28  # 1 GiB of fp32 on a GPU: far past the L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda d=dst, s=src: d.copy_(s), device, reps=3 if dry else 20)
    doc["copy_bw"] = 2 * n * 4 / (ms * 1e-3)
    del src, dst
    rates = {}
    for name, dtype, m in (("bfloat16", torch.bfloat16, 8192), ("float32", torch.float32, 4096)):
        m = 128 if dry else m
        a, b = (torch.randn(m, m, device=device).to(dtype) for _ in range(2))
        ms = _median_ms(lambda a=a, b=b: a @ b, device, reps=3 if dry else 10)
        rates[name] = 2 * m**3 / (ms * 1e-3)
    doc["matrix_flops"] = rates  # fp32: torch's default, no TF32 for matmul
    _write(work, "env", doc)
    print(json.dumps(doc, indent=1, default=str))
    return doc


def _rates(work: Path, dtype: torch.dtype) -> dict | None:
    """The env part's measured ceilings in the harness's `rates` form, if it ran."""
    path = work / "env.json"
    if not path.exists():
        return None
    env = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    matrix = env["matrix_flops"].get(name) or env["matrix_flops"]["bfloat16"]
    return {"copy_bw": env["copy_bw"], "copy_bw_source": "measured by gpu-check (copy_)",
            "matrix_flops": matrix, "matrix_source": f"measured by gpu-check ({name} matmul)",
            "dtype": name}  # fmt: skip


# ------------------------------------------------------------------------------- ops

PROVIDER_ORDER = (("eager", "fused"), ("compile", "fused+compile"))
MODE_ORDER = ("fwd+bwd", "fwd", "bwd", "infer")


def ops_plan(dry: bool) -> list[tuple[str, str, str, str]]:
    """(op, preset, mode, provider) in the order they run: what the targets need first
    (fwd+bwd at the training shape, eager and fused), the torch.compile rows last (their
    compiles take the longest; a stopped part then loses those first)."""
    from ssiu.benchmark import harness

    plan = []
    for providers in PROVIDER_ORDER:
        for mode in MODE_ORDER:
            preset = "quick" if dry else ("infer" if mode == "infer" else "train")
            for op in harness.get_cases():
                plan += [(op, preset, mode, p) for p in providers]
    return plan


def part_ops(work: Path, dry: bool) -> None:
    from ssiu.benchmark import harness

    device = _device(dry)
    dtype = harness.default_dtype(device)
    rates = _rates(work, dtype) or harness.device_rates(device, dtype)
    cases = harness.get_cases()
    if dry:
        _interpreted_fused_provider(harness)
    for op, preset, mode, provider in ops_plan(dry):
        skip = None
        if dry and provider in ("compile", "fused+compile"):
            skip = "skipped (dry run)"  # minutes of inductor on a small CPU
        elif dry and provider == "fused" and op != "layer_norm2d":
            skip = "skipped (dry run: the interpreter is slow)"
        shape = (1, 16, 16, 16) if dry else None
        size = "x".join(map(str, shape or cases[op].shapes[preset]))
        fields = dict(op=op, shape=size, mode=mode, provider=provider, preset=preset)
        row = _guarded(fields, harness.measure, cases[op], provider, mode, shape=shape,
                       preset=preset, dtype=dtype, device=device, reps=2 if dry else 20,
                       warmup=0 if dry else 3, rates=rates, skip=skip)  # fmt: skip
        _append(work, "ops", row)
    _write(work, "ops", {"rates": rates, "done": True})


def _interpreted_fused_provider(harness) -> None:
    """Dry run: let the fused provider run on the CPU through the Triton interpreter, so
    the fused rows' code path (check, timing, bandwidth) runs too."""
    import dataclasses

    fused = harness.PROVIDERS["fused"]
    harness.PROVIDERS["fused"] = dataclasses.replace(fused, unavailable=lambda device: None)


# ------------------------------------------------------------------------------- e2e

E2E_SHAPES = {"train": {"train_step_x4": (40, 64, 64)}, "infer": {"inference_x4": (1, 180, 320)}}
E2E_DRY = {"train_step_x4": (1, 16, 16), "inference_x4": (1, 16, 16)}


def part_e2e(work: Path, dry: bool) -> None:
    """Training step and inference rows (eager, fused), launch counts and saved
    activations, the CUDA-graph row, then the torch.compile rows (slowest to build)."""
    from ssiu.benchmark import e2e, harness

    device = _device(dry)
    dtype = harness.default_dtype(device)
    rates = _rates(work, dtype) or harness.device_rates(device, dtype)
    shapes = E2E_DRY if dry else {**E2E_SHAPES["train"], **E2E_SHAPES["infer"]}
    reps, warmup = (2, 0) if dry else (10, 2)
    if dry:
        from ssiu.model import build

        e2e.build = lambda scale: build(scale, **TINY)  # the rows' model, at toy size

    def row(name, provider):
        batch, h, w = shapes[name]
        skip = "skipped (dry run)" if dry and "compile" in provider else None
        preset = "quick" if dry else e2e.MODE[name]  # "train" or "infer"
        fields = dict(op=name, shape=f"{batch}x3x{h}x{w}", mode=e2e.MODE[name],
                      provider=provider, preset=preset)  # fmt: skip
        r = _guarded(fields, e2e.measure_e2e, name, batch, h, w, provider, device=device,
                     dtype=dtype, reps=reps, warmup=warmup, rates=rates, preset=preset,
                     skip=skip)  # fmt: skip
        _append(work, "e2e", r)

    only = [p for p in os.environ.get("SSIU_E2E_PROVIDERS", "").split(",") if p]
    if only:  # a focused rerun: just these rows
        for name in ("train_step_x4", "inference_x4"):
            for provider in only:
                row(name, provider)
        _write(work, "e2e", {"rates": rates, "done": True})
        return
    for name in ("train_step_x4", "inference_x4"):
        for provider in ("eager", "fused"):
            row(name, provider)
    extra = {}
    for key, fn in (("launches", launch_counts), ("saved", saved_activations)):
        try:
            extra[key] = fn(shapes, device, dtype)
        except Exception as e:  # reported, the rest goes on
            extra[key] = {"error": harness.error_status(e)}
        print(key, json.dumps(extra[key], default=str), flush=True)
        _write(work, "e2e", {"rates": rates, **extra})
    _append(work, "e2e", cudagraph_row(shapes["inference_x4"], device, dtype, rates, reps))
    for name in ("train_step_x4", "inference_x4"):
        for provider in ("compile", "fused+compile"):
            row(name, provider)
    _write(work, "e2e", {"rates": rates, **extra, "done": True})


# The dry run's model: the x4 network at toy width and depth (the interpreter is slow).
TINY = dict(channels=16, heads=1, steps=3)


def _model(device, backend: str):
    from ssiu.model import build

    torch.manual_seed(0)
    options = TINY if device.type == "cpu" else {}
    return build(4, **options).to(device).set_backend(backend)


def _autocast(device, dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _images(batch, h, w, device):
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(batch, 3, h, w, generator=gen).to(device)
    hr = torch.rand(batch, 3, 4 * h, 4 * w, generator=gen).to(device)
    return lr, hr


def cudagraph_row(shape, device, dtype, rates, reps) -> dict:
    """inference_x4 on the CUDA-graph path: `compile_for_inference(mode="reduce-overhead",
    static=True)` of the fused model (what `ssiu upscale` uses for repeated tile sizes)."""
    from ssiu.benchmark import harness
    from ssiu.compile import compile_for_inference

    batch, h, w = shape
    row = {f: None for f in harness.FIELDS}
    row.update(harness.environment_stamp(device))
    row.update(op="inference_x4", shape=f"{batch}x3x{h}x{w}", mode="infer",
               dtype=str(dtype).removeprefix("torch."), provider="fused+cudagraph",
               preset="infer", status="ok")  # fmt: skip
    if device.type != "cuda":
        row["status"] = harness.NOT_MEASURED_NO_GPU
        return row
    try:
        model = _model(device, "triton")
        fn = compile_for_inference(model, mode="reduce-overhead", static=True)
        lr, _ = _images(batch, h, w, device)
        with torch.inference_mode(), _autocast(device, dtype):
            ref = model(lr)
            for _ in range(3):  # compile, record, replay
                out = fn(lr)
        err, _ = harness.max_rel_error(out, ref)
        row.update(max_rel_err=err, tolerance=harness.TOLERANCE_FLOOR[dtype])
        if not err <= harness.TOLERANCE_FLOOR[dtype]:
            row["status"] = f"mismatch: output max rel err {err:.3g} vs the fused eager model"
            return row

        def call():
            with torch.inference_mode(), _autocast(device, dtype):
                return fn(lr)

        row.update(harness.time_call(call, device, reps=reps))
        counts = _profile_counts(call)
        row["graph_launches"] = counts["graph_launches"]
        row["kernel_launches"] = counts["host_kernel_launches"]
        row["images_per_s"] = batch / (row["median_ms"] * 1e-3)
    except Exception as e:
        row["status"] = harness.error_status(e)
    return row


HOST_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _profile_counts(fn) -> dict:
    """Kernels and memsets/copies the device ran in one call of fn, by kind, and the host's
    launch calls (kernel launches, CUDA-graph launches): torch.profiler (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {"kernels": 0, "ssiu_triton": 0, "inductor_triton": 0, "other_kernels": 0,
              "memset_memcpy": 0, "host_kernel_launches": 0, "graph_launches": 0}  # fmt: skip
    for e in prof.events():
        name = e.name
        if str(e.device_type).endswith("CUDA"):
            if name.startswith(("Memset", "Memcpy")):
                counts["memset_memcpy"] += 1
                continue
            counts["kernels"] += 1
            if name.startswith("triton_"):
                counts["inductor_triton"] += 1
            elif name.endswith("_kernel"):
                counts["ssiu_triton"] += 1
            else:
                counts["other_kernels"] += 1
        elif name in HOST_LAUNCH:
            counts["host_kernel_launches"] += 1
        elif name == "cudaGraphLaunch":
            counts["graph_launches"] += 1
    counts["launches"] = counts["kernels"] + counts["memset_memcpy"]
    return counts


def launch_counts(shapes, device, dtype) -> dict:
    """Launches of one fused training step (forward + backward, optimizer excluded) and
    one fused inference at the canonical workloads, and of the eager reference."""
    if device.type != "cuda":
        return {"status": "not measured (no GPU)"}
    import torch.nn.functional as F

    out = {}
    for backend in ("triton", "torch"):
        model = _model(device, backend)
        batch, h, w = shapes["train_step_x4"]
        lr, hr = _images(batch, h, w, device)

        def step(model=model, lr=lr, hr=hr):
            model.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = F.l1_loss(model(lr).float(), hr)
            loss.backward()

        out[f"train_{backend}"] = _profile_counts(step)
        batch, h, w = shapes["inference_x4"]
        lr, _ = _images(batch, h, w, device)

        def infer(model=model, lr=lr):
            with torch.inference_mode(), _autocast(device, dtype):
                return model(lr)

        out[f"infer_{backend}"] = _profile_counts(infer)
        del model
        torch.cuda.empty_cache()
    return out


def saved_activations(shapes, device, dtype) -> dict:
    """Bytes of the tensors autograd saves for backward in one training forward (unique
    storages, the parameters and the input not counted), fused vs eager reference."""
    batch, h, w = shapes["train_step_x4"]
    out = {}
    for backend in ("triton", "torch"):
        model = _model(device, backend)
        lr, _ = _images(batch, h, w, device)
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip.add(lr.untyped_storage().data_ptr())
        seen: dict[int, int] = {}

        def pack(t, seen=seen, skip=skip):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, dtype):
            y = model(lr)
        out[backend] = sum(seen.values())
        del y, model, seen
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["ratio"] = out["triton"] / out["torch"] if out["torch"] else None
    return out


# ------------------------------------------------------------------------------- kernels


def part_kernels(work: Path, dry: bool) -> None:
    """Where the fused step's time goes: each kernel's CUDA time per training step
    (forward + backward, optimizer excluded) and per inference at the canonical
    workloads (torch.profiler, the mean of 3 calls after one warm-up), joined with the
    bytes `ssiu profile` models for it: achieved GB/s and % of the measured copy
    bandwidth per kernel, the kernels furthest from it first in time."""
    import torch.nn.functional as F

    device = _device(dry)
    if device.type != "cuda":
        _write(work, "kernels", {"status": "not measured (no GPU)"})
        print("kernels: not measured (no GPU)")
        return
    from bench import gpu_verdict
    from ssiu.benchmark import harness

    dtype = harness.default_dtype(device)
    rates = _rates(work, dtype) or {}
    doc = {"status": "ok", "copy_bw": rates.get("copy_bw")}
    for kind, shape in (("train", E2E_SHAPES["train"]["train_step_x4"]),
                        ("infer", E2E_SHAPES["infer"]["inference_x4"])):  # fmt: skip
        model = _model(device, "triton")
        batch, h, w = shape
        lr, hr = _images(batch, h, w, device)
        if kind == "train":

            def call(model=model, lr=lr, hr=hr):
                model.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    loss = F.l1_loss(model(lr).float(), hr)
                loss.backward()

        else:

            def call(model=model, lr=lr):
                with torch.inference_mode(), _autocast(device, dtype):
                    return model(lr)

        times = kernel_times(call, calls=3)
        static = _static_kernel_bytes(work, kind, batch, h, w)
        doc[kind] = kernel_table(times, static, rates.get("copy_bw"))
        print(f"\n{kind} (fused, {batch}x3x{h}x{w}, {dtype}):")
        print(gpu_verdict.kernel_table(doc[kind], rows=30), flush=True)
        _write(work, "kernels", doc)
        del model
        torch.cuda.empty_cache()


def kernel_times(fn, calls: int) -> dict[str, dict]:
    """{kernel name: {"launches", "ms"}} per call of fn: device time of every CUDA kernel
    and memset/copy over `calls` profiled calls, divided by `calls`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return aggregate_device_events(prof.events(), calls)


def aggregate_device_events(events, calls: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for e in events:
        if not str(e.device_type).endswith("CUDA"):
            continue
        name = e.name if e.name.endswith("_kernel") else _short_name(e.name)
        row = out.setdefault(name, {"launches": 0, "ms": 0.0})
        row["launches"] += 1 / calls
        row["ms"] += e.time_range.elapsed_us() / 1e3 / calls
    return out


def _short_name(name: str) -> str:
    """PyTorch's own kernels have long templated names: keep the first word."""
    return name.split("<")[0].split("(")[0].strip()[:60] or name[:60]


def _static_kernel_bytes(work: Path, kind: str, batch: int, h: int, w: int) -> dict:
    """{kernel: read + written bytes per call} from `ssiu profile --json` at this workload."""
    path = work / f"kernels_static_{kind}.json"
    argv = [sys.executable, "-m", "ssiu", "profile", f"--{kind}", "--json", str(path),
            "--batch", str(batch), "--size", f"{h}x{w}"]  # fmt: skip
    subprocess.run(argv, capture_output=True, text=True)
    if not path.exists():
        return {}
    kernels = json.loads(path.read_text()).get("kernels", {})
    return {k: v.get("read", 0) + v.get("written", 0) for k, v in kernels.items()}


def kernel_table(times: dict, static: dict, copy_bw: float | None) -> dict:
    """Rows by time (largest first), each with its share of the kernel time, the modelled
    bytes and the bandwidth they imply; totals."""
    total = sum(r["ms"] for r in times.values())
    rows = []
    for name, r in sorted(times.items(), key=lambda kv: -kv[1]["ms"]):
        nbytes = static.get(name)
        gbs = nbytes / (r["ms"] * 1e-3) / 1e9 if nbytes and r["ms"] else None
        rows.append({
            "kernel": name, "launches": round(r["launches"], 2), "ms": r["ms"],
            "share": r["ms"] / total if total else None, "modelled_gb": (nbytes or 0) / 1e9,
            "gb_per_s": gbs, "copy_fraction": gbs * 1e9 / copy_bw if gbs and copy_bw else None,
        })  # fmt: skip
    return {"kernel_ms": total, "launches": sum(r["launches"] for r in times.values()),
            "rows": rows}  # fmt: skip


# ------------------------------------------------------------------------------- bisect

# Which fused modules run on the "triton" backend in each bisect variant (the rest torch).
BISECT = {  # the dry run (--bisect-dry) takes the first two
    "all": ("LayerNorm2d", "MSGM", "ESAM", "SSReMStep", "MoEFS", "Tail"),
    "step op": ("SSReMStep", "LayerNorm2d", "MSGM", "ESAM"),
    "modules in steps": ("LayerNorm2d", "MSGM", "ESAM"),
    "LayerNorm2d": ("LayerNorm2d",),
    "MSGM": ("MSGM",),
    "ESAM": ("ESAM",),
    "MoEFS": ("MoEFS",),
    "Tail": ("Tail",),
}


def part_bisect(work: Path, dry: bool) -> None:
    """Which fused module makes the whole x4 model's gradients further from float64 than
    eager's (tests/test_gpu.py::test_released_model_fused_about_as_close_as_eager): the
    model with only some modules fused, fp32 and bf16 (attention top-16, released sizes;
    toy sizes in the dry run), per variant the worst fused/eager error ratio and the
    tensors over the test's bound (2 x eager + floor, eager capped at 0.5)."""
    if dry:  # minutes per variant in the interpreter (`gpu_parts bisect --bisect-dry` runs it)
        _write(work, "bisect", {"status": "skipped (dry run)"})
        print("bisect: skipped (dry run)")
        return
    _bisect(work, dry=False)


def _bisect(work: Path, dry: bool) -> None:
    import copy

    from ssiu.model import build

    device = _device(dry)
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    floor = {torch.float32: 1e-5 if dry else 2e-3, torch.bfloat16: 3e-2}
    torch.manual_seed(0)
    base = build(4, attn_topk=16, **(TINY if dry else {})).to(device)
    gen = torch.Generator().manual_seed(1)
    n, h, w = (1, 9, 11) if dry else (2, 37, 45)
    x = torch.rand(n, 3, h, w, generator=gen, dtype=torch.float64).to(device)
    dout = torch.randn(n, 3, 4 * h, 4 * w, generator=gen, dtype=torch.float64).to(device)
    names = ["output", "input", *(k for k, _ in base.named_parameters())]
    ref = _outputs_and_grads(copy.deepcopy(base).double().set_backend("torch"), x, dout)
    doc = {"status": "ok", "rows": []}
    for dtype in dtypes:
        eager = _errors(_outputs_and_grads(copy.deepcopy(base).to(dtype), x.to(dtype), dout), ref)
        variants = list(BISECT.items())[: 2 if dry else None]
        for variant, fused in variants:
            model = copy.deepcopy(base).to(dtype).set_backend("torch")
            for m in model.modules():
                if type(m).__name__ in fused:
                    m.backend = "triton"
            mine = _errors(_outputs_and_grads(model, x.to(dtype), dout), ref)
            over = [(names[i], f, e) for i, (f, e) in enumerate(zip(mine, eager, strict=True))
                    if not f <= 2 * min(e, 0.5) + floor[dtype]]  # fmt: skip
            ratio = max(f / max(e, 1e-12) for f, e in zip(mine, eager, strict=True))
            row = {"dtype": str(dtype), "variant": variant, "over": len(over),
                   "tensors": len(names), "worst_ratio": ratio,
                   "first_over": [f"{k}: {f:.3g} vs {e:.3g}" for k, f, e in over[:4]]}  # fmt: skip
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            _write(work, "bisect", doc)


def _outputs_and_grads(model, x, dout) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    out = model(x)
    return [out, *torch.autograd.grad(out, [x, *model.parameters()], dout.to(out.dtype))]


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    from ssiu.testing import relative_error

    return [relative_error(g, r) for g, r in zip(got, ref, strict=True)]


# ------------------------------------------------------------------------------- sweep

# MSGM launch configs to time at the training shape (bf16): (BLOCK_P, warps, stages) of the
# forward; (BLOCK_P, warps, programs per SM, stages) of both backward kernels (16-bit, on
# any arch). The first of each is today's sm_90 config, the second the sm_80 one (and
# sm_90's before 2026-11-29); the forward's (64, 4) was sm_90's until 2026-11-30. Data
# for choosing configs; nothing here is adopted.
SWEEP_FWD = ((64, 8, 1), (32, 8, 1), (64, 4, 1), (64, 4, 2), (32, 4, 1))
SWEEP_BWD = ((32, 8, 1, 1), (16, 8, 1, 1), (32, 8, 1, 2), (16, 4, 2, 1), (64, 8, 1, 1))
MSGM_KERNELS = ("msgm_fwd_kernel", "msgm_bwd_gate_kernel", "msgm_bwd_dx_kernel")


def part_sweep(work: Path, dry: bool) -> None:
    """MSGM kernel times under other tile/warp/stage configs: the op forward+backward at
    40x64x64x64 bf16, each variant's gradient checked against today's config, each MSGM
    kernel's CUDA time from torch.profiler (the op's host dispatch is of the order of its
    kernels: CUDA-event times of the op would measure the host). Wall clock in the dry run."""
    device = _device(dry)
    if device.type != "cuda" and not dry:
        _write(work, "sweep", {"status": "not measured (no GPU)"})
        print("sweep: not measured (no GPU)")
        return
    import dataclasses

    from ssiu.kernels import msgm as mk

    from ssiu.benchmark.cases import MSGM as case

    # The dry run: one variant of each at the quick shape in fp32 (the interpreter).
    dtype, preset = (torch.float32, "quick") if dry else (torch.bfloat16, "train")
    inputs = {k: t.requires_grad_() for k, t in case.make_inputs(case.shapes[preset], dtype,
                                                                  device).items()}  # fmt: skip
    leaves = list(inputs.values())
    dout = torch.randn_like(inputs["x"])
    tiles, tiles90 = dict(mk._TILES), dict(mk._TILES_SM90)
    config, ctas, rows = mk.msgm_config, mk._BWD_CTAS_PER_SM, []

    def fwd_bwd():
        return torch.autograd.grad(case.op(inputs, "triton"), leaves, dout)

    def with_stages(kernels, stages):
        def patched(*a, **k):
            cfg = config(*a, **k)
            return dataclasses.replace(cfg, num_stages=stages) if a[2] in kernels else cfg

        return patched

    ref = fwd_bwd()[0]
    count = 1 if dry else None
    variants = [("fwd", v) for v in SWEEP_FWD[:count]] + [("bwd", v) for v in SWEEP_BWD[:count]]
    for kind, v in variants:
        if kind == "fwd":
            bp, warps, stages = v
            mk._TILES["fwd"] = ((bp, warps),) + tiles["fwd"][1:]
            mk._TILES_SM90["fwd"] = (bp, warps)
            mk.msgm_config = with_stages(("fwd",), stages)
        else:
            bp, warps, per_sm, stages = v
            for name in ("bwd_gate", "bwd_dx"):
                mk._TILES[name] = ((bp, warps),) + tiles[name][1:]
                mk._TILES_SM90[name] = (bp, warps)
            mk._BWD_CTAS_PER_SM = per_sm
            mk.msgm_config = with_stages(("bwd_gate", "bwd_dx"), stages)
        row = {"kernel": kind, "variant": list(v)}
        try:
            got = fwd_bwd()[0]
            row["max_rel_diff"] = float((got - ref).abs().max() / ref.abs().max())
            if dry:
                row["wall_ms"] = _median_ms(fwd_bwd, device, reps=1, warmup=0)
            else:
                times = kernel_times(fwd_bwd, calls=5)
                row.update({k: times.get(k, {}).get("ms") for k in MSGM_KERNELS})
        except Exception as e:  # a variant that does not compile or run: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        mk._TILES.update(tiles)
        mk._TILES_SM90.update(tiles90)
        mk.msgm_config, mk._BWD_CTAS_PER_SM = config, ctas
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(work, "sweep", {"status": "ok", "rows": rows})


# ------------------------------------------------------------------------------- sanitizer


def part_sanitize_target(work: Path, dry: bool) -> None:
    """One small fused forward + backward of the whole model (every fused kernel, fp32
    and bf16 autocast) for compute-sanitizer; on a CPU through the interpreter."""
    import torch.nn.functional as F

    from ssiu.model import build

    device = _device(dry)
    torch.manual_seed(0)
    model = build(4, attn_topk=16, **(TINY if dry else {})).to(device).set_backend("triton")
    x = torch.rand(1, 3, 16, 16, device=device)
    amps = [None] if dry else [None, torch.bfloat16]
    for amp in amps:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        F.l1_loss(out.float(), torch.zeros_like(out, dtype=torch.float32) + 0.5).backward()
        _sync(device)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        print(f"sanitize target: {amp or 'fp32'} forward+backward done, finite grads {finite}")
    _write(work, "sanitize_target", {"ok": True})


# ------------------------------------------------------------------------------- profile


def part_profile(work: Path, dry: bool) -> None:
    """`ssiu profile` (the static launch/bytes profile), only where that module exists."""
    import importlib.util

    if importlib.util.find_spec("ssiu.profile") is None:
        _write(work, "profile", {"status": "not available (no ssiu.profile in this checkout)"})
        print("ssiu.profile not available: skipped")
        return
    doc = {"status": "ok"}
    for kind in ("--train", "--infer"):
        path = work / f"profile{kind.replace('-', '_')}.json"
        argv = [sys.executable, "-m", "ssiu", "profile", kind, "--json", str(path)]
        if dry:
            argv += ["--batch", "1", "--size", "16x16"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        key = kind.strip("-")
        doc[key] = json.loads(path.read_text()) if path.exists() else {"error": proc.stderr[-500:]}
    _write(work, "profile", doc)


PARTS = {
    "env": part_env,
    "ops": part_ops,
    "e2e": part_e2e,
    "kernels": part_kernels,
    "bisect": part_bisect,
    "sweep": part_sweep,
    "sanitize_target": part_sanitize_target,
    "profile": part_profile,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--dry", action="store_true")
    p.add_argument("--bisect-dry", action="store_true", help="bisect at toy size on the CPU")
    args = p.parse_args(argv)
    if args.bisect_dry:
        args.work.mkdir(parents=True, exist_ok=True)
        _bisect(args.work, dry=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    PARTS[args.part](args.work, args.dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
