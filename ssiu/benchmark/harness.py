"""One benchmark harness for every fused op: modes, providers, correctness, memory, rows.

A *case* is an op to benchmark: `make_inputs(shape, dtype, device) -> {name: tensor}` and
`op(inputs, backend) -> tensor`, where `backend` is the `ssiu.ops` switch ("torch" runs
the reference, "triton" the fused kernels), plus the op's forward FLOPs at a shape (for
the roofline). Adding an op is a few lines in `ssiu/benchmark/cases.py`.

Providers: "eager" (the reference), "compile" (`torch.compile` of the reference),
"fused" (backend="triton"), "fused+compile" (`torch.compile` of the fused op). The fused
ones run on CUDA only: on CPU they would run the Triton interpreter, so their rows say
"not measured (no GPU)".

Modes: "fwd" (a training forward: inputs require grad, so autograd records and saves
what backward needs), "bwd" (`torch.autograd.grad` alone, after a fresh untimed forward
each run: torch.compile's backward donates buffers, so a graph cannot be retained and
run twice), "fwd+bwd" (both), "infer" (forward under `torch.inference_mode`, nothing
saved: the inference shapes).

Before anything is timed, the provider's output (and, for modes with a backward, every
input gradient) is compared with a float64 run of the reference: the provider passes
when its relative norm error is within max(2 x the eager reference's own, the norm
bound of the dtype's mode in ssiu.testing's tolerance table);
a provider that fails gets a "mismatch: ..." row and no time.

Timing: `triton.testing.do_bench` on CUDA (median, 20th and 80th percentiles, L2
flushed between runs; "bwd" uses the same method by hand, CUDA events around the
backward alone); on CPU the median of `reps` wall-clock runs after `warmup` runs (a
shared CPU gives noisy numbers: they check the harness, not the kernels).
Memory: the bytes of new tensors autograd saves for backward (a saved_tensors_hooks
count of unique storages that are not the inputs; the activation memory the training
targets talk about; any device) and, on CUDA, the peak allocated during one call over
what was allocated before it (`torch.cuda.max_memory_allocated`).
Bandwidth: bytes moved (each input read once, each output written once) / time, and on
a GPU whose copy bandwidth is known (H100: 3.0e12 B/s, DESIGN.md) that as a fraction.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ssiu import testing

MODES = ("fwd", "bwd", "fwd+bwd", "infer")
GRAD_MODES = ("bwd", "fwd+bwd")
# Shape presets of every case and the modes each runs by default: "train" the released
# training step, "infer" the paper's x4 inference (320x180 LR), "quick" tiny CPU shapes.
PRESETS = ("train", "infer", "quick")
PRESET_MODES = {"train": ("fwd", "bwd", "fwd+bwd"), "infer": ("infer",), "quick": MODES}
PROVIDER_NAMES = ("eager", "compile", "fused", "fused+compile")
# The repository checkout this package sits in (for the git commit); may not be one.
REPO_ROOT = Path(__file__).resolve().parents[2]

# Measured device-to-device copy bandwidth, B/s, by a substring of the device name.
COPY_BANDWIDTH = {"H100": 3.0e12}
# Measured dense matrix rate, FLOP/s, by device-name substring and dtype (DESIGN.md):
# bf16/fp16 on the tensor cores, fp32 without them.
MATRIX_RATE = {"H100": {"bfloat16": 800e12, "float16": 800e12, "float32": 67e12}}

# Smallest bound on the relative norm error ||out - ref|| / ||ref|| against float64, per
# dtype: the norm bound of ssiu.testing's tolerance table (CPU modes; `_check` takes the
# device's, TF32 for fp32 on CUDA).
TOLERANCE_FLOOR = {
    dt: testing.tolerance(dt).norm_bound
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}

# Columns of the CSV file, in order; JSON rows carry the same keys.
FIELDS = (
    "date", "git_commit", "device", "device_name", "torch", "triton", "python",
    "op", "shape", "dtype", "provider", "mode", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "max_rel_err", "tolerance",
    "bytes_moved", "gbps", "copy_bw_fraction", "saved_bytes", "peak_mem_bytes",
    "flops", "t_bytes_ms", "t_flops_ms", "floor_ms", "floor_ratio", "preset", "driver", "cuda",
    "images_per_s",
)  # fmt: skip

NOT_MEASURED_NO_GPU = "not measured (no GPU)"


@dataclasses.dataclass(frozen=True)
class Case:
    """An op to benchmark.

    make_inputs(shape, dtype, device) -> {name: tensor}: fresh leaf tensors, deterministic.
    op(inputs, backend) -> output tensor, with backend "torch" or "triton".
    shapes: preset name ("train", "infer", "quick") -> the `shape` given to make_inputs.
    flops(shape) -> FLOPs (2 x multiply-adds of the convolutions and matmuls) of one
    forward; a backward costs twice that (input and weight gradients).
    """

    name: str
    make_inputs: Callable[[tuple, torch.dtype, torch.device], dict[str, torch.Tensor]]
    op: Callable[[dict[str, torch.Tensor], str], torch.Tensor]
    shapes: dict[str, tuple]
    flops: Callable[[tuple], int] = lambda shape: 0


@dataclasses.dataclass(frozen=True)
class Provider:
    """How a case is run: build(case) -> fn(inputs) -> output; unavailable(device) -> why not."""

    name: str
    build: Callable[[Case], Callable[[dict[str, torch.Tensor]], torch.Tensor]]
    unavailable: Callable[[torch.device], str | None] = lambda device: None


CASES: dict[str, Case] = {}
PROVIDERS: dict[str, Provider] = {}


def register_case(case: Case) -> Case:
    CASES[case.name] = case
    return case


def register_provider(provider: Provider) -> Provider:
    PROVIDERS[provider.name] = provider
    return provider


def get_cases() -> dict[str, Case]:
    """Every registered case (importing `ssiu.benchmark.cases` registers the built-in ones)."""
    import ssiu.benchmark.cases  # noqa: F401

    return CASES


_COMPILED: dict[tuple, tuple[Case, Callable]] = {}


def _compiled(case: Case, backend: str = "torch"):
    # One torch.compile per case, shared by the modes (dynamo keeps a graph per grad mode).
    key = (id(case), backend)
    if key not in _COMPILED:
        _COMPILED[key] = (
            case,
            torch.compile(lambda inputs: case.op(inputs, backend), dynamic=False),
        )
    return _COMPILED[key][1]


def _fused_unavailable(device: torch.device) -> str | None:
    # On CPU the fused ops would run through the Triton interpreter: exact, not fast.
    return None if device.type == "cuda" else NOT_MEASURED_NO_GPU


register_provider(Provider("eager", lambda case: lambda inputs: case.op(inputs, "torch")))
register_provider(Provider("compile", _compiled))
register_provider(
    Provider("fused", lambda case: lambda inputs: case.op(inputs, "triton"), _fused_unavailable)
)
register_provider(
    Provider("fused+compile", lambda case: _compiled(case, "triton"), _fused_unavailable)
)


# ---------------------------------------------------------------------------------------
# Environment stamp.


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_preset(device: torch.device) -> str:
    return "train" if device.type == "cuda" else "quick"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """HEAD of the repository the bench lives in, '+dirty' when the tree has changes."""
    try:
        run = lambda *a: subprocess.run(
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        head = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def _stamp(device_type: str, index: int | None) -> dict:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "driver": gpu_driver() if device_type == "cuda" else None,
        "cuda": torch.version.cuda,
    }


def gpu_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where it cannot be asked."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=20,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment_stamp(device: torch.device) -> dict:
    """Device name, versions, git commit and date (UTC, ISO 8601) for each row."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {**_stamp(device.type, device.index), "date": date}


# ---------------------------------------------------------------------------------------
# Measurement.


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_moved(inputs: dict[str, torch.Tensor], output: torch.Tensor, mode: str) -> int:
    """Each input read once and each output written once, for the tensors of `mode`.

    Forward reads the inputs and writes the output; backward reads the output's gradient
    and the inputs, and writes one gradient per input.
    """
    read = tensor_bytes(inputs.values())
    fwd = read + tensor_bytes([output])
    bwd = tensor_bytes([output]) + read + read
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "infer": fwd}[mode]


def mode_flops(forward_flops: int, mode: str) -> int:
    """FLOPs of `mode` from the forward's: a backward computes input and weight
    gradients, twice the forward's multiply-adds."""
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "infer": 1}[mode] * forward_flops


def roofline(moved: int, flops: int, median_ms: float | None, rates: dict) -> dict:
    """Times the minimal traffic and the FLOPs imply at the device's rates, and the
    measured time over the larger of the two (1.0 = at the floor; None where unknown).

    rates: {"copy_bw": B/s or None, "matrix_flops": FLOP/s or None}.
    """
    bw, mat = rates.get("copy_bw"), rates.get("matrix_flops")
    t_bytes = moved / bw * 1e3 if bw else None
    t_flops = flops / mat * 1e3 if mat else None
    known = [t for t in (t_bytes, t_flops) if t is not None]
    floor = max(known) if known else None
    ratio = median_ms / floor if floor and median_ms is not None else None
    return {"t_bytes_ms": t_bytes, "t_flops_ms": t_flops, "floor_ms": floor, "floor_ratio": ratio}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device: torch.device, reps: int = 5) -> float:
    """Seconds of the fastest of `reps` runs of fn, after one warm-up run."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _copy_rate(n: int, device: torch.device) -> float:
    """B/s (read + written) of the best `copy_` of n fp32 elements."""
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _best_of(lambda: dst.copy_(src), device)


@functools.cache
def _measured_rates(device_type: str, index: int | None, dtype_name: str) -> dict:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    dtype = getattr(torch, dtype_name)
    n = 2**27 if device.type == "cuda" else 2**25  # 512 MiB / 128 MiB of fp32: past caches
    copy = _copy_rate(n, device)
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    matrix = 2 * m**3 / _best_of(lambda: a @ b, device, reps=10)
    return {"copy_bw": copy, "matrix_flops": matrix}


def device_rates(device: torch.device, dtype: torch.dtype, name: str | None = None) -> dict:
    """Copy bandwidth (B/s) and dense matrix rate (FLOP/s at `dtype`) of the device.

    An H100: DESIGN.md's measured figures (3.0 TB/s; 800 TFLOP/s bf16, 67 fp32).
    Anything else: measured here, once per process: the best of 5 `copy_` of a
    128 MiB (CPU) / 512 MiB (GPU) tensor (bytes read + written) and of 10 square
    matmuls (1024 CPU, 8192 GPU). Tiny benchmark shapes that stay in a CPU's caches can
    beat this copy bandwidth (a roofline ratio below 1).
    """
    name = name if name is not None else device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    bw = copy_bandwidth(name)
    mat = next((r.get(dtype_name) for k, r in MATRIX_RATE.items() if k in name), None)
    measured = None
    if bw is None or mat is None:
        measured = _measured_rates(device.type, device.index, dtype_name)
    return {
        "copy_bw": bw or measured["copy_bw"],
        "copy_bw_source": "DESIGN.md (H100)" if bw else "measured here (torch copy_)",
        "matrix_flops": mat or measured["matrix_flops"],
        "matrix_source": "DESIGN.md (H100)" if mat else f"measured here ({dtype_name} matmul)",
        "dtype": dtype_name,
    }


def copy_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in COPY_BANDWIDTH.items() if key in name), None)


def achieved_bandwidth(
    moved: int, median_ms: float, device_name: str = "", copy_bw: float | None = None
) -> tuple[float, float | None]:
    """(GB/s, fraction of the copy bandwidth or None when the device's is unknown).

    copy_bw: B/s; default from COPY_BANDWIDTH by device name (H100: 3.0e12).
    """
    bytes_per_s = moved / (median_ms * 1e-3)
    bw = copy_bw or copy_bandwidth(device_name)
    return bytes_per_s / 1e9, (bytes_per_s / bw if bw else None)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple]:
    """max |actual - expected| / max |expected|, and the index of the worst element."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    if not torch.isfinite(diff).all():
        bad = (~torch.isfinite(diff)).nonzero()[0]
        return float("inf"), tuple(bad.tolist())
    flat = int(diff.argmax())
    return float(diff.max() / scale), tuple(torch.unravel_index(torch.tensor(flat), diff.shape))


@dataclasses.dataclass
class Prepared:
    """A checked, ready-to-time call, or the reason there is none (status != "ok")."""

    case: Case
    provider: str
    mode: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    status: str
    # The timed work: call() or, when setup is set, call(setup()) with setup untimed.
    call: Callable[..., object] | None = None
    setup: Callable[[], object] | None = None
    inputs: dict | None = None
    output: torch.Tensor | None = None
    forward: Callable | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None

    def synced(self) -> tuple[Callable[..., None], Callable[[], tuple] | None]:
        """(call, setup) that wait for the device, for wall-clock timers (pytest-benchmark).

        setup is None or returns the (args, kwargs) of call, as `benchmark.pedantic` wants.
        """
        call, setup, cuda = self.call, self.setup, self.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(self.device)) if cuda else (lambda: None)

        def run(*state):
            call(*state)
            sync()

        def make_state():
            state = setup()
            sync()
            return (state,), {}

        return run, (make_state if setup else None)


def _leaf_inputs(case: Case, shape, dtype, device, requires_grad: bool) -> dict:
    inputs = case.make_inputs(tuple(shape), dtype, device)
    return {k: v.detach().requires_grad_(requires_grad) for k, v in inputs.items()}


def _run_mode(fn, inputs: dict, grad_out: torch.Tensor | None, mode: str):
    """(output, gradients of the inputs or None)."""
    if mode == "infer":
        with torch.inference_mode():
            return fn(inputs), None
    out = fn(inputs)
    if mode == "fwd":
        return out, None
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    return out, grads


def _check(case, fn, mode, shape, dtype, device) -> tuple[bool, str, float, float]:
    """Compare the provider with float64 reference; (ok, message, error, tolerance)."""
    ref_in = _leaf_inputs(case, shape, torch.float64, device, True)
    ref_out = case.op(ref_in, "torch")
    gen = torch.Generator(device="cpu").manual_seed(1)
    grad64 = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(device)
    expected = [ref_out]
    if mode in GRAD_MODES:
        expected += list(torch.autograd.grad(ref_out, list(ref_in.values()), grad64))
    names = ["output"] + [f"grad {k}" for k in ref_in] * (mode in GRAD_MODES)

    def errors(run_fn):
        inputs = _leaf_inputs(case, shape, dtype, device, True)
        out, grads = _run_mode(run_fn, inputs, grad64.to(dtype), mode)
        got = [out] + list(grads or [])
        return [(testing.relative_error(g, e), max_rel_error(g, e)[1])
                for g, e in zip(got, expected, strict=True)]  # fmt: skip

    eager = errors(lambda inputs: case.op(inputs, "torch"))
    mine = errors(fn)
    worst, worst_tol = 0.0, 0.0
    for name, (err, where), (eager_err, _) in zip(names, mine, eager, strict=True):
        tol = max(2.0 * eager_err, testing.tolerance(dtype, device).norm_bound)
        if not err <= tol:
            return (
                False,
                f"mismatch: {name} relative norm error {err:.3g} (worst at {list(where)}) > "
                f"tol {tol:.3g} "
                f"(eager reference {eager_err:.3g} vs float64)",
                err,
                tol,
            )
        if err >= worst:
            worst, worst_tol = err, tol
    return True, "ok", worst, worst_tol


def prepare(
    case: Case,
    provider: str,
    mode: str,
    *,
    shape: Sequence[int] | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    check: bool = True,
) -> Prepared:
    """Make inputs, check the provider against float64, and build the call to time."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {tuple(PROVIDERS)}, got {provider!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    shape = tuple(shape) if shape is not None else case.shapes[preset or default_preset(device)]
    prep = Prepared(case, provider, mode, shape, dtype, device, status="ok")
    why_not = PROVIDERS[provider].unavailable(device)
    if why_not:
        prep.status = why_not
        return prep
    fn = PROVIDERS[provider].build(case)
    try:
        if check:
            ok, message, err, tol = _check(case, fn, mode, shape, dtype, device)
            prep.max_rel_err, prep.tolerance = err, tol
            if not ok:
                prep.status = message
                return prep
        inputs = _leaf_inputs(case, shape, dtype, device, mode != "infer")
        gen = torch.Generator(device="cpu").manual_seed(2)
        if mode == "infer":
            with torch.inference_mode():
                out = fn(inputs)
        else:
            out = fn(inputs)
        grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
        leaves = list(inputs.values())
        setup = None
        if mode == "infer":

            def call():
                with torch.inference_mode():
                    return fn(inputs)

        elif mode == "fwd":
            call = lambda: fn(inputs)
        elif mode == "bwd":
            # A fresh, untimed forward per run: torch.compile's backward donates its
            # buffers, so it cannot run twice on one graph (no retain_graph=True).
            setup = lambda: fn(inputs)
            call = lambda output: torch.autograd.grad(output, leaves, grad_out)
        else:
            call = lambda: torch.autograd.grad(fn(inputs), leaves, grad_out)
    except Exception as e:  # a provider that cannot run here gets a row that says so
        prep.status = error_status(e)
        return prep
    prep.call, prep.setup, prep.inputs, prep.output, prep.forward = call, setup, inputs, out, fn
    return prep


def error_status(e: BaseException) -> str:
    """'error: Type: message' on one line (the first 300 characters of the message's
    non-empty lines: inductor's first line alone says only that it raised)."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    return f"error: {type(e).__name__}: {text[:300]}"


def saved_activation_bytes(fn, inputs: dict) -> int:
    """Bytes of the new tensors autograd saves for backward in one forward of `fn`.

    Unique storages, the inputs' own storages (already alive) not counted.
    """
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs.values()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs)
    del out
    return sum(seen.values())


def cuda_peak_bytes(call, device: torch.device, setup=None) -> int:
    """Peak bytes allocated during one call, over what was allocated before it."""
    state = (setup(),) if setup else ()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call(*state)
    torch.cuda.synchronize(device)
    del result, state
    return torch.cuda.max_memory_allocated(device) - before


def _summary(times_ms: list[float], reps) -> dict:
    q = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else times_ms * 4
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[0], "p80_ms": q[3], "reps": reps}


def _cuda_time_with_setup(call, setup, device, warmup: int) -> dict:
    """do_bench's method for a call that needs an untimed setup before each run:
    CUDA events around the call alone, L2 flushed after the setup, about 100 ms of runs."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # as do_bench
    for _ in range(warmup):
        call(setup())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        state = setup()
        cache.zero_()
        start.record()
        call(state)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    first = [once() for _ in range(5)]
    reps = int(min(1000, max(10, 100 / max(statistics.median(first), 1e-3))))
    return _summary([once() for _ in range(reps)], reps)


def time_call(call, device: torch.device, *, setup=None, reps: int = 20, warmup: int = 3) -> dict:
    """Median / 20th / 80th percentile in ms of call() (or call(setup()), setup untimed):
    do_bench on CUDA, a wall-clock timer on CPU."""
    if device.type == "cuda":
        if setup is not None:
            return _cuda_time_with_setup(call, setup, device, warmup=max(warmup, 3))
        from triton.testing import do_bench

        median, p20, p80 = do_bench(call, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}
    for _ in range(warmup):
        if setup is not None:
            call(setup())
        else:
            call()
    times = []
    for _ in range(reps):
        state = (setup(),) if setup else ()
        start = time.perf_counter()
        call(*state)
        times.append((time.perf_counter() - start) * 1e3)
        del state
    return _summary(times, reps)


def measure(
    case: Case,
    provider: str,
    mode: str,
    *,
    shape: Sequence[int] | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reps: int = 20,
    warmup: int = 3,
    copy_bw: float | None = None,
    rates: dict | None = None,
    skip: str | None = None,
) -> dict:
    """One row: check, time, memory and bandwidth of `provider` on `case` in `mode`.

    rates: the device's {"copy_bw", "matrix_flops"} (`device_rates`) for the roofline and
    the bandwidth fraction; without it only a known GPU's copy bandwidth is used.
    skip: a reason not to run this provider at all (the row's status), e.g. "skipped
    (--quick)".
    """
    prep = prepare(case, provider, mode, shape=shape, preset=preset, dtype=dtype, device=device,
                   check=skip is None) if skip is None else None  # fmt: skip
    if prep is None:
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        shape = tuple(shape) if shape is not None else case.shapes[preset or default_preset(device)]
        prep = Prepared(case, provider, mode, shape, dtype, device, status=skip)
    row = {field: None for field in FIELDS}
    row.update(environment_stamp(prep.device))
    row.update(
        op=case.name,
        shape="x".join(map(str, prep.shape)),
        dtype=str(prep.dtype).removeprefix("torch."),
        provider=provider,
        mode=mode,
        status=prep.status,
        max_rel_err=prep.max_rel_err,
        tolerance=prep.tolerance,
        preset=preset,
        flops=mode_flops(case.flops(prep.shape), mode),
    )
    if prep.status != "ok":
        return row
    row["saved_bytes"] = 0 if mode == "infer" else saved_activation_bytes(prep.forward, prep.inputs)
    if prep.device.type == "cuda":
        row["peak_mem_bytes"] = cuda_peak_bytes(prep.call, prep.device, prep.setup)
    row.update(time_call(prep.call, prep.device, setup=prep.setup, reps=reps, warmup=warmup))
    moved = bytes_moved(prep.inputs, prep.output, mode)
    row["bytes_moved"] = moved
    name = row["device_name"] if prep.device.type == "cuda" else ""  # no CPU figure
    copy_bw = copy_bw or (rates or {}).get("copy_bw")
    row["gbps"], row["copy_bw_fraction"] = achieved_bandwidth(
        moved, row["median_ms"], name, copy_bw
    )
    if rates:
        row.update(roofline(moved, row["flops"], row["median_ms"], rates))
    return row


# ---------------------------------------------------------------------------------------
# Result files.


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Append rows to out_dir/results.json (a JSON list) and out_dir/results.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    old = json.loads(json_path.read_text()) if json_path.exists() else []
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(old + [dict(r) for r in rows], indent=1))
    tmp.replace(json_path)
    new_file = not csv_path.exists()
    if not new_file:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            raise ValueError(f"{csv_path} has other columns than this harness writes; move it")
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path
