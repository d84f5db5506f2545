"""The verdict of a GPU check: each performance and correctness target, measured value,
met or not; and the Markdown report around it.

Targets come from the kernel issues and the README's performance notes: per op at the
training shape (x4 step: batch 40, C = 64, 64x64, bf16), fwd+bwd speed-ups over the eager
reference and over torch.compile of it, bandwidth and activation memory; end to end:
training throughput and peak memory, inference latency (320x180 -> 1280x720, bf16),
launches per step, one graph replay on the CUDA-graph path, saved activations; and the
correctness parts (GPU tests, determinism, keep set, compute-sanitizer). A value is
reported only where it was measured; everything else says "not measured" and why.
"""

from __future__ import annotations

from collections.abc import Callable

MET, NOT_MET = "met", "NOT met"


def _rows(doc: dict, part: str) -> list[dict]:
    return ((doc.get("parts", {}).get(part) or {}).get("result") or {}).get("rows", [])


def _find(rows, op, mode, provider, preset=None) -> dict | None:
    """The row of (op, mode, provider), at `preset` if there is one (the dry run has only
    its toy "quick" rows: then those, whose status says why nothing was measured)."""
    found = [r for r in rows if (r["op"], r["mode"], r["provider"]) == (op, mode, provider)]
    exact = [r for r in found if preset is None or r.get("preset") == preset]
    return (exact or found or [None])[0]


def _ms(row) -> float | None:
    return row["median_ms"] if row and row.get("status") == "ok" else None


def _why(*rows) -> str:
    for r in rows:
        if r is None:
            return "not measured (row not run)"
        if r.get("status") != "ok":
            return f"not measured ({r['status'][:60]})"
    return "not measured"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _speedup(rows, op, base, mine, mode="fwd+bwd", preset="train"):
    b, m = _find(rows, op, mode, base, preset), _find(rows, op, mode, mine, preset)
    return _ratio(_ms(b), _ms(m)), _why(b, m)


def _best(rows, op, mode, providers):
    found = [r for p in providers if (r := _find(rows, op, mode, p)) and _ms(r) is not None]
    return min(found, key=_ms) if found else None


def targets(doc: dict) -> list[dict]:
    """[{target, source, value, status}] for every target, in report order."""
    ops, e2e = _rows(doc, "ops"), _rows(doc, "e2e")
    out = []

    def add(target, source, value, goal: Callable[[float], bool] | None, fmt, why="",
            perf=True):  # fmt: skip
        if perf and doc.get("dry"):  # toy sizes on a CPU: no figure is a measurement
            value, why = None, "not measured (dry run)"
        if value is None:
            out.append(dict(target=target, source=source, value="-",
                            status=why or "not measured"))  # fmt: skip
        else:
            status = MET if goal is None or goal(value) else NOT_MET
            out.append(dict(target=target, source=source, value=fmt.format(value), status=status))

    speed = [("msgm", 3.0, 1.5, "issue 3"), ("esam", 4.0, 2.0, "issue 4"),
             ("moe_fs", 2.0, 1.3, "issue 5"), ("tail_x4", 2.0, 1.3, "issue 5")]  # fmt: skip
    for op, vs_eager, vs_compile, src in speed:
        v, why = _speedup(ops, op, "eager", "fused")
        add(f"{op} fwd+bwd fused >= {vs_eager}x eager", src, v, lambda x, t=vs_eager: x >= t,
            "{:.2f}x", why)  # fmt: skip
        v, why = _speedup(ops, op, "compile", "fused")
        add(f"{op} fwd+bwd fused >= {vs_compile}x torch.compile(ref)", src, v,
            lambda x, t=vs_compile: x >= t, "{:.2f}x", why)  # fmt: skip
    r = _find(ops, "msgm", "fwd", "fused", "train")
    frac = r.get("copy_bw_fraction") if r and _ms(r) else None
    add("msgm fwd >= 60% of copy bandwidth", "issue 3", frac and 100 * frac,
        lambda x: x >= 60, "{:.0f}%", _why(r))  # fmt: skip
    for op, limit, src in (("msgm", 0.5, "issue 3"), ("esam", 0.25, "issue 4")):
        f, e = _find(ops, op, "fwd", "fused", "train"), _find(ops, op, "fwd", "eager", "train")
        v = _ratio(f and f.get("saved_bytes"), e and e.get("saved_bytes"))
        add(f"{op} saved activations <= {limit:g} x eager", src, v, lambda x, t=limit: x <= t,
            "{:.2f}x", _why(f, e))  # fmt: skip
    d, s = (
        _find(ops, "esam", "fwd+bwd", "fused", "train"),
        _find(ops, "esam_top16", "fwd+bwd", "fused", "train"),
    )
    add("esam top-16 fwd+bwd <= 1.3 x dense", "issue 4", _ratio(_ms(s), _ms(d)),
        lambda x: x <= 1.3, "{:.2f}x", _why(d, s))  # fmt: skip
    r = _find(ops, "tail_x4", "infer", "fused", "infer")
    v = _ratio(_ms(r), r and r.get("t_bytes_ms"))
    add("tail_x4 infer <= 1.5 x its bytes at copy bandwidth", "issue 5", v, lambda x: x <= 1.5,
        "{:.2f}x", _why(r))  # fmt: skip

    # End to end.
    fused = ("fused", "fused+compile")
    best = _best(e2e, "train_step_x4", "train", fused)
    eager, comp = (_find(e2e, "train_step_x4", "train", p) for p in ("eager", "compile"))
    why = _why(best or None, eager)
    add("training step fused >= 3x eager (images/s)", "issue 6", _ratio(_ms(eager), _ms(best)),
        lambda x: x >= 3, "{:.2f}x", why)  # fmt: skip
    add("training step fused >= 1.5x torch.compile(ref)", "issue 6",
        _ratio(_ms(comp), _ms(best)), lambda x: x >= 1.5, "{:.2f}x", _why(best, comp))  # fmt: skip
    add("training step images/s (best fused)", "measured", best and best.get("images_per_s"),
        None, "{:.0f} img/s", why)  # fmt: skip
    fr = _find(e2e, "train_step_x4", "train", "fused")
    v = _ratio(fr and fr.get("peak_mem_bytes"), eager and eager.get("peak_mem_bytes"))
    add("training peak memory fused <= 40% of eager", "issue 6", v and 100 * v, lambda x: x <= 40,
        "{:.0f}%", _why(fr, eager))  # fmt: skip
    best = _best(e2e, "inference_x4", "infer", (*fused, "fused+cudagraph"))
    eager = _find(e2e, "inference_x4", "infer", "eager")
    add("inference 180x320 -> 720x1280 <= 2 ms (bf16, best fused)", "issue 6", _ms(best),
        lambda x: x <= 2.0, "{:.3f} ms", _why(best))  # fmt: skip
    add("inference fused >= 8x eager", "issue 6", _ratio(_ms(eager), _ms(best)),
        lambda x: x >= 8, "{:.2f}x", _why(best, eager))  # fmt: skip
    graph = _find(e2e, "inference_x4", "infer", "fused+cudagraph")
    add("CUDA-graph inference: 1 graph launch per call", "issue 11",
        graph.get("graph_launches") if graph and _ms(graph) else None, lambda x: x == 1,
        "{:d} graph launch(es)", _why(graph))  # fmt: skip
    extra = (doc.get("parts", {}).get("e2e") or {}).get("result") or {}
    launches = extra.get("launches") or {}
    for key, limit, what in (("train_triton", 250, "training step (fwd+bwd)"),
                             ("infer_triton", 90, "inference forward")):  # fmt: skip
        v = (launches.get(key) or {}).get("launches")
        add(f"{what} launches <= {limit}", "issue 11", v, lambda x, t=limit: x <= t, "{:d}",
            _why_extra(launches))  # fmt: skip
    saved = extra.get("saved") or {}
    v = saved.get("ratio")
    add("training saved activations <= 20% of eager", "issue 11", v and 100 * v,
        lambda x: x <= 20, "{:.0f}%", _why_extra(saved))  # fmt: skip
    add("modelled bytes <= 1.5 x floor (static)", "issue 11", _profile_bytes_ratio(doc),
        lambda x: x <= 1.5, "{:.2f}x", "not measured (no `ssiu profile` figure)")  # fmt: skip

    # Correctness.
    tests = (doc.get("parts", {}).get("tests") or {}).get("result") or {}
    if tests.get("total"):
        fails = tests.get("failed", 0) + tests.get("errors", 0)
        add("GPU tests pass (pytest -m gpu)", "issues 3-13", fails, lambda x: x == 0,
            f"{{:d}} failed of {tests['total']} ({tests.get('skipped', 0)} skipped)",
            perf=False)  # fmt: skip
        for key, label in (("keep_set", "top-k keep set same fwd/bwd"),
                           ("bit_identical", "gradients bit-identical on two runs")):  # fmt: skip
            cases = [c for c in tests.get("cases", []) if key in c["name"]]
            bad = sum(c["outcome"] in ("failed", "error") for c in cases)
            ran = sum(c["outcome"] != "skipped" for c in cases)
            add(label, "issue 11/13", bad if ran else None, lambda x: x == 0,
                f"{{:d}} failed of {ran}", "not measured (did not run)", perf=False)  # fmt: skip
    else:
        add("GPU tests pass (pytest -m gpu)", "issues 3-13", None, None, "",
            _part_why(doc, "tests"), perf=False)  # fmt: skip
    san = (doc.get("parts", {}).get("sanitizer") or {}).get("result") or {}
    for tool in ("memcheck", "racecheck"):
        r = san.get(tool) or {}
        add(f"compute-sanitizer {tool}: 0 errors", "issue 13", r.get("errors"), lambda x: x == 0,
            "{:d} errors", r.get("status") or _part_why(doc, "sanitizer"), perf=False)  # fmt: skip
    return out


def _why_extra(d: dict) -> str:
    if d.get("error"):
        return f"not measured ({d['error'][:60]})"
    return d.get("status") or "not measured"


def _part_why(doc, part) -> str:
    p = doc.get("parts", {}).get(part)
    return f"not measured ({p['status']})" if p else "not measured (part not run)"


def _profile_bytes_ratio(doc) -> float | None:
    """bytes / floor from `ssiu profile --train --json`, whatever its key names."""
    prof = (doc.get("parts", {}).get("profile") or {}).get("result") or {}
    train = prof.get("train") or {}
    flat = _flatten(train)
    for k, v in flat.items():
        if isinstance(v, (int, float)) and "floor" in k and ("ratio" in k or "x" == k[-1:]):
            return float(v)
    total_keys = ("modelled_bytes", "bytes_modelled", "bytes.total")
    floor_keys = ("floor_bytes", "bytes_floor", "bytes.floor")
    num = next((v for k, v in flat.items() if k.endswith(total_keys)), None)
    den = next((v for k, v in flat.items() if k.endswith(floor_keys)), None)
    return num / den if isinstance(num, (int, float)) and den else None


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1]] = d
    return out


def verdict_table(rows: list[dict]) -> str:
    """The verdict as a Markdown table (printed last by the GPU check)."""
    lines = ["| target | source | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['source']} | {r['value']} | {r['status']} |" for r in rows]
    met = sum(r["status"] == MET for r in rows)
    missed = sum(r["status"] == NOT_MET for r in rows)
    lines.append(f"\n{met} met, {missed} not met, {len(rows) - met - missed} not measured.")
    return "\n".join(lines)


def markdown(doc: dict, verdict: list[dict], bench_md: str | None) -> str:
    env = (doc.get("parts", {}).get("env") or {}).get("result") or {}
    lines = [
        "# SSIU GPU check",
        "",
        f"- {doc['date']}, commit {doc.get('git_commit')} (tree {doc.get('git_tree', '?')}), "
        f"command `{doc['command']}`"
        + (" (DRY RUN on CPU: no GPU number here)" if doc["dry"] else ""),
        f"- Device: {env.get('device_name', '?')}, driver {env.get('driver')}, CUDA "
        f"{env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, python "
        f"{env.get('python')}, kernel {env.get('kernel')}, GPUs {env.get('gpu_count')}",
    ]
    if env.get("copy_bw"):
        mats = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in env["matrix_flops"].items())
        lines.append(f"- Measured ceilings: copy {env['copy_bw'] / 1e12:.2f} TB/s (read + "
                     f"written); matmul {mats}")  # fmt: skip
    lines += ["", "## Parts", "", "| part | status | seconds | budget s |", "|---|---|---|---|"]
    for name, p in doc.get("parts", {}).items():
        lines.append(
            f"| {name} | {p['status']} | {p.get('seconds', '-')} | {p.get('budget', '-')} |"
        )
    tests = (doc.get("parts", {}).get("tests") or {}).get("result") or {}
    if tests.get("cases"):
        bad = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
        counts = ", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "errors",
                                                              "skipped"))  # fmt: skip
        lines += ["", "## GPU tests", "", counts + "."]
        lines += [f"- FAILED {c['name']}: {c.get('message', '')[:300]}" for c in bad[:30]]
    san = (doc.get("parts", {}).get("sanitizer") or {}).get("result") or {}
    if san:
        lines += ["", "## compute-sanitizer", ""]
        lines += [f"- {tool}: {r.get('status')} ({r.get('errors')} errors) {r.get('summary', '')}"
                  for tool, r in san.items() if isinstance(r, dict)]  # fmt: skip
    e2e = (doc.get("parts", {}).get("e2e") or {}).get("result") or {}
    if e2e.get("launches") or e2e.get("saved"):
        lines += [
            "",
            "## Launches and saved activations",
            "",
            "```",
            f"launches: {e2e.get('launches')}",
            f"saved bytes: {e2e.get('saved')}",
            "```",
        ]
    rows = _rows(doc, "e2e")
    if rows:
        lines += ["", "## End to end, every provider (CUDA-graph path included)", "",
                  "| row | shape | provider | ms | images/s | peak MiB | status |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            num = lambda v, f: "-" if v is None else f.format(v)
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | "
                         f"{num(r.get('median_ms'), '{:.3f}')} | "
                         f"{num(r.get('images_per_s'), '{:.1f}')} | "
                         f"{num(r.get('peak_mem_bytes') and r['peak_mem_bytes'] / 2**20, '{:.0f}')}"
                         f" | {r['status'][:80]} |")  # fmt: skip
    lines += _kernel_sections(doc)
    lines += ["", "## Verdict", "", verdict_table(verdict)]
    if bench_md:
        lines += ["", "## Benchmark", "", bench_md.split("\n", 1)[1]]
    return "\n".join(lines) + "\n"


def _kernel_sections(doc: dict) -> list[str]:
    """The kernels part: each kernel's time per fused step and the bandwidth it reaches."""
    kernels = (doc.get("parts", {}).get("kernels") or {}).get("result") or {}
    lines = []
    for kind, title in (("train", "training step"), ("infer", "inference")):
        if kernels.get(kind):
            lines += ["", f"## Kernel time in one fused {title}", "", kernel_table(kernels[kind])]
    return lines


def kernel_table(table: dict, rows: int = 25) -> str:
    """A kernels-part table (bench.gpu_parts.kernel_table) as Markdown: the part prints it,
    the report shows it."""
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    lines = [f"{table['launches']:.0f} launches, {table['kernel_ms']:.2f} ms of kernel time. "
             "GB/s = the bytes `ssiu profile` models for the kernel / its measured time.", "",
             "| kernel | launches | ms | share | modelled GB | GB/s | % of copy |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in table["rows"][:rows]:
        gbs = "-" if r.get("gb_per_s") is None else f"{r['gb_per_s']:.0f}"
        lines.append(f"| {r['kernel']} | {r['launches']:.1f} | {r['ms']:.3f} | "
                     f"{pct(r['share'])} | {r['modelled_gb']:.2f} | {gbs} | "
                     f"{pct(r['copy_fraction'])} |")  # fmt: skip
    return "\n".join(lines)
