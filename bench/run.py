"""Run every benchmark case and write results.json, results.csv (appended) and report.md.

From the repository root:
    python bench/run.py --quick                 # small shape (the default on CPU)
    python bench/run.py --out bench/results     # training shape, bf16 (the default on CUDA)
    python -m bench.run --ops msgm --modes fwd+bwd --providers eager,fused
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small 'quick' shape of each case")
    p.add_argument("--shape", default=None, help="N,C,H,W for every case (overrides --quick)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--ops", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--providers", default="eager,compile,fused")
    p.add_argument("--modes", default=",".join(harness.MODES))
    p.add_argument("--reps", type=int, default=20, help="timed runs on CPU (CUDA: do_bench)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first on CPU")
    p.add_argument("--copy-bw", type=float, default=None, help="copy bandwidth B/s of the GPU")
    p.add_argument("--out", default=str(harness.REPO_ROOT / "bench" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else harness.default_device()
    cases = harness.get_cases()
    names = args.ops.split(",") if args.ops else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"unknown ops {unknown}; known: {sorted(cases)}", file=sys.stderr)
        return 2
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    preset = "quick" if args.quick else None
    dtype = DTYPES[args.dtype] if args.dtype else None
    rows = []
    for name in names:
        for mode in args.modes.split(","):
            for provider in args.providers.split(","):
                row = harness.measure(
                    cases[name], provider, mode, shape=shape, preset=preset, dtype=dtype,
                    device=device, reps=args.reps, warmup=args.warmup, copy_bw=args.copy_bw,
                )  # fmt: skip
                time = "-" if row["median_ms"] is None else f"{row['median_ms']:.3f} ms"
                print(
                    f"{name:14} {row['shape']:14} {mode:8} {provider:8} {time:>12}  {row['status']}"
                )
                rows.append(row)
    json_path, csv_path = harness.write_results(rows, args.out)
    report = harness.markdown_report(rows)
    report_path = Path(args.out) / "report.md"
    report_path.write_text(report)
    print(
        f"\n{report}\nappended {len(rows)} rows to {json_path} and {csv_path}; wrote {report_path}"
    )
    bad = [r for r in rows if r["status"].startswith(("mismatch", "error"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
