"""Run every benchmark and write report.json, report.md and the plots: `ssiu bench` as a
script, for a repository checkout.

    python bench/run.py --quick                       # tiny shapes (minutes on a CPU)
    python bench/run.py --out bench/results           # training + inference shapes
    python bench/run.py --ops msgm --modes fwd+bwd --providers eager fused
"""

from __future__ import annotations

import sys

from ssiu.cli import main as ssiu_main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return ssiu_main(["bench", *argv]) if _has_bench() else _direct(argv)


def _has_bench() -> bool:
    from ssiu.cli import COMMAND_MODULES

    return "ssiu.bench_cli" in COMMAND_MODULES


def _direct(argv) -> int:
    # Before `ssiu.bench_cli` is listed in ssiu.cli.COMMAND_MODULES: parse it here.
    import argparse

    from ssiu import bench_cli

    parser = argparse.ArgumentParser(prog="bench/run.py")
    bench_cli.add_cli(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
