"""`ssiu bench`: check and time every fused op and the whole model, write a report.

Writes OUT/report.json (rows stamped with device, driver, versions, git commit, date),
OUT/report.md (times, speed-ups, roofline, end to end) and OUT/speedup.png,
bandwidth.png, memory.png. report.json and report.md are rewritten after every row
("complete": false until the end), so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the fused ops and the model (report.md, report.json, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, few runs (minutes on a CPU); on a CPU torch.compile "
        "only for the cheapest case",
    )
    p.add_argument("--out", default="bench/results", help="output folder (default %(default)s)")
    p.add_argument(
        "--ops",
        nargs="+",
        default=None,
        metavar="OP",
        help="ops and end-to-end rows to run (default: all); e.g. msgm esam "
        "train_step_x4 inference_x4",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=None,
        metavar="MODE",
        help="fwd bwd fwd+bwd infer (ops), train (training step); default: all",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="P",
        help="eager compile fused fused+compile (default: all)",
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=None,
        choices=("train", "infer", "quick"),
        help="shape presets (default: train infer; --quick: quick)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--reps", type=int, default=None, help="timed runs on CPU (CUDA: do_bench)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def _split(values):
    # accept "a b" and "a,b"
    return None if values is None else [v for item in values for v in item.split(",") if v]


def run(args: argparse.Namespace) -> int:
    import torch

    from ssiu.benchmark import harness, suite

    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    command = "ssiu bench " + " ".join(shlex.quote(a) for a in argv)
    doc = suite.run_suite(
        args.out,
        quick=args.quick,
        ops=_split(args.ops),
        modes=_split(args.modes),
        providers=_split(args.providers) or harness.PROVIDER_NAMES,
        presets=args.presets,
        device=args.device,
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        reps=args.reps,
        e2e_rows=not args.no_e2e,
        plots=not args.no_plots,
        command=command.strip(),
    )
    bad = [r for r in doc["rows"] + doc["e2e"] if r["status"].startswith(("mismatch", "error"))]
    return 1 if bad else 0
