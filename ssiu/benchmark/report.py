"""The Markdown report and the PNG plots of one benchmark run (`suite.run_suite`'s doc)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ssiu.benchmark.harness import PROVIDER_NAMES

MiB = 2**20


def _ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        status = row["status"]
        return status if status.startswith(("not measured", "skipped")) else status.split(":")[0]
    return f"{row['median_ms']:.3f}"


def speedup(base: dict | None, other: dict | None) -> float | None:
    ok = lambda r: r is not None and r["status"] == "ok"
    return base["median_ms"] / other["median_ms"] if ok(base) and ok(other) else None


def _outside_bound(row: dict) -> bool:
    err, tol = row.get("max_rel_err"), row.get("tolerance")
    return err is not None and tol is not None and err > tol


def _x(value: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if value is None else fmt.format(value)


def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:.2f}"


def _groups(rows: Sequence[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["op"], r.get("preset"), r["shape"], r["dtype"], r["mode"])
        groups.setdefault(key, {})[r["provider"]] = r
    return groups


def _fmt_rate(value, unit) -> str:
    return "n/a" if not value else f"{value / 1e9:.1f} G{unit}"


def markdown_report(doc: dict) -> str:
    """Header (device, versions), ops table, roofline table, end-to-end table, notes."""
    st, rates = doc["stamp"], doc.get("rates") or {}
    rows, e2e = doc.get("rows", []), doc.get("e2e", [])
    providers = [p for p in PROVIDER_NAMES if any(r["provider"] == p for r in rows + e2e)]
    lines = [
        "# SSIU benchmark report",
        "",
        f"- Device: {st['device_name']} ({st['device']}); driver {st.get('driver') or 'n/a'}, "
        f"CUDA {st.get('cuda') or 'n/a'}",
        f"- torch {st['torch']}, triton {st['triton']}, python {st['python']}",
        f"- commit {st['git_commit']}; {st['date']}; command `{doc.get('command', '')}`",
        f"- Roofline rates ({rates.get('dtype')}): copy bandwidth "
        f"{_fmt_rate(rates.get('copy_bw'), 'B/s')} ({rates.get('copy_bw_source', 'n/a')}), "
        f"matrix rate {_fmt_rate(rates.get('matrix_flops'), 'FLOP/s')} "
        f"({rates.get('matrix_source', 'n/a')})",
        "",
        "Times are medians in ms (CUDA: `triton.testing.do_bench`; CPU: wall clock). "
        "Speed-up = eager time / provider time. A provider is timed only after its output "
        "(and gradients) matched a float64 run of the reference.",
        "",
        "## Ops",
        "",
        "| op | preset | shape | dtype | mode | "
        + " | ".join(f"{p} ms" for p in providers)
        + " | "
        + " | ".join(f"{p} speed-up" for p in providers if p != "eager")
        + " | fused GB/s (% copy) | saved MiB "
        + " / ".join(providers)
        + " | peak MiB "
        + " / ".join(providers)
        + " |",
        "|" + "---|" * (5 + 2 * len(providers) - 1 + 3),
    ]
    for (op, preset, shape, dtype, mode), by in _groups(rows).items():
        fused = by.get("fused")
        bw = "-"
        if fused and fused["status"] == "ok":
            frac = fused.get("copy_bw_fraction")
            bw = f"{fused['gbps']:.1f}" + (f" ({100 * frac:.0f}%)" if frac else "")
        elif fused:
            bw = _ms(fused)
        cells = [_ms(by.get(p)) for p in providers]
        cells += [_x(speedup(by.get("eager"), by.get(p))) for p in providers if p != "eager"]
        cells += [
            bw,
            " / ".join(_mib((by.get(p) or {}).get("saved_bytes")) for p in providers),
            " / ".join(_mib((by.get(p) or {}).get("peak_mem_bytes")) for p in providers),
        ]
        lines.append(
            f"| {op} | {preset} | {shape} | {dtype} | {mode} | " + " | ".join(cells) + " |"
        )

    lines += [
        "",
        "## Roofline",
        "",
        "Minimal traffic: each input read once, each output written once (backward: the "
        "output gradient and the inputs read, one gradient per input written). FLOPs: 2 x "
        "multiply-adds of the convolutions and matmuls (`ssiu.flops`' counting; a backward "
        "is 2 x the forward). Floor = max(bytes / copy bandwidth, FLOPs / matrix rate); "
        "ratio = measured / floor (1.0 = at the floor; below 1 on a CPU means the data "
        "stayed in its caches, which the DRAM copy bandwidth does not model).",
        "",
        "| op | shape | mode | MiB moved | GFLOP | bytes ms | FLOPs ms | floor ms | "
        + " | ".join(f"{p} / floor" for p in providers)
        + " |",
        "|" + "---|" * (8 + len(providers)),
    ]
    for (op, _, shape, _, mode), by in _groups(rows + e2e).items():
        any_row = next(iter(by.values()))
        ref = next((r for r in by.values() if r.get("floor_ms") is not None), None)
        floor = _roofline_of(any_row, rates) if ref is None else ref
        ratios = []
        for p in providers:
            r = by.get(p)
            if r is None:
                ratios.append("-")
            elif r["status"] == "ok" and r.get("floor_ratio") is not None:
                ratios.append(f"{r['floor_ratio']:.2f}")
            else:
                ratios.append(_ms(r))
        ms = lambda v: "n/a" if v is None else f"{v:.4f}"
        lines.append(
            f"| {op} | {shape} | {mode} | {_mib(any_row.get('bytes_moved'))} | "
            f"{(any_row.get('flops') or 0) / 1e9:.3f} | {ms(floor.get('t_bytes_ms'))} | "
            f"{ms(floor.get('t_flops_ms'))} | {ms(floor.get('floor_ms'))} | "
            + " | ".join(ratios)
            + " |"
        )

    if e2e:
        lines += [
            "",
            "## End to end (x4)",
            "",
            "train_step_x4: Adam step on an L1 loss (bf16 autocast on CUDA); "
            "inference_x4: one image, inference mode. Peak memory: CUDA only.",
            "",
            "| row | shape | dtype | provider | ms | images/s | speed-up | peak MiB | status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        groups = _groups(e2e)
        for (op, _, shape, dtype, _), by in groups.items():
            for p in providers:
                r = by.get(p)
                if r is None:
                    continue
                ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.2f}"
                lines.append(
                    f"| {op} | {shape} | {dtype} | {p} | {_ms(r)} | {ips} | "
                    f"{_x(speedup(by.get('eager'), r))} | {_mib(r.get('peak_mem_bytes'))} "
                    f"| {r['status']} |"
                )
    problems = [r for r in rows + e2e if r["status"].startswith(("mismatch", "error"))]
    if problems:
        lines += ["", "## Not timed", ""]
        lines += [
            f"- {r['op']} {r['shape']} {r['provider']} {r['mode']}: {r['status']}" for r in problems
        ]
    outside = [r for r in e2e if r["status"] == "ok" and _outside_bound(r)]
    if outside:
        lines += ["", "## Timed outside the bound (baselines)", ""]
        lines += [
            f"- {r['op']} {r['shape']} {r['provider']}: max rel err {r['max_rel_err']:.3g} > "
            f"tol {r['tolerance']:.3g}"
            for r in outside
        ]
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    if doc.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in doc["plots"]]
    return "\n".join(lines) + "\n"


def _roofline_of(row: dict, rates: dict) -> dict:
    from ssiu.benchmark.harness import roofline

    return roofline(row.get("bytes_moved") or 0, row.get("flops") or 0, None, rates)


# ---------------------------------------------------------------------------------------
# Plots.


def _label(key) -> str:
    op, preset, shape, _, mode = key
    return f"{op} {mode} {shape}"


def _barh(ax, labels, series: dict[str, list], *, xlabel, note_missing, line=None, base=0.0):
    """Horizontal grouped bars: one group per label, one bar per series.

    A None value draws no bar; the group gets one grey note listing the missing series
    by reason (note_missing: a text, or {series: [reason per label]}, the rows' status).
    base: where bars start (1.0 for speed-ups: a bar left of it is a slow-down); a wide
    range of positive values switches the axis to log scale.
    """
    import numpy as np

    n, k = len(labels), max(len(series), 1)
    if n == 0:
        ax.axis("off")
        ax.text(0.5, 0.5, "no rows", ha="center", va="center")
        return
    height = 0.8 / k
    y = np.arange(n)
    present = [v for values in series.values() for v in values if v is not None and v > 0]
    log = bool(present) and max(present) / min(present) > 20
    missing: list[dict[str, list[str]]] = [{} for _ in range(n)]
    right = [base] * n
    for i, (name, values) in enumerate(series.items()):
        pos = y - 0.4 + height * (i + 0.5)
        lefts = [min(base, v) if v is not None else base for v in values]
        widths = [abs(v - base) if v is not None else 0 for v in values]
        reasons = [
            (note_missing if isinstance(note_missing, str) else note_missing[name][j])
            for j, v in enumerate(values)
            if v is None
        ]
        # A series missing everywhere for one reason says so in the legend, not per bar.
        everywhere = len(reasons) == n and len(set(reasons)) == 1
        ax.barh(
            pos,
            widths,
            left=lefts,
            height=height,
            label=f"{name}: {reasons[0]}" if everywhere and n else name,
        )
        for j, v in enumerate(values):
            if v is not None:
                right[j] = max(right[j], v)
            elif not everywhere:
                why = note_missing if isinstance(note_missing, str) else note_missing[name][j]
                missing[j].setdefault(why, []).append(name)
    for j, reasons in enumerate(missing):
        if reasons:
            text = "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items())
            ax.text(right[j], y[j], "  " + text, va="center", fontsize=6.5, color="0.35")
    if log:
        ax.set_xscale("log")
    if line is not None:
        ax.axvline(line, color="k", lw=0.8, ls="--")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(xlabel + (" (log scale)" if log else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.25)


def _why(groups: dict, providers) -> dict[str, list[str]]:
    """Per provider and group: why a bar is missing (the row's status, shortened)."""

    def one(r):
        if r is None:
            return "not run"
        return _ms(r) if r["status"] != "ok" else "n/a"

    return {p: [one(by.get(p)) for by in groups.values()] for p in providers}


def write_plots(doc: dict, out_dir: Path) -> list[Path]:
    """speedup.png, bandwidth.png and memory.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, e2e = doc.get("rows", []), doc.get("e2e", [])
    st = doc["stamp"]
    title_dev = f"{st['device_name']}, torch {st['torch']}, {st['date'][:10]}"
    providers = [p for p in PROVIDER_NAMES if any(r["provider"] == p for r in rows + e2e)]
    groups = _groups(rows + e2e)
    labels = [_label(k) for k in groups]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig_h = lambda n: max(3.0, 0.32 * n + 1.5)

    why = _why(groups, providers)
    # 1. Speed-up over eager.
    others = [p for p in providers if p != "eager"]
    series = {p: [speedup(by.get("eager"), by.get(p)) for by in groups.values()] for p in others}
    fig, ax = plt.subplots(figsize=(11, fig_h(len(labels))))
    _barh(
        ax,
        labels,
        series,
        xlabel="speed-up over eager (eager ms / provider ms)",
        note_missing=why,
        line=1.0,
        base=1.0,
    )
    ax.set_title(f"Speed-up over the eager reference\n{title_dev}", fontsize=9)
    paths.append(_save(fig, out_dir / "speedup.png", plt))

    # 2. Fraction of copy bandwidth per kernel (op rows only).
    op_groups = _groups(rows)
    why = _why(op_groups, providers)
    rates = doc.get("rates") or {}
    series = {
        p: [(by.get(p) or {}).get("copy_bw_fraction") for by in op_groups.values()]
        for p in providers
    }
    fig, ax = plt.subplots(figsize=(11, fig_h(len(op_groups))))
    _barh(
        ax,
        [_label(k) for k in op_groups],
        series,
        note_missing=why,
        xlabel="fraction of copy bandwidth (minimal bytes / time / copy bandwidth)",
        line=1.0,
    )
    ax.set_title(
        f"Bytes moved per second as a fraction of {_fmt_rate(rates.get('copy_bw'), 'B/s')} "
        f"({rates.get('copy_bw_source', 'n/a')})\n{title_dev}",
        fontsize=9,
    )
    paths.append(_save(fig, out_dir / "bandwidth.png", plt))

    # 3. Memory: saved activations per op (training forward), peak per op and end to end.
    fwd = {k: by for k, by in op_groups.items() if k[4] == "fwd"}
    peak_groups = {
        k: by
        for k, by in groups.items()
        if any((r.get("peak_mem_bytes") is not None) for r in by.values())
    }
    why = _why(fwd, providers)
    panels = 2 if peak_groups else 1
    rows_shown = max(len(fwd), len(peak_groups), 4)
    fig, axes = plt.subplots(panels, 1, figsize=(11, panels * fig_h(rows_shown)), squeeze=False)
    axes = axes[:, 0]
    series = {
        p: [
            None if (by.get(p) or {}).get("saved_bytes") is None else by[p]["saved_bytes"] / MiB
            for by in fwd.values()
        ]
        for p in providers
    }
    _barh(
        axes[0], [_label(k) for k in fwd], series, xlabel="MiB saved for backward", note_missing=why
    )
    no_peak = "" if peak_groups else f"; peak memory: CUDA only, not measured on {st['device']}"
    axes[0].set_title(
        f"Memory per provider, {title_dev}\nActivations autograd saves (training forward){no_peak}",
        fontsize=9,
    )
    if peak_groups:
        series = {
            p: [
                None
                if (by.get(p) or {}).get("peak_mem_bytes") is None
                else by[p]["peak_mem_bytes"] / MiB
                for by in peak_groups.values()
            ]
            for p in providers
        }
        why = _why(peak_groups, providers)
        _barh(
            axes[1], [_label(k) for k in peak_groups], series, xlabel="peak MiB", note_missing=why
        )
        axes[1].set_title("Peak memory (CUDA allocator): ops, training step, inference", fontsize=9)
    paths.append(_save(fig, out_dir / "memory.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
