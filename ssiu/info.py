"""`ssiu info`: configuration, parameter count and MACs of a model (built or loaded)."""

from __future__ import annotations

import argparse
import re

from ssiu.config import SCALES, SSIUConfig
from ssiu.flops import PAPER_GMACS, PAPER_LR_SIZES, PAPER_PARAMS, count_flops


def parse_size(text: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' (e.g. '180x320' for a 320 pixels wide image) -> (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(
            f"size must be HEIGHTxWIDTH with positive ints, e.g. 180x320; got {text!r}"
        )
    return int(m.group(1)), int(m.group(2))


def _giga(n: int) -> str:
    return f"{n / 1e9:.2f} G"


def describe(model_or_config, height: int | None = None, width: int | None = None) -> str:
    """A multi-line report: config, parameters, output size, MACs at an LR size.

    height, width: the LR input (default: the paper's, 1280x720 output for the scale).
    """
    import torch

    from ssiu.model import SSIU, count_parameters

    if isinstance(model_or_config, SSIUConfig):
        config = model_or_config
        # Built on the CPU (0.2 s): a "meta" device context would import torch._dynamo
        # and triton, several seconds before `ssiu info` prints anything.
        with torch.random.fork_rng():  # leaves the caller's random stream alone
            model = SSIU(config)
    else:
        model, config = model_or_config, model_or_config.config
    s = config.scale
    if height is None or width is None:
        height, width = PAPER_LR_SIZES[s]
    padded = count_flops(config, height, width, padded=True)
    real = count_flops(config, height, width, padded=False)
    params = count_parameters(model)
    released = config == SSIUConfig(scale=s)
    lines = [
        f"SSIU x{s}" + (" (released architecture)" if released else ""),
        "config: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()),
        f"parameters: {params:,}" + (f" (paper: {PAPER_PARAMS[s]})" if released else ""),
        f"input (LR): {height}x{width} (height x width); "
        + (
            "a multiple of 16, no padding"
            if padded.grid == (height, width)
            else f"computed on {padded.grid[0]}x{padded.grid[1]} (reflect-padded to a "
            "multiple of 16)"
        ),
        f"output: {height * s}x{width * s}",
        f"MACs: {_giga(padded.macs)} as computed (padded grid), {_giga(real.macs)} per real "
        f"pixel; FLOPs = 2 x MACs = {_giga(padded.flops)}",
        "MACs by part: " + ", ".join(f"{k} {_giga(v)}" for k, v in padded.parts.items()),
    ]
    if released and (height, width) == PAPER_LR_SIZES[s]:
        lines.append(
            f'paper: {PAPER_GMACS[s]}G "FLOPs" at 1280x720 output (they are MACs; see '
            "ssiu/flops.py for which count matches)"
        )
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print config, parameter count and MACs/FLOPs of a model",
        description="Config, parameters, output size and MACs of SSIU at an LR input size.",
    )
    p.add_argument(
        "--weights",
        metavar="W",
        default=None,
        help="describe these weights (ours or the authors'); default: a fresh model",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=SCALES,
        default=None,
        help="scale of a fresh model (default 4; must match --weights if both)",
    )
    p.add_argument(
        "--size",
        metavar="HxW",
        default=None,
        help="LR input size, height x width (default: the paper's, 720x1280 "
        "output: 360x640 for x2, 240x427 for x3, 180x320 for x4)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    height = width = None
    if args.size is not None:
        height, width = parse_size(args.size)
        from ssiu.model import min_input_size

        if min(height, width) < min_input_size():
            m = min_input_size()
            raise ValueError(
                f"--size {height}x{width}: SSIU needs at least {m}x{m} (it reflect-pads the "
                "input to a multiple of 16; `ssiu upscale` edge-pads smaller images first)"
            )
    if args.weights is not None:
        import ssiu
        from ssiu import cli_checks

        cli_checks.weights_file(args.weights)
        model = ssiu.load(args.weights, map_location="cpu", backend="torch")
        if args.scale is not None and args.scale != model.scale:
            raise ValueError(f"--scale {args.scale} but {args.weights} is an x{model.scale} model")
        print(f"weights: {args.weights}")
        print(describe(model, height, width))
    else:
        print(describe(SSIUConfig(scale=args.scale or 4), height, width))
    return 0


__all__ = ["add_cli", "describe", "parse_size", "run"]
