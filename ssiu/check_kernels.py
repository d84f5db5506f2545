"""`ssiu check-kernels`: compile every registered Triton kernel config for sm_90 and sm_80.

No GPU is needed. Each (kernel, config, arch) goes through Triton's own compiler
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`), which lowers it to
PTX and runs the `ptxas` shipped in the triton wheel. From ptxas's report we read the
registers and spill bytes, and from the kernel's metadata the shared memory it asks for;
a config fails if it does not compile, spills, needs more shared memory than one block
of that architecture may have, or more registers than a thread (255) or a block
(65536 in all) may have.

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
MAX_REGISTERS_PER_BLOCK = 64 * 1024
WARP_SIZE = 32
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

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAIL: " + "; ".join(self.problems)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok, "status": self.status}


def config_label(config) -> str:
    """'BLOCK=64,C=64 w4 s2' for a KernelConfig; fields a subclass adds come first."""
    extra = [
        f"{f.name}={str(getattr(config, f.name)).removeprefix('torch.')}"
        for f in dataclasses.fields(config)
        if f.name not in ("constexprs", "num_warps", "num_stages")
    ]
    values = ",".join(extra + [f"{k}={v}" for k, v in config.constexprs.items()])
    return f"{values} w{config.num_warps} s{config.num_stages}".strip()


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
                    "module": pyfn.__module__,
                    "qualname": pyfn.__qualname__,
                    "file": inspect.getsourcefile(pyfn),
                    "signature": dict(spec.signature_for(config)),
                    "constexprs": {k: _encode_constexpr(v) for k, v in config.constexprs.items()},
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
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
) -> list[CheckRow]:
    """Compile every config of every spec for every arch; one CheckRow each.

    specs: KernelSpecs to check; None = everything `ssiu.kernels` registers.
    workers: compile processes in parallel (default: one per core, at most 8).
    cache: reuse the rows of earlier successful compiles (see the module doc).
    progress: called with each row as its compile finishes.
    only: if given, check just the configs whose "kernel [config]" contains one of these.
    """
    archs = tuple(int(a) for a in archs)
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMITS]
    if unknown:
        raise ValueError(
            f"no shared-memory limit known for sm_{unknown[0]}; "
            f"known architectures: {sorted(SHARED_MEMORY_LIMITS)}"
        )
    rows: list[CheckRow] = []
    if specs is None:
        specs, rows = load_registered_specs()
    jobs, bad = _make_jobs(list(specs), archs)
    if only:
        chosen = lambda r: any(o in f"{r['kernel']} [{r['config']}]" for o in only)
        jobs = [j for j in jobs if chosen(j)]
        bad = [r for r in bad if chosen(dataclasses.asdict(r))]
    rows += bad
    if jobs:
        rows += _run_workers(jobs, workers, default_cache_dir() if cache else None, progress)
    return rows


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

    row = CheckRow(kernel=job["kernel"], config=job["config"], arch=job["arch"])
    log = io.StringIO()
    try:
        fn = _load_kernel(job)
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
                row = CheckRow(**{**cached, "kernel": row.kernel, "config": row.config})
                row.cached = True
                return row
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", job["arch"], WARP_SIZE),
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
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
    _judge(row, job["num_warps"])
    if cache_path:
        with contextlib.suppress(OSError):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(dataclasses.asdict(row), f)
            os.replace(tmp, cache_path)
    return row


def _judge(row: CheckRow, num_warps: int) -> None:
    limit = SHARED_MEMORY_LIMITS[row.arch]
    if row.registers is None:
        row.problems.append("register count not found in the ptxas report")
    elif row.registers > MAX_REGISTERS_PER_THREAD:
        row.problems.append(f"{row.registers} registers > {MAX_REGISTERS_PER_THREAD}")
    elif row.registers * num_warps * WARP_SIZE > MAX_REGISTERS_PER_BLOCK:
        row.problems.append(
            f"{row.registers} registers x {num_warps * WARP_SIZE} threads > "
            f"{MAX_REGISTERS_PER_BLOCK} per block"
        )
    if row.spills is None:
        row.problems.append("spill count not found in the ptxas report")
    elif row.spills > 0:
        row.problems.append(f"spills {row.spills} bytes")
    if row.shared > limit:
        row.problems.append(f"shared memory {row.shared} B > {limit} B per block on sm_{row.arch}")


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


def format_table(rows: Sequence[CheckRow]) -> str:
    headers = (
        "kernel",
        "config",
        "arch",
        "registers",
        "spills (B)",
        "shared (B)",
        "compile",
        "status",
    )
    body = [
        (
            r.kernel,
            r.config,
            f"sm_{r.arch}" if r.arch else "-",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spills is None else str(r.spills),
            "-" if r.shared is None else f"{r.shared} / {SHARED_MEMORY_LIMITS[r.arch]}",
            "cached" if r.cached else "-" if r.compile_s is None else f"{r.compile_s:.2f} s",
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def _print_progress(row: CheckRow) -> None:
    when = "cached" if row.cached else f"{row.compile_s or 0:.1f} s"
    print(f"  {row.kernel} [{row.config}] sm_{row.arch}: {row.status} ({when})", flush=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of `ssiu check-kernels`: print the table, 1 if any config fails."""
    archs = tuple(args.arch or DEFAULT_ARCHS)
    specs = getattr(args, "specs", None)  # tests pass their own specs
    cache = not getattr(args, "no_cache", False)
    print(
        f"check-kernels: compiling for {', '.join(f'sm_{a}' for a in archs)} "
        f"(cache: {default_cache_dir() if cache else 'off'})",
        flush=True,
    )
    start = time.perf_counter()
    rows = check_kernels(
        archs,
        specs,
        workers=getattr(args, "jobs", None),
        cache=cache,
        progress=_print_progress if getattr(args, "progress", True) else None,
        only=getattr(args, "only", None) or (),
    )
    elapsed = time.perf_counter() - start
    if not rows:
        print(
            "check-kernels: no kernel specs registered in ssiu.kernels.registry.KERNEL_SPECS; "
            "nothing to compile (ok)"
        )
        return 0
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    for r in failed:
        if r.detail:
            print(
                f"\n{r.kernel} [{r.config}] sm_{r.arch}:\n  "
                + r.detail[-1500:].replace("\n", "\n  ")
            )
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    print(
        f"\ncheck-kernels: {len(rows) - len(failed)}/{len(rows)} configs ok for "
        f"{', '.join(f'sm_{a}' for a in archs)} in {elapsed:.1f} s"
        + (f"; {len(failed)} FAILED" if failed else "")
    )
    return 1 if failed else 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "check-kernels",
        help="compile every Triton kernel config for sm_90/sm_80 without a GPU",
        description=(
            "Compile every registered Triton kernel config ahead of time with Triton's own "
            "compiler and the ptxas in the triton wheel (no GPU needed); report registers, "
            "spills and shared memory; exit 1 if a config fails to compile, spills, or "
            "exceeds the architecture's limits."
        ),
    )
    p.add_argument(
        "--arch",
        type=int,
        action="append",
        metavar="CC",
        help="compute capability to compile for, repeatable (default: --arch 90 --arch 80)",
    )
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: cores)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="check only configs whose 'kernel [config]' contains TEXT (repeatable), "
        "e.g. --only dtype=bfloat16 --only msgm_fwd",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="compile every config again (see module doc)"
    )
    p.add_argument(
        "--quiet", dest="progress", action="store_false", help="no line per finished compile"
    )
    p.set_defaults(func=run)


if __name__ == "__main__":  # the compile worker: python -m ssiu.check_kernels JOBS OUT
    sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
