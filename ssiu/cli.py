"""The `ssiu` command line (also `python -m ssiu`): one subcommand per job.

Each job's module registers its own subcommand with `add_cli(subparsers)`; this file
only collects them, so the CLI of a job lives beside its code. Only the module of the
command being run is imported (torch, triton, scikit-image and matplotlib load when a
command needs them): `ssiu --help` lists the commands from `COMMAND_HELP` alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ssiu import threads

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
# module -> (command, one-line help) so that `ssiu --help` imports none of them; a module
# missing here is imported to build the parser.
COMMAND_HELP = {
    "ssiu.demo": (
        "demo",
        "train briefly on embedded photos, compare with bicubic on held-out ones",
    ),
    "ssiu.training": ("train", "train SSIU (released recipe by default)"),
    "ssiu.inference": ("upscale", "super-resolve one image with trained weights"),
    "ssiu.info": ("info", "print config, parameter count and MACs/FLOPs of a model"),
    "ssiu.evaluate": ("eval", "PSNR/SSIM on benchmark sets (Set5, Set14, B100, Urban100...)"),
    "ssiu.export": ("export", "export to ONNX (dynamic batch/height/width), checked"),
    "ssiu.bench_cli": ("bench", "benchmark the fused ops and the model (report.md, plots)"),
    "ssiu.check_kernels": ("check-kernels", "compile every Triton kernel for sm_90/sm_80, no GPU"),
    "ssiu.profile": ("profile", "static profile of a fused step: launches, glue, modelled bytes"),
}
# Commands that compute on the CPU: they take --threads and get the probed thread count.
# `demo` has its own --threads (default 1, so that its numbers repeat on any load).
THREADED_COMMANDS = ("train", "upscale", "eval", "export", "bench")


def _version() -> str:
    from ssiu import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (every module when None is given
    and a module has no COMMAND_HELP entry)."""
    parser = argparse.ArgumentParser(
        prog="ssiu",
        description="SSIU super-resolution: train, upscale, inspect, check the kernels.",
    )
    parser.add_argument("--version", action="version", version=f"ssiu {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        name, help_text = COMMAND_HELP.get(module, (None, None))
        if name is not None and name != command:
            subparsers.add_parser(name, help=help_text, add_help=False)
            continue
        importlib.import_module(module).add_cli(subparsers)
    for name in THREADED_COMMANDS:
        if name == command:
            _add_threads_option(subparsers.choices[name])
    return parser


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        default="auto",
        metavar="N",
        help="CPU intra-op threads (default auto: a short probe keeps 1 thread when the CPU "
        "is busy; env SSIU_THREADS)",
    )


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (its first word that is not an option)."""
    names = {name for name, _ in COMMAND_HELP.values()}
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def main(argv: list[str] | None = None) -> int:
    threads.prefer_passive_waiting()  # before torch loads: idle OpenMP threads sleep
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _threads_for(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError) as e:
        # One clear line, no traceback (SSIU_DEBUG=1 shows it). Input errors are
        # ValueError/FileNotFoundError, a missing optional package an ImportError (its
        # message says what to install); anything else may be ours, so name its type.
        if _debug():
            raise
        if isinstance(e, (ValueError, FileNotFoundError, ImportError)):
            print(f"ssiu {args.command}: error: {e}", file=sys.stderr)
        else:
            print(
                f"ssiu {args.command}: error: {type(e).__name__}: {e} "
                "(SSIU_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
        return 1


def _threads_for(args: argparse.Namespace):
    """The thread count of a computing command, printed as one line on stderr."""
    if args.command not in THREADED_COMMANDS:
        return threads.limited_threads(None)
    import torch

    # With a GPU the CPU only feeds it: keep the default pool, no probe.
    on_gpu = torch.cuda.is_available() and str(getattr(args, "device", None)) != "cpu"
    choice = threads.choose_threads(args.threads, probe=not on_gpu)
    print(f"ssiu {args.command}: {choice.line()}", file=sys.stderr)
    return threads.limited_threads(choice.threads)


def _debug() -> bool:
    return os.environ.get("SSIU_DEBUG", "0") not in ("", "0")
