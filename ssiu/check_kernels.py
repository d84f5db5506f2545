"""`ssiu check-kernels`: compile the Triton kernels that run, for sm_90 and sm_80, no GPU.

What is compiled: the launches the fused model makes at the canonical workloads
(`ssiu.launch_capture.WORKLOADS`: x4 training, batch 40 of 64x64, bf16; x4 inference of
1x3x180x320 in bf16 and fp32; `WIDTH_WORKLOADS` for C = 16 and 32). Each step runs on
fake tensors with Triton launches recorded instead of executed, and Triton's own binder
(`create_function_from_signature` + `JITFunction._pack_args`) gives each launch the
specialisation the JIT would compile: integers equal to 1 as constants, multiples of 16
and 16-byte aligned pointers marked divisible, `do_not_specialize` honoured. Identical
specialisations are compiled once. Registered configs (`ssiu.kernels.registry`, plain i32
scalars) can be added: those no launch reaches (`--registry extras`) or all.

Each (kernel, config, arch) goes through Triton's own compiler
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`), which lowers it to
PTX and runs the `ptxas` shipped in the triton wheel. From ptxas's report we read the
registers and spill bytes, from the kernel's metadata the shared memory it asks for, and
from its SASS (`cuobjdump -sass`, also in the wheel) the tensor-core instructions and the
width of every global load and store. A config fails if it does not compile, spills,
uses more than 232 registers (headroom under 255), or needs more shared memory than one
block of that architecture may have; global accesses of 2 bytes or less per lane warn
(or fail with `--strict-access`).

Why the compiles run in worker subprocesses (`python -m ssiu.check_kernels JOBS OUT`):
- The test suite sets TRITON_INTERPRET=1, and then `@triton.jit` returns an
  `InterpretedFunction`, whose helpers (other @triton.jit functions it calls) are
  interpreted functions too, so Triton's code generator cannot lower them. A worker
  started with TRITON_INTERPRET=0 re-imports the kernel's module and gets real
  `JITFunction`s, whatever the parent's mode; one code path for both modes.
- A crash inside MLIR or ptxas (an abort, not an exception) ends the worker, not the
  caller: the configs it had not finished become failing rows.
- The workers run in parallel (one per core by default), and each uses a fresh Triton
  cache directory, so every config is really compiled and ptxas's report is seen.
Kernels must therefore be module-level attributes of an importable module or file.

A compile of a fused kernel takes seconds to tens of seconds on a small CPU, so the
rows of compiles that succeeded are cached in `$SSIU_CACHE_DIR/check-kernels` (default
`~/.cache/ssiu/check-kernels`), keyed by Triton's hash of the kernel source (with the
@triton.jit functions it calls), signature, constexprs and pointer alignment, plus the
architecture, launch options, Triton version and Triton's cache-relevant environment
variables. `--no-cache` compiles everything again.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence

DEFAULT_ARCHS = (90, 80)

# Maximum shared memory one thread block may use (the opt-in dynamic maximum), bytes,
# per compute capability: CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (8.0: 163 KB, 8.6/8.9: 99 KB, 9.0: 227 KB, 10.0: 227 KB, 12.0: 99 KB).
SHARED_MEMORY_LIMITS = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
    100: 227 * 1024,
    120: 99 * 1024,
}
MAX_REGISTERS_PER_THREAD = 255
# A config above this fails although it fits: headroom for compiler changes (issue 10).
REGISTER_HEADROOM = 232
MAX_REGISTERS_PER_BLOCK = 64 * 1024
WARP_SIZE = 32
# Per SM: resident warps, blocks, registers and shared memory (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"); 1 KiB of shared memory per block is
# reserved by the system.
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64, 100: 64, 120: 48}
MAX_BLOCKS_PER_SM = 32
SHARED_MEMORY_PER_SM = {80: 164, 86: 100, 89: 100, 90: 228, 100: 228, 120: 100}
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in blocks of 256
# Bump when the row format changes: cached rows of an older format are compiled again.
ROW_FORMAT = 3
# Seconds a worker may spend on one config (no new row for that long: it is stopped and
# its unfinished configs fail). A spilling kernel took 110 s on a busy 2-core machine.
CONFIG_TIMEOUT_S = 900


@dataclasses.dataclass
class CheckRow:
    """The outcome of compiling one kernel config for one architecture."""

    kernel: str
    config: str
    arch: int
    registers: int | None = None
    spills: int | None = None  # bytes of spill stores + spill loads, from ptxas
    stack: int | None = None  # bytes of stack frame per thread
    shared: int | None = None  # bytes of shared memory per block
    compile_s: float | None = None
    cached: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)
    detail: str = ""  # the compiler's message when it failed
    num_warps: int | None = None
    warps_per_sm: int | None = None  # resident warps per SM (registers, shared, warps)
    hmma: int | None = None  # tensor-core instructions in the SASS (mma.sync)
    hgmma: int | None = None  # Hopper warpgroup tensor-core instructions (wgmma)
    ldg: dict | None = None  # global loads in the SASS: {bytes per lane: count}
    stg: dict | None = None  # global stores in the SASS: {bytes per lane: count}
    source: str = "registry"  # "registry", or the workloads whose launches derived it
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAIL: " + "; ".join(self.problems)
        return "warn: " + "; ".join(self.warnings) if self.warnings else "ok"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok, "status": self.status}


def config_label(config) -> str:
    """'BLOCK=64,C=64 w4 s2' for a KernelConfig; fields a subclass adds come first (an
    empty tuple left out), the architectures a config is only for last (' sm_90')."""
    extra = [
        f"{f.name}={str(getattr(config, f.name)).removeprefix('torch.')}"
        for f in dataclasses.fields(config)
        if f.name not in ("constexprs", "num_warps", "num_stages", "maxnreg", "archs")
        and getattr(config, f.name) != ()
    ]
    values = ",".join(extra + [f"{k}={v}" for k, v in config.constexprs.items()])
    cap = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    archs = getattr(config, "archs", None)
    only = f" sm_{'/'.join(map(str, archs))}" if archs else ""
    return f"{values} w{config.num_warps} s{config.num_stages}{cap}{only}".strip()


def default_cache_dir() -> str:
    base = os.environ.get("SSIU_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ssiu"
    )
    return os.path.join(base, "check-kernels")


def load_registered_specs() -> tuple[list, list[CheckRow]]:
    """Import every module under `ssiu.kernels` so it registers its specs.

    Returns (KERNEL_SPECS, rows for modules that failed to import).
    """
    import pkgutil

    import ssiu.kernels
    from ssiu.kernels import registry

    failed = []
    for info in pkgutil.iter_modules(ssiu.kernels.__path__):
        name = f"ssiu.kernels.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as e:  # a kernel module that cannot be imported is a failure
            row = CheckRow(kernel=name, config="(import)", arch=0)
            row.problems.append(f"import error: {type(e).__name__}: {e}")
            failed.append(row)
    return list(registry.KERNEL_SPECS), failed


def python_function(fn):
    """The plain Python function under a JITFunction / InterpretedFunction / Autotuner."""
    obj = fn
    for _ in range(8):
        if inspect.isfunction(obj):
            return obj
        obj = getattr(obj, "fn", None)
    raise TypeError(f"{fn!r} is not a @triton.jit function (or a wrapper of one)")


def _encode_constexpr(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    name = getattr(value, "name", None)
    if type(value).__name__ == "dtype" and isinstance(name, str):  # tl.float32 etc.
        return {"tl.dtype": name}
    raise TypeError(
        f"constexpr value {value!r} of type {type(value).__name__} cannot be sent to the "
        "compile worker (use int, float, bool, str, None or a tl dtype)"
    )


def _decode_constexpr(value):
    if isinstance(value, dict) and "tl.dtype" in value:
        import triton.language as tl

        return tl.dtype(value["tl.dtype"])
    return value


def _make_jobs(specs, archs) -> tuple[list[dict], list[CheckRow]]:
    jobs, rows = [], []
    for spec in specs:
        for config in spec.configs:
            label = config_label(config)
            try:
                pyfn = python_function(spec.fn)
                base = {
                    "kernel": spec.name,
                    "config": label,
                    "source": "registry",
                    "module": pyfn.__module__,
                    "qualname": pyfn.__qualname__,
                    "file": inspect.getsourcefile(pyfn),
                    "signature": dict(spec.signature_for(config)),
                    "constexprs": {k: _encode_constexpr(v) for k, v in config.constexprs.items()},
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                    "options": {"maxnreg": config.maxnreg} if config.maxnreg else {},
                    "dtype": str(getattr(config, "dtype", "")).removeprefix("torch."),
                }
                if "<locals>" in base["qualname"]:
                    raise ValueError("kernels must be module-level to be compiled by the worker")
            except Exception as e:
                for arch in archs:
                    row = CheckRow(kernel=spec.name, config=label, arch=arch)
                    row.problems.append(f"bad spec: {type(e).__name__}: {e}")
                    rows.append(row)
                continue
            for arch in archs:
                if config.archs is None or arch in config.archs:
                    jobs.append({**base, "arch": arch})
    return jobs, rows


def check_kernels(
    archs: Sequence[int] = DEFAULT_ARCHS,
    specs: Iterable | None = None,
    *,
    workers: int | None = None,
    cache: bool = True,
    progress: Callable[[CheckRow], None] | None = None,
    only: Sequence[str] = (),
    workloads: Sequence[str] = (),
    registry: str = "extras",
    strict_access: bool = False,
) -> list[CheckRow]:
    """Compile kernel configs for every arch; one CheckRow each.

    workloads: names in `ssiu.launch_capture.WORKLOADS`; the launches each makes are
        captured and compiled with the JIT's own specialisation (see `derive_jobs`).
    specs: KernelSpecs to check as registered (plain i32 scalars); None = everything
        `ssiu.kernels` registers. registry: "all" compiles every config of the specs,
        "extras" only those no derived launch runs (same kernel, dtype, warps and
        constexprs), "none" none of them.
    workers: compile processes in parallel (default: one per core, at most 8).
    cache: reuse the rows of earlier successful compiles (see the module doc).
    progress: called with each row as its compile finishes.
    only: if given, check just the configs whose "kernel [config]" contains one of these.
    strict_access: fail (not warn) on global accesses of 2 bytes or less per lane.
    """
    archs = tuple(int(a) for a in archs)
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMITS]
    if unknown:
        raise ValueError(
            f"no shared-memory limit known for sm_{unknown[0]}; "
            f"known architectures: {sorted(SHARED_MEMORY_LIMITS)}"
        )
    rows: list[CheckRow] = []
    jobs: list[dict] = []
    if workloads:
        jobs, bad = derive_jobs(workloads, archs)
        rows += bad
    if registry != "none":
        if specs is None:
            specs, failed = load_registered_specs()
            rows += failed
        registry_jobs, bad = _make_jobs(list(specs), archs)
        if registry == "extras":
            registry_jobs = [j for j in registry_jobs if not _covered(j, jobs)]
        jobs += registry_jobs
        rows += bad
    if only:
        chosen = lambda r: any(o in f"{r['kernel']} [{r['config']}]" for o in only)
        jobs = [j for j in jobs if chosen(j)]
        rows = [r for r in rows if chosen(dataclasses.asdict(r))]
    if jobs:
        done = _run_workers(jobs, workers, default_cache_dir() if cache else None, progress)
        for job, row in zip(jobs, done, strict=True):
            if row.ok:  # compiled: judge its figures (cached rows too)
                row.ldg = {int(k): v for k, v in (row.ldg or {}).items()}
                row.stg = {int(k): v for k, v in (row.stg or {}).items()}
                _judge(row, job["num_warps"], strict_access)
        rows += done
    return rows


def _covered(job: dict, derived: list[dict]) -> bool:
    """Whether a derived job runs the registry job's config (its constexprs, dtype, warps)."""
    for d in derived:
        if d["qualname"] != job["qualname"] or d["arch"] != job["arch"]:
            continue
        if d["num_warps"] != job["num_warps"] or d["num_stages"] != job["num_stages"]:
            continue
        if job.get("dtype") not in ("", d["dtype"]) or any(
            d["by_name"].get(k, _MISSING) != v for k, v in job["constexprs"].items()
        ):
            continue
        return True
    return False


_MISSING = object()


def derive_jobs(workloads: Sequence[str], archs: Sequence[int]) -> tuple[list[dict], list]:
    """Compile jobs for what the launchers run at each workload, deduplicated.

    Each workload's step runs on fake tensors with Triton launches captured
    (`ssiu.launch_capture`); Triton's own binder turns each launch into the signature,
    constants and divisibility attributes the JIT would compile for it.
    """
    from ssiu import launch_capture as lc
    from ssiu.kernels.common import modelled_arch

    jobs: dict[str, dict] = {}
    bad: list[CheckRow] = []
    # Launchers pick configs by architecture (`device_arch`): one capture per arch.
    for name, arch in itertools.product(workloads, archs):
        try:
            with modelled_arch(arch):
                capture = lc.fake_step(**lc.ALL_WORKLOADS[name])
        except Exception as e:
            row = CheckRow(kernel=f"(workload {name})", config="(capture)", arch=arch)
            row.problems.append(f"capture failed: {type(e).__name__}: {e}"[:300])
            bad.append(row)
            continue
        for launch in capture.launches:
            spec = lc.specialisation(launch, arch)
            key = json.dumps([launch.name, arch, spec], default=str, sort_keys=True)
            if key in jobs:
                if name not in jobs[key]["source"].split(","):
                    jobs[key]["source"] += "," + name
                continue
            jobs[key] = _derived_job(launch, arch, spec, name)
    return list(jobs.values()), bad


def _derived_job(launch, arch: int, spec: dict, workload: str) -> dict:

    pyfn = python_function(launch.kernel)
    names = list(spec["signature"])
    by_name = {names[p[0]]: v for p, v in spec["constexprs"] if len(p) == 1}
    options = dict(spec["options"])
    num_warps = options.pop("num_warps", 4)
    num_stages = options.pop("num_stages", 3)
    pointers = [t for t in spec["signature"].values() if t.startswith("*")]
    dtype = pointers[0][1:] if pointers else "-"
    divisible = [
        names[p[0]]
        for p, attr in spec["attrs"]
        if len(p) == 1 and not spec["signature"][names[p[0]]].startswith("*")
        and ["tt.divisibility", 16] in [list(a) for a in attr]
    ]  # fmt: skip
    values = ",".join(f"{k}={v}" for k, v in by_name.items())
    label = f"{dtype} {values} w{num_warps} s{num_stages}"
    if options.get("maxnreg"):
        label += f" r{options['maxnreg']}"
    if divisible:
        label += " /16:" + ",".join(divisible)
    return {
        "kernel": launch.name,
        "config": label,
        "source": workload,
        "module": pyfn.__module__,
        "qualname": pyfn.__qualname__,
        "file": inspect.getsourcefile(pyfn),
        "derived": {
            "signature": spec["signature"],
            "constexprs": [[p, _encode_constexpr(v)] for p, v in spec["constexprs"]],
            "attrs": spec["attrs"],
        },
        "options": options,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "arch": arch,
        "dtype": _TORCH_DTYPE_NAMES.get(dtype, dtype),
        "by_name": by_name,
    }


# Triton pointer element names -> the registry's DtypeConfig dtype label.
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _run_workers(jobs, workers, cache_dir, progress, timeout=CONFIG_TIMEOUT_S):
    n = workers or min(os.cpu_count() or 1, 8)
    n = max(1, min(n, len(jobs)))
    for i, job in enumerate(jobs):
        job["index"] = i
    chunks = [jobs[i::n] for i in range(n)]
    results: dict[int, CheckRow] = {}
    with tempfile.TemporaryDirectory(prefix="ssiu-check-kernels-") as tmp:
        env = dict(os.environ)
        env.update(
            TRITON_INTERPRET="0",  # real JITFunctions in the worker (see the module doc)
            TRITON_DUMP_PTXAS_LOG="1",  # ptxas -v report: registers, spills
            TRITON_ALWAYS_COMPILE="1",
            TRITON_CACHE_DIR=os.path.join(tmp, "triton-cache"),
        )
        procs = []
        for w, chunk in enumerate(chunks):
            jobs_path = os.path.join(tmp, f"jobs{w}.json")
            out_path = os.path.join(tmp, f"out{w}.jsonl")
            with open(jobs_path, "w") as f:
                json.dump({"sys_path": sys.path, "cache_dir": cache_dir, "jobs": chunk}, f)
            cmd = [sys.executable, "-m", "ssiu.check_kernels", jobs_path, out_path]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            procs.append((proc, chunk, out_path))

        def collect(out_path) -> bool:
            """Read the worker's new rows; True if there were any."""
            if not os.path.exists(out_path):
                return False
            new = False
            with open(out_path) as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # still being written
                    data = json.loads(line)
                    index = data.pop("index")
                    if index not in results:
                        new = True
                        results[index] = CheckRow(**data)
                        if progress:
                            progress(results[index])
            return new

        # Workers write stderr to a pipe; drain each in a thread so none blocks on it.
        errors = {}
        readers = []
        for proc, _, _ in procs:
            reader = threading.Thread(
                target=lambda p=proc: errors.__setitem__(p.pid, p.stderr.read()), daemon=True
            )
            reader.start()
            readers.append(reader)
        last_row = {proc.pid: time.monotonic() for proc, _, _ in procs}
        timed_out = set()
        while any(proc.poll() is None for proc, _, _ in procs):
            for proc, _, out_path in procs:
                if collect(out_path):
                    last_row[proc.pid] = time.monotonic()
                elif proc.poll() is None and time.monotonic() - last_row[proc.pid] > timeout:
                    proc.kill()
                    timed_out.add(proc.pid)
            time.sleep(0.2)
        for reader in readers:
            reader.join(timeout=10)
        for proc, chunk, out_path in procs:
            proc.wait()
            collect(out_path)
            if proc.pid in timed_out:
                why = f"compile took over {timeout:.0f} s: worker stopped"
            else:
                why = f"compile worker exited with code {proc.returncode}"
            err = errors.get(proc.pid, "")
            tail = "\n".join((err or "").strip().splitlines()[-15:])
            for job in chunk:
                if job["index"] not in results:
                    row = CheckRow(kernel=job["kernel"], config=job["config"], arch=job["arch"])
                    row.problems.append(why)
                    row.detail = tail
                    results[job["index"]] = row
    return [results[i] for i in sorted(results)]


# ---------------------------------------------------------------------------------------
# Worker side: runs with TRITON_INTERPRET=0 in its own process.


def _load_kernel(job: dict):
    """The JITFunction `job` names: import its module by name, else load its file."""
    from triton.runtime.jit import JITFunction

    def lookup(module):
        obj = module
        for part in job["qualname"].split("."):
            obj = getattr(obj, part)
        for _ in range(8):  # unwrap triton.autotune / triton.heuristics
            if isinstance(obj, JITFunction):
                return obj
            obj = getattr(obj, "fn", None)
        raise TypeError(f"{job['module']}.{job['qualname']} is not a @triton.jit function")

    module = None
    if job["module"] != "__main__":
        try:
            module = importlib.import_module(job["module"])
            found = inspect.getsourcefile(python_function(lookup(module)))
            if job["file"] and found and os.path.realpath(found) != os.path.realpath(job["file"]):
                module = None  # a different module of the same name
        except Exception:
            module = None
    if module is None:
        name = "_ssiu_check_" + re.sub(r"\W", "_", job["file"] or job["module"])
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, job["file"])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return lookup(module)


def _full_signature(fn, job: dict) -> tuple[dict, dict]:
    """Signature over all arguments in order, constexprs marked "constexpr" (triton >= 3.2)."""
    given = dict(job["signature"])
    constexprs = {k: _decode_constexpr(v) for k, v in job["constexprs"].items()}
    names = [p.name for p in fn.params]
    extra = sorted((set(given) | set(constexprs)) - set(names))
    if extra:
        raise ValueError(f"{fn.__name__} has no arguments {extra}")
    signature = {}
    for p in fn.params:
        if p.name in constexprs:
            signature[p.name] = "constexpr"
        elif p.is_constexpr and p.default is not inspect.Parameter.empty:
            constexprs[p.name] = p.default
            signature[p.name] = "constexpr"
        elif p.is_constexpr:
            raise ValueError(f"constexpr {p.name!r} has no value in the config")
        elif p.name in given:
            signature[p.name] = given[p.name]
        else:
            raise ValueError(f"no type given for argument {p.name!r} in the spec's signature")
    return signature, constexprs


def _ptxas_report(log: str) -> dict:
    found = {}
    if m := re.search(r"Used (\d+) registers", log):
        found["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        found["spills"] = int(m.group(1)) + int(m.group(2))
    if m := re.search(r"(\d+) bytes stack frame", log):
        found["stack"] = int(m.group(1))
    return found


def _cuobjdump_report(cubin: bytes) -> dict:
    """Registers and stack from the cubin itself, for when ptxas's report is missing."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = {}
    if m := re.search(r"REG:(\d+)", out):
        found["registers"] = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", out):
        found["stack"] = int(m.group(1))
    return found


def _cache_key(src, job: dict) -> str:
    import hashlib

    import triton

    try:
        from triton.compiler.compiler import get_cache_invalidating_env_vars

        env = get_cache_invalidating_env_vars()
    except ImportError:
        env = {}
    parts = [src.hash(), job["arch"], job["num_warps"], job["num_stages"], triton.__version__]
    parts += [ROW_FORMAT, sorted(job.get("options", {}).items())]
    text = json.dumps([parts, sorted(env.items())], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_error(error: BaseException) -> tuple[str, str]:
    """(one line, full text) of a compile error and the errors it was raised from.

    Triton reports an error inside a called @triton.jit function as an error at the call
    site whose cause holds the real message, so the whole chain is shown.
    """
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    texts = [f"{type(e).__name__}: {str(e).strip()}" for e in chain]
    short = ""
    for e in reversed(chain):  # the innermost error with a message of its own
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
        if lines:
            short = f"{type(e).__name__}: {lines[-1]}"
            break
    return short or type(chain[0]).__name__, "\n\n".join(texts)[-4000:]


def _compile_job(job: dict, cache_dir: str | None = None) -> CheckRow:
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = CheckRow(
        kernel=job["kernel"], config=job["config"], arch=job["arch"], source=job["source"]
    )
    log = io.StringIO()
    try:
        fn = _load_kernel(job)
        if "derived" in job:  # what the JIT compiles for a captured launch
            derived = job["derived"]
            signature = derived["signature"]
            constexprs = {tuple(p): _decode_constexpr(v) for p, v in derived["constexprs"]}
            attrs = {tuple(p): v for p, v in derived["attrs"]}
        else:
            signature, constexprs = _full_signature(fn, job)
            # Pointers 16-byte aligned, as the launcher specialises torch's allocations.
            attrs = {
                (i,): [["tt.divisibility", 16]]
                for i, ty in enumerate(signature.values())
                if isinstance(ty, str) and ty.startswith("*")
            }
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        cache_path = None
        if cache_dir:
            cache_path = os.path.join(cache_dir, _cache_key(src, job) + ".json")
            if os.path.exists(cache_path):
                with open(cache_path) as f:
                    cached = json.load(f)
                keep = {"kernel": row.kernel, "config": row.config, "source": row.source}
                row = CheckRow(**{**cached, **keep})
                row.cached = True
                return row
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", job["arch"], WARP_SIZE),
                options={
                    **job.get("options", {}),
                    "num_warps": job["num_warps"],
                    "num_stages": job["num_stages"],
                },
            )
        row.compile_s = round(time.perf_counter() - start, 3)
    except Exception as e:
        short, row.detail = _describe_error(e)
        row.problems.append(f"compile error: {short[:200]}")
        return row
    report = _ptxas_report(log.getvalue())
    if "registers" not in report:
        with contextlib.suppress(Exception):
            report = {**_cuobjdump_report(kernel.asm["cubin"]), **report}
    row.registers = report.get("registers")
    row.stack = report.get("stack")
    # Without ptxas's spill count, any stack frame is taken as spilling (Triton kernels
    # have no local arrays, so their stack holds spilled registers).
    row.spills = report.get("spills", row.stack)
    row.shared = int(kernel.metadata.shared)
    try:
        sass = sass_report(_sass(kernel.asm["cubin"]))
        row.hmma, row.hgmma, row.ldg, row.stg = (sass[k] for k in ("hmma", "hgmma", "ldg", "stg"))
    except Exception as e:  # figures missing: the row says so, the parent fails it
        row.problems.append(f"cuobjdump -sass failed: {type(e).__name__}: {e}"[:200])
        return row
    if cache_path:
        with contextlib.suppress(OSError):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(dataclasses.asdict(row), f)
            os.replace(tmp, cache_path)
    return row


def resident_warps(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Warps of this kernel resident on one SM: blocks limited by registers, shared
    memory, warps and blocks per SM, times warps per block (0 if a block does not fit)."""
    per_warp = -(-registers * WARP_SIZE // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (MAX_REGISTERS_PER_BLOCK // per_warp) // num_warps if per_warp else 99
    by_shared = SHARED_MEMORY_PER_SM[arch] * 1024 // (shared + 1024)
    by_warps = MAX_WARPS_PER_SM[arch] // num_warps
    return min(by_registers, by_shared, by_warps, MAX_BLOCKS_PER_SM) * num_warps


def narrow_accesses(row: CheckRow) -> int:
    """Global load/store instructions moving 2 bytes or less per lane."""
    return sum(n for mix in (row.ldg or {}, row.stg or {}) for b, n in mix.items() if int(b) <= 2)


def _judge(row: CheckRow, num_warps: int, strict_access: bool = False) -> None:
    """Add the problems (and warnings) of a compiled row's figures."""
    limit = SHARED_MEMORY_LIMITS[row.arch]
    row.num_warps = num_warps
    if row.registers is None:
        row.problems.append("register count not found in the ptxas report")
    elif row.registers > MAX_REGISTERS_PER_THREAD:
        row.problems.append(f"{row.registers} registers > {MAX_REGISTERS_PER_THREAD}")
    elif row.registers * num_warps * WARP_SIZE > MAX_REGISTERS_PER_BLOCK:
        row.problems.append(
            f"{row.registers} registers x {num_warps * WARP_SIZE} threads > "
            f"{MAX_REGISTERS_PER_BLOCK} per block"
        )
    elif row.registers > REGISTER_HEADROOM:
        row.problems.append(f"{row.registers} registers > {REGISTER_HEADROOM} (headroom)")
    if row.spills is None:
        row.problems.append("spill count not found in the ptxas report")
    elif row.spills > 0:
        row.problems.append(f"spills {row.spills} bytes")
    if row.shared is not None and row.shared > limit:
        row.problems.append(f"shared memory {row.shared} B > {limit} B per block on sm_{row.arch}")
    if row.registers is not None and row.shared is not None and row.arch in MAX_WARPS_PER_SM:
        row.warps_per_sm = resident_warps(row.arch, row.registers, row.shared, num_warps)
    if narrow := narrow_accesses(row):
        text = f"{narrow} global accesses of <= 2 bytes per lane"
        (row.problems if strict_access else row.warnings).append(text)


_SASS_GLOBAL = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.\w+)*)")


def sass_report(sass: str) -> dict:
    """Tensor-core instructions and the global load/store mix of a kernel's SASS.

    Width of an LDG/STG (and cp.async LDGSTS) per lane from its modifiers: .128 = 16 bytes,
    .64 = 8, .U16/.S16 = 2, .U8/.S8 = 1, none of these = 4 (32-bit).
    """
    ldg: dict[int, int] = {}
    stg: dict[int, int] = {}
    hmma = hgmma = 0
    for line in sass.splitlines():
        code = line.split("*/", 1)[-1]
        hgmma += bool(re.search(r"\bHGMMA\b", code))
        hmma += bool(re.search(r"\bHMMA\b", code))
        if m := _SASS_GLOBAL.search(code):
            mods = set(m.group(2).split("."))
            width = (
                32 if "256" in mods
                else 16 if "128" in mods
                else 8 if "64" in mods
                else 2 if mods & {"U16", "S16"}
                else 1 if mods & {"U8", "S8"}
                else 4
            )  # fmt: skip
            mix = stg if m.group(1) == "STG" else ldg
            mix[width] = mix.get(width, 0) + 1
    return {"hmma": hmma, "hgmma": hgmma, "ldg": ldg, "stg": stg}


def _sass(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _worker_main(jobs_path: str, out_path: str) -> int:
    with open(jobs_path) as f:
        payload = json.load(f)
    sys.path.extend(p for p in payload["sys_path"] if p not in sys.path)
    with open(out_path, "a") as out:
        for job in payload["jobs"]:
            row = _compile_job(job, payload.get("cache_dir"))
            data = dataclasses.asdict(row)
            data["index"] = job["index"]
            out.write(json.dumps(data) + "\n")
            out.flush()
    return 0


# ---------------------------------------------------------------------------------------
# Command line.


def _mix(mix: dict | None) -> str:
    """'16B:12 8B:4 2B:30' for {16: 12, 8: 4, 2: 30}."""
    return " ".join(f"{b}B:{n}" for b, n in sorted((mix or {}).items(), reverse=True)) or "-"


def format_table(rows: Sequence[CheckRow]) -> str:
    headers = ("kernel", "config", "arch", "regs", "spills", "shared (B)", "warps/SM",
               "HMMA", "HGMMA", "LDG", "STG", "compile", "status")  # fmt: skip
    body = [
        (
            r.kernel,
            r.config,
            f"sm_{r.arch}" if r.arch else "-",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spills is None else str(r.spills),
            "-" if r.shared is None else f"{r.shared} / {SHARED_MEMORY_LIMITS[r.arch]}",
            "-" if r.warps_per_sm is None else str(r.warps_per_sm),
            "-" if r.hmma is None else str(r.hmma),
            "-" if r.hgmma is None else str(r.hgmma),
            _mix(r.ldg),
            _mix(r.stg),
            "cached" if r.cached else "-" if r.compile_s is None else f"{r.compile_s:.2f} s",
            r.status,
        )
        for r in rows
    ]
    return _columns(headers, body)


def _columns(headers, body) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def access_mix(rows: Sequence[CheckRow]) -> dict:
    """Static global load/store instructions of compiled rows: total, share of 2 bytes or
    less per lane, share of 8 bytes or more."""
    total = narrow = wide = 0
    for r in rows:
        for mix in (r.ldg or {}, r.stg or {}):
            for b, n in mix.items():
                total += n
                narrow += n if int(b) <= 2 else 0
                wide += n if int(b) >= 8 else 0
    return {
        "instructions": total,
        "narrow_share": narrow / total if total else 0.0,
        "wide_share": wide / total if total else 0.0,
    }


def _worst(rows: Sequence[CheckRow], attr: str, pick) -> str:
    return str(pick(getattr(r, attr) or 0 for r in rows)) if rows else "-"


def summary(rows: Sequence[CheckRow]) -> str:
    """One line per kernel over its configs and architectures (worst figures)."""
    kernels: dict[str, list[CheckRow]] = {}
    for r in rows:
        kernels.setdefault(r.kernel, []).append(r)
    body = []
    for name, group in kernels.items():
        done = [r for r in group if r.registers is not None]
        worst = lambda attr, f=max, rows=done: _worst(rows, attr, f)
        mix = access_mix(done)
        failed = sum(not r.ok for r in group)
        warned = sum(r.ok and bool(r.warnings) for r in group)
        body.append((
            name, str(len(group)), worst("registers"), worst("spills"),
            worst("warps_per_sm", min), worst("hmma") + "/" + worst("hgmma"),
            f"{mix['narrow_share']:.0%}", f"{mix['wide_share']:.0%}",
            f"{failed} FAIL" if failed else f"{warned} warn" if warned else "ok",
        ))  # fmt: skip
    headers = ("kernel", "rows", "max regs", "spills", "min warps/SM", "HMMA/HGMMA",
               "<=2B access", ">=8B access", "status")  # fmt: skip
    return _columns(headers, body)


def _print_progress(row: CheckRow) -> None:
    when = "cached" if row.cached else f"{row.compile_s or 0:.1f} s"
    print(f"  {row.kernel} [{row.config}] sm_{row.arch}: {row.status} ({when})", flush=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of `ssiu check-kernels`: print the summary, 1 if any config fails."""
    import triton

    archs = tuple(args.arch or DEFAULT_ARCHS)
    specs = getattr(args, "specs", None)  # tests pass their own specs
    cache = not getattr(args, "no_cache", False)
    workloads = getattr(args, "workloads", None)
    if workloads is None:
        from ssiu.launch_capture import WORKLOADS

        workloads = [] if specs is not None else list(WORKLOADS)
    if "all" in workloads:
        from ssiu.launch_capture import ALL_WORKLOADS

        workloads = list(ALL_WORKLOADS)
    registry = getattr(args, "registry", None) or ("all" if specs is not None else "none")
    print(
        f"check-kernels: triton {triton.__version__}, compiling for "
        f"{', '.join(f'sm_{a}' for a in archs)}; launches of {', '.join(workloads) or '-'}, "
        f"registry configs: {registry} (cache: {default_cache_dir() if cache else 'off'})",
        flush=True,
    )
    start = time.perf_counter()
    rows = check_kernels(
        archs,
        specs,
        workers=getattr(args, "jobs", None),
        cache=cache,
        progress=_print_progress if getattr(args, "progress", False) else None,
        only=getattr(args, "only", None) or (),
        workloads=workloads,
        registry=registry,
        strict_access=getattr(args, "strict_access", False),
    )
    elapsed = time.perf_counter() - start
    if not rows:
        print("check-kernels: no kernel configs; nothing to compile (ok)")
        return 0
    if getattr(args, "verbose", False):
        print(format_table(rows) + "\n")
    failed = [r for r in rows if not r.ok]
    for r in failed:
        print(f"FAIL {r.kernel} [{r.config}] sm_{r.arch}: {'; '.join(r.problems)}")
        if r.detail:
            print("  " + r.detail[-1500:].replace("\n", "\n  "))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    print(summary(rows))
    canonical = lambda r: "train-bf16" in r.source.split(",")
    trained = [r for r in rows if canonical(r) and r.registers is not None]
    mix = access_mix(trained)
    if trained:
        print(
            f"training-step kernels: {mix['instructions']} static global load/store "
            f"instructions, {mix['narrow_share']:.0%} move <= 2 bytes per lane (target <= 10%), "
            f"{mix['wide_share']:.0%} move >= 8 (target >= 50%)"
        )
    warned = sum(r.ok and bool(r.warnings) for r in rows)
    print(
        f"check-kernels: {len(rows) - len(failed)}/{len(rows)} configs ok for "
        f"{', '.join(f'sm_{a}' for a in archs)} in {elapsed:.1f} s"
        + (f"; {warned} with narrow global accesses (warn; --strict-access fails them)"
           if warned else "")
        + (f"; {len(failed)} FAILED" if failed else "")
    )  # fmt: skip
    return 1 if failed else 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "check-kernels",
        help="compile the Triton kernels that run, for sm_90/sm_80, without a GPU",
        description=(
            "Capture the Triton launches of the canonical workloads (fake tensors, nothing "
            "runs), compile each with the specialisation the JIT gives it, using Triton's "
            "compiler and the ptxas in the triton wheel (no GPU needed); report registers, "
            "spills, shared memory, resident warps, tensor-core instructions and the global "
            "load/store widths from the SASS; exit 1 if a config fails to compile, spills, "
            f"uses more than {REGISTER_HEADROOM} registers or exceeds the architecture's limits."
        ),
    )
    p.add_argument(
        "--arch",
        type=int,
        action="append",
        metavar="CC",
        help="compute capability to compile for, repeatable (default: --arch 90 --arch 80)",
    )
    p.add_argument(
        "--workload",
        dest="workloads",
        action="append",
        metavar="NAME",
        help="capture this workload's launches, repeatable: train-bf16, infer-bf16, "
        "infer-fp32 (the default: all three), train-fp32-c16, train-fp32-c32 (the other "
        "supported widths), or 'all'",
    )
    p.add_argument(
        "--registry",
        choices=("none", "extras", "all"),
        default=None,
        help="also compile registered configs (plain i32 signatures): 'extras' those no "
        "captured launch runs (other dtypes, sizes, scales), 'all' every one (default: none)",
    )
    p.add_argument(
        "--strict-access",
        action="store_true",
        help="fail (not warn) on global loads/stores of 2 bytes or less per lane",
    )
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: cores)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="check only configs whose 'kernel [config]' contains TEXT (repeatable), "
        "e.g. --only bf16 --only msgm_fwd",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="compile every config again (see module doc)"
    )
    p.add_argument("--progress", action="store_true", help="a line per finished compile")
    p.add_argument("-v", "--verbose", action="store_true", help="print every row")
    p.set_defaults(func=run)


if __name__ == "__main__":  # the compile worker: python -m ssiu.check_kernels JOBS OUT
    sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
