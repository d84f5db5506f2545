"""The `ssiu` command line (also `python -m ssiu`): one subcommand per job.

Each job's module registers its own subcommand with `add_cli(subparsers)`; this file
only collects them, so the CLI of a job lives beside its code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import ssiu

# Modules that provide `add_cli(subparsers)`, in the order `ssiu --help` lists them.
COMMAND_MODULES = (
    "ssiu.demo",
    "ssiu.training",
    "ssiu.inference",
    "ssiu.info",
    "ssiu.evaluate",
    "ssiu.export",
    "ssiu.bench_cli",
    "ssiu.check_kernels",
    "ssiu.profile",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssiu",
        description="SSIU super-resolution: train, upscale, inspect, check the kernels.",
    )
    parser.add_argument("--version", action="version", version=f"ssiu {ssiu.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        # One clear line, no traceback (SSIU_DEBUG=1 shows it). Input errors are
        # ValueError/FileNotFoundError; anything else may be ours, so name its type.
        if _debug():
            raise
        if isinstance(e, (ValueError, FileNotFoundError)):
            print(f"ssiu {args.command}: error: {e}", file=sys.stderr)
        else:
            print(
                f"ssiu {args.command}: error: {type(e).__name__}: {e} "
                "(SSIU_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
        return 1


def _debug() -> bool:
    import os

    return os.environ.get("SSIU_DEBUG", "0") not in ("", "0")
