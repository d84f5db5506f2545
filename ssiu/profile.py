"""`ssiu profile`: a static profile of one fused SSIU step, without a GPU.

One step runs on fake tensors with the Triton launches recorded instead of executed
(`ssiu.launch_capture`), so it takes seconds and allocates nothing, at the real workload:

- training (default): x4, batch 40 of 64x64 LR patches, bf16 autocast (fp32 weights),
  forward + backward of an L1 loss, optimizer excluded;
- inference (`--infer`): one 180x320 image to 720x1280, bf16 autocast, forward only.

It reports:
- Triton launches per kernel;
- PyTorch ops that write memory (views and allocations excluded), outside the custom ops
  (the model's own glue) and inside them (the launchers' glue: casts, partial-sum
  reductions, the PyTorch parts of a backward);
- modelled device-memory bytes: each launch reads its input pointers' tensors once and
  writes its fresh output buffers once; each PyTorch op reads its inputs and writes its
  outputs once;
- the floor those bytes are measured against: the model input and the parameters read
  once, the output (and, training, the parameter gradients) written once, and
  (training) each saved activation written once in the forward and read once in the
  backward; the fused step's own saved set is used, so the floor does not reward saving
  more;
- the op boundaries: each ssiu:: custom op reading its tensor inputs and writing its
  outputs once (the least its kernels could move at the ops' granularity), plus the
  PyTorch ops outside; the kernels' bytes against the custom ops' share of it say how far
  the kernels are from their own ops' interfaces, the boundaries against the floor how
  far the op granularity is from the whole step's;
- the tensors saved for backward (saved-tensor hooks, parameters and input excluded) by
  the fused step and by the reference eager step;
- per kernel, the SASS figures of `ssiu check-kernels` for sm_90 (registers, spills,
  resident warps, HMMA/HGMMA, global-access widths), with `--sass` (compiles through
  check-kernels' cache) or `--kernels-json FILE` (a `check-kernels --json` table).

What it cannot predict: time. Caches (L2 reuse of a tile's halo, of the weights), the
real access pattern (a kernel that reads a tensor twice, or gathers neighbours, counts
once), launch latency, occupancy effects and tensor-core throughput are not modelled;
bytes of reductions inside a kernel and of scratch re-reads count once. It is a model of
traffic and launches, to be confirmed on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

GB = 1e9


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 64x64, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def profile(
    *,
    train: bool = True,
    batch: int | None = None,
    size: tuple[int, int] | None = None,
    dtype=None,
    scale: int = 4,
    reference: bool = True,
    **config,
) -> dict:
    """The static profile of one fused step (see the module doc) as a dict.

    dtype: torch.bfloat16 (default) or torch.float16 (autocast), or torch.float32.
    """
    import torch

    from ssiu import launch_capture as lc

    dtype = dtype or torch.bfloat16
    batch = batch or (40 if train else 1)
    size = size or ((64, 64) if train else (180, 320))
    step = dict(train=train, batch=batch, size=size, dtype=dtype, scale=scale, **config)
    start = time.perf_counter()
    fused = lc.fake_step(**step)
    kernels: dict[str, dict] = {}
    for launch in fused.launches:
        k = kernels.setdefault(launch.name, {"launches": 0, "read": 0, "written": 0})
        k["launches"] += 1
        k["read"] += launch.reads
        k["written"] += launch.writes
    outside = [o for o in fused.ops if o.inside is None]
    inside = [o for o in fused.ops if o.inside is not None]
    saved = sum(b for _, _, b in fused.saved)
    floor = fused.inputs_bytes + fused.outputs_bytes + (2 * saved if train else 0)
    result = {
        "workload": {
            "mode": "train" if train else "infer",
            "batch": batch,
            "size": list(size),
            "scale": scale,
            "dtype": str(dtype).removeprefix("torch."),
            **{k: v for k, v in config.items()},
        },
        "kernels": kernels,
        "triton_launches": len(fused.launches),
        "torch_ops_outside": _ops(outside),
        "torch_ops_inside": _ops(inside),
        "bytes": {
            "triton": sum(k["read"] + k["written"] for k in kernels.values()),
            "torch_outside": sum(o.reads + o.writes for o in outside),
            "torch_inside": sum(o.reads + o.writes for o in inside),
            "floor": floor,
            "op_boundaries": fused.op_boundary_bytes + sum(o.reads + o.writes for o in outside),
        },
        "saved_for_backward": {"fused": {"tensors": len(fused.saved), "bytes": saved}},
    }
    result["bytes"]["total"] = sum(result["bytes"][k] for k in ("triton", "torch_outside",
                                                                  "torch_inside"))  # fmt: skip
    result["launches_total"] = len(fused.launches) + len(fused.ops)
    if train and reference:
        eager = lc.fake_step(**{**step, "backend": "torch"})
        result["saved_for_backward"]["reference"] = {
            "tensors": len(eager.saved),
            "bytes": sum(b for _, _, b in eager.saved),
        }
    result["capture_s"] = round(time.perf_counter() - start, 1)
    return result


def _ops(records) -> dict:
    counts = collections.Counter(r.name for r in records)
    traffic = collections.Counter()
    for r in records:
        traffic[r.name] += r.reads + r.writes
    return {
        "count": len(records),
        "by_op": dict(counts.most_common()),
        "bytes_by_op": dict(traffic.most_common()),
    }


def sass_figures(workload: dict, kernels_json: str | None, compile_: bool) -> dict:
    """{kernel: worst figures over its sm_90 rows} from a check-kernels table or a compile."""
    from ssiu import check_kernels as ck

    if kernels_json:
        with open(kernels_json) as f:
            rows = [ck.CheckRow(**_row_fields(r)) for r in json.load(f)]
    elif compile_:
        name = _workload_name(workload)
        rows = ck.check_kernels((90,), workloads=[name], registry="none") if name else []
    else:
        return {}
    name = _workload_name(workload)
    if name and any(name in r.source.split(",") for r in rows):
        rows = [r for r in rows if name in r.source.split(",")]  # this workload's configs
    figures = {}
    for r in rows:
        if r.arch != 90 or r.registers is None:
            continue
        f = figures.setdefault(r.kernel, {"registers": 0, "spills": 0, "warps_per_sm": 99,
                                          "hmma": 0, "hgmma": 0, "narrow": 0, "wide": 0,
                                          "accesses": 0})  # fmt: skip
        f["registers"] = max(f["registers"], r.registers)
        f["spills"] = max(f["spills"], r.spills or 0)
        f["warps_per_sm"] = min(f["warps_per_sm"], r.warps_per_sm or 0)
        f["hmma"] = max(f["hmma"], r.hmma or 0)
        f["hgmma"] = max(f["hgmma"], r.hgmma or 0)
        mix = ck.access_mix([r])
        f["accesses"] += mix["instructions"]
        f["narrow"] += round(mix["narrow_share"] * mix["instructions"])
        f["wide"] += round(mix["wide_share"] * mix["instructions"])
    return figures


def _row_fields(data: dict) -> dict:
    import dataclasses

    from ssiu.check_kernels import CheckRow

    names = {f.name for f in dataclasses.fields(CheckRow)}
    return {k: v for k, v in data.items() if k in names}


def _workload_name(workload: dict) -> str | None:
    """The check-kernels workload this profile's step is, if it is a canonical one."""
    from ssiu.launch_capture import WORKLOADS

    for name, w in WORKLOADS.items():
        same = (
            w["train"] == (workload["mode"] == "train")
            and w["batch"] == workload["batch"]
            and list(w["size"]) == workload["size"]
            and str(w["dtype"]).removeprefix("torch.") == workload["dtype"]
        )
        if same and workload["scale"] == 4:
            return name
    return None


def format_report(result: dict, figures: dict) -> str:
    w = result["workload"]
    b = result["bytes"]
    lines = [
        f"ssiu profile: {w['mode']} x{w['scale']}, batch {w['batch']}, "
        f"{w['size'][0]}x{w['size'][1]} LR, {w['dtype']} (static model, no GPU; "
        f"captured in {result['capture_s']} s)",
        "",
    ]
    headers = ("kernel", "launches", "read GB", "written GB", "regs", "spills",
               "warps/SM", "HMMA/HGMMA", "<=2B acc.", ">=8B acc.")  # fmt: skip
    body = []
    for name, k in sorted(result["kernels"].items(), key=lambda kv: -kv[1]["read"]):
        f = figures.get(name)
        sass = ("-",) * 6
        if f:
            share = lambda n, f=f: f"{n / f['accesses']:.0%}" if f["accesses"] else "-"
            sass = (str(f["registers"]), str(f["spills"]), str(f["warps_per_sm"]),
                    f"{f['hmma']}/{f['hgmma']}", share(f["narrow"]), share(f["wide"]))  # fmt: skip
        body.append((name, str(k["launches"]), f"{k['read'] / GB:.2f}",
                     f"{k['written'] / GB:.2f}", *sass))  # fmt: skip
    from ssiu.check_kernels import _columns

    lines.append(_columns(headers, body))
    out, ins = result["torch_ops_outside"], result["torch_ops_inside"]
    top = lambda ops: ", ".join(
        f"{n} x{ops['by_op'][n]} {b / GB:.2f} GB" for n, b in list(ops["bytes_by_op"].items())[:4]
    )
    lines += [
        "",
        f"launches: {result['triton_launches']} Triton + {out['count']} PyTorch ops outside "
        f"the custom ops + {inside_count(result)} inside = {result['launches_total']}",
        f"  most traffic outside: {top(out) or '-'}",
        f"  most traffic inside:  {top(ins) or '-'}",
        f"modelled device memory: {b['total'] / GB:.2f} GB = Triton {b['triton'] / GB:.2f} + "
        f"PyTorch outside {b['torch_outside'] / GB:.2f} + inside {b['torch_inside'] / GB:.2f}; "
        f"floor {b['floor'] / GB:.2f} GB ({b['total'] / max(b['floor'], 1):.2f}x the floor)",
        f"  op boundaries: {b['op_boundaries'] / GB:.2f} GB (each custom op's inputs read and "
        f"outputs written once, plus the PyTorch ops outside); the kernels move "
        f"{b['triton'] / max(b['op_boundaries'] - b['torch_outside'], 1):.2f}x their ops' share",
    ]
    saved = result["saved_for_backward"]
    if "reference" in saved:
        f, r = saved["fused"], saved["reference"]
        lines.append(
            f"saved for backward: fused {f['tensors']} tensors, {f['bytes'] / 2**20:,.0f} MiB; "
            f"reference eager {r['tensors']} tensors, {r['bytes'] / 2**20:,.0f} MiB "
            f"({f['bytes'] / max(r['bytes'], 1):.0%})"
        )
    if not figures:
        lines.append("SASS figures: not computed (--sass, or --kernels-json FILE)")
    return "\n".join(lines)


def inside_count(result: dict) -> int:
    return result["torch_ops_inside"]["count"]


def run(args: argparse.Namespace) -> int:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    result = profile(
        train=not args.infer, batch=args.batch, size=args.size, dtype=dtype, scale=args.scale
    )
    figures = sass_figures(result["workload"], args.kernels_json, args.sass)
    result["sass_sm90"] = figures
    print(format_report(result, figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="static profile of one fused step: launches, PyTorch glue, modelled bytes",
        description=__doc__.split("\n\n")[0] + " See README, 'Performance model'.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="a training step (default)")
    mode.add_argument("--infer", action="store_true", help="an inference forward")
    p.add_argument("--batch", type=int, default=None, help="default 40 (train), 1 (infer)")
    p.add_argument(
        "--size",
        type=_parse_size,
        default=None,
        metavar="HxW",
        help="LR size, default 64x64 (train), 180x320 (infer)",
    )
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument(
        "--sass", action="store_true", help="add check-kernels' sm_90 figures (compiles, cached)"
    )
    p.add_argument("--kernels-json", default=None, metavar="FILE", help="or read them from here")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the profile as JSON")
    p.set_defaults(func=run)
