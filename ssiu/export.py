"""ONNX export of SSIU, with dynamic batch, height and width, checked with onnxruntime.

    model = ssiu.load("SSIU_x4.pth")
    export_onnx(model, "ssiu_x4.onnx")                 # opset 17, TorchScript exporter
    errors = verify_onnx("ssiu_x4.onnx", model)        # {"48x40": 2e-7, "33x57": ...}

The graph computes exactly the reference model (`backend="torch"`): input "lr"
(N, 3, H, W) float32 RGB in [0, 1], output "sr" (N, 3, sH, sW), N, H and W free
(H, W >= 9, as `ssiu.model.min_input_size()`; the graph does not check it). The
released network's shape-dependent steps stay in the graph as shape arithmetic: the
reflect pad of the input to a multiple of 16 and the final crop are computed from the
input's runtime shape, so one .onnx file serves every size (verified on two sizes).
Top-k options export too: `attn_topk` and `moe_topk` become ONNX TopK + compare.

Exporters. `exporter="torchscript"` (default) is `torch.onnx.export(dynamo=False)`: it
traces the model once and records the pad/crop sizes as shape arithmetic; it needs no
extra package and exports the released x4 model in about 20 s. `exporter="dynamo"` is
the torch.export-based exporter (`dynamo=True`, needs `onnxscript`, opset >= 18, default
18; `pip install -e '.[onnx]'` installs onnx, onnxruntime and onnxscript): it
works too (tests/test_export.py with SSIU_TEST_SLOW_EXPORT=1) but takes one to three
minutes on a 2-core CPU even for a tiny model, and explicit `torch.export.Dim` ranges
on H and W fail on the modulo-16 padding arithmetic (it needs `Dim.AUTO`). PyTorch
marks the TorchScript exporter deprecated; if a future PyTorch drops it, use "dynamo".

Measured max abs difference ONNX Runtime 1.32 (CPU) vs PyTorch 2.13 (CPU), float32,
RGB in [0, 1], photo crops (astronaut, chelsea, coffee) of 48x40, 33x57 and 64x64,
batch 2, released x4 architecture with random weights: 1.8e-7 to 2.4e-7 dense; up to
1.6e-6 with attn_topk=16, moe_topk=1 (dynamo exporter, tiny model: same order). Tiny models
(tests/test_export.py): ~2e-7. `verify_onnx` fails above `VERIFY_TOLERANCE` (1e-4).
With top-k, a score within rounding of the k-th largest may be kept by one runtime and
dropped by the other; that is the one source of larger (still small) differences.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ssiu.model import SSIU, min_input_size

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17  # wide runtime support (ONNX Runtime, TensorRT 8.6+, OpenVINO)
# Each exporter's default: the dynamo exporter starts at opset 18.
DEFAULT_OPSETS = {"torchscript": DEFAULT_OPSET, "dynamo": 18}
ONNX_HINT = "pip install -e '.[onnx]' in the ssiu checkout"
MIN_OPSET = {"torchscript": 11, "dynamo": 18}  # 11: Pad with runtime pad sizes
MAX_OPSET = {"torchscript": 20, "dynamo": 23}
INPUT_NAME, OUTPUT_NAME = "lr", "sr"
# Max abs difference ONNX Runtime vs PyTorch above which `verify_onnx` fails (fp32, RGB in
# [0, 1]); measured errors are ~1e-6, so this only catches a wrong graph.
VERIFY_TOLERANCE = 1e-4
# Sizes `verify_onnx` checks by default: neither a multiple of 16, one odd, so the runtime
# pad and crop differ from the traced example's.
VERIFY_SIZES = ((48, 40), (33, 57))
# The traced example: both sides need padding (a side that is already a multiple of 16
# would trace no pad at all, and the graph would then only serve multiples of 16).
_EXAMPLE_SIZE = (40, 36)


def _check_model(model) -> None:
    if not isinstance(model, SSIU):
        raise TypeError(f"model must be an ssiu.SSIU (ssiu.build / ssiu.load), got {type(model)}")


def default_opset(exporter: str) -> int:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    return DEFAULT_OPSETS[exporter]


def _check_opset(opset, exporter: str) -> int:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    lo, hi = MIN_OPSET[exporter], MAX_OPSET[exporter]
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(
            f"opset must be an int in [{lo}, {hi}] for the {exporter} exporter, got {opset!r}"
        )
    return opset


def reference_copy(model: SSIU) -> SSIU:
    """A float32 CPU copy of `model` in eval mode on the reference backend (model unchanged)."""
    _check_model(model)
    twin = copy.deepcopy(model)
    return twin.float().cpu().eval().set_backend("torch")


def export_onnx(
    model: SSIU,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    exporter: str = "torchscript",
) -> Path:
    """Write `model` as an ONNX file with dynamic batch, height and width; returns the path.

    model: an SSIU network (any backend, device or dtype: a float32 CPU copy on the
        reference backend is exported; the model itself is not changed).
    opset: ONNX opset, 11..20 for the TorchScript exporter, 18..23 for dynamo (None: the
        exporter's default, `DEFAULT_OPSETS`: 17 and 18).
    exporter: "torchscript" (default, fast) or "dynamo" (needs `onnxscript`).
    Input "lr": (N, 3, H, W) float32 in [0, 1], H, W >= 9; output "sr": (N, 3, sH, sW).
    """
    opset = _check_opset(default_opset(exporter) if opset is None else opset, exporter)
    path = Path(os.fspath(path))
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"output must be a .onnx file, got {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    net = reference_copy(model)
    example = torch.rand(1, 3, *_EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0))
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the shape checks and the `if pad:` of the forward; both are
        # static for any input >= 9x9 (pads are traced as shape arithmetic, see module doc).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        if exporter == "torchscript":
            dynamic = {
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"},
            }
            torch.onnx.export(
                net, (example,), str(path), dynamo=False, dynamic_axes=dynamic, **names
            )
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise ImportError(f"exporter='dynamo' needs onnxscript: {ONNX_HINT}") from None
            from torch.export import Dim

            # Dim.AUTO: explicit Dim ranges fail on the modulo-16 padding arithmetic.
            auto = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
            program = torch.onnx.export(
                net, (example,), dynamo=True, dynamic_shapes=(auto,), verbose=False, **names
            )
            program.save(str(path))
    return path


def photo_inputs(sizes=VERIFY_SIZES, batch: int = 1) -> list[torch.Tensor]:
    """Test inputs (batch, 3, h, w): crops of scikit-image's photos (random if not installed)."""
    try:
        from ssiu.data import sample_images, to_tensor

        photos = [to_tensor(a) for a in sample_images(["astronaut", "chelsea", "coffee"]).values()]
    except (ImportError, FileNotFoundError):
        gen = torch.Generator().manual_seed(0)
        photos = [torch.rand(3, 256, 256, generator=gen) for _ in range(3)]
    inputs = []
    for i, (h, w) in enumerate(sizes):
        crops = []
        for b in range(batch):
            photo = photos[(i + b) % len(photos)]
            top, left = (photo.shape[1] - h) // 2, (photo.shape[2] - w) // 2
            crops.append(photo[:, top : top + h, left : left + w])
        inputs.append(torch.stack(crops))
    return inputs


def verify_onnx(
    path: str | os.PathLike,
    model: SSIU,
    inputs: list[torch.Tensor] | None = None,
    *,
    tolerance: float | None = VERIFY_TOLERANCE,
) -> dict[str, float]:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same inputs.

    inputs: (N, 3, H, W) float tensors in [0, 1]; default: photo crops of sizes
        `VERIFY_SIZES` (two sizes, so the dynamic pad/crop is exercised).
    Returns {"NxHxW": max abs difference}. Raises RuntimeError if a difference exceeds
    `tolerance` (None: never) or an output shape is wrong.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            f"verifying needs onnxruntime: {ONNX_HINT} (or pass --no-verify)"
        ) from None
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    net = reference_copy(model)
    inputs = photo_inputs() if inputs is None else list(inputs)
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"verify inputs must be (N, 3, H, W) tensors, got {got}")
        if min(x.shape[-2:]) < min_input_size():
            raise ValueError(f"verify inputs need H, W >= {min_input_size()}, got {tuple(x.shape)}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = {}
    for x in inputs:
        x = x.detach().float().cpu()
        with torch.no_grad():
            expected = net(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        key = "x".join(str(d) for d in (x.shape[0], *x.shape[-2:]))
        if got.shape != expected.shape:
            raise RuntimeError(
                f"ONNX output for input {key} has shape {got.shape}, PyTorch {expected.shape}"
            )
        errors[key] = float(np.abs(got - expected).max())
        if tolerance is not None and not errors[key] <= tolerance:
            raise RuntimeError(
                f"ONNX output differs from PyTorch by {errors[key]:.3g} (> {tolerance:g}) "
                f"for input {key}"
            )
    return errors


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export to ONNX (dynamic batch/height/width), checked with onnxruntime",
        description="Export SSIU to ONNX from the reference backend: input 'lr' (N, 3, H, W) "
        "float32 in [0, 1], output 'sr' (N, 3, sH, sW); N, H, W dynamic (H, W >= 9). "
        "Then run it with onnxruntime on two photo crops and print the max abs error.",
    )
    p.add_argument("output", metavar="MODEL.onnx", help="the ONNX file to write")
    p.add_argument(
        "--weights",
        metavar="W",
        default=None,
        help="weights (ours or the authors'); without it, random weights at --scale "
        "(for testing a deployment pipeline)",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=(2, 3, 4),
        default=None,
        help="scale of the random-weights model (default 4); with --weights it "
        "must match the weights",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (default: 17 with torchscript, 18 with dynamo)",
    )
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help=f"torchscript (default, fast) or dynamo (torch.export; needs onnxscript: {ONNX_HINT})",
    )
    p.add_argument(
        "--attn-topk",
        type=int,
        default=None,
        metavar="K",
        help="sparse attention: keep keys >= the K-th best score (default dense)",
    )
    p.add_argument(
        "--moe-topk",
        type=int,
        default=None,
        metavar="K",
        help="experts kept per channel and pixel in MoE-FS, 1..3 (default 3)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the file with onnxruntime and compare with PyTorch (default on)",
    )
    p.set_defaults(func=run)


def _model_from_args(args) -> SSIU:
    import ssiu

    options = {}
    if args.attn_topk is not None:
        options["attn_topk"] = args.attn_topk
    if args.moe_topk is not None:
        options["moe_topk"] = args.moe_topk
    if args.weights is None:
        print(
            f"ssiu export: no --weights: exporting RANDOM weights (x{args.scale or 4})",
            file=sys.stderr,
        )
        torch.manual_seed(0)
        return ssiu.build(scale=args.scale or 4, **options)
    from ssiu import cli_checks

    cli_checks.weights_file(args.weights)
    model = ssiu.load(args.weights, map_location="cpu", backend="torch", **options)
    if args.scale is not None and args.scale != model.scale:
        raise ValueError(f"--scale {args.scale} but {args.weights} is an x{model.scale} model")
    return model


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.opset is None:
        args.opset = default_opset(args.exporter)
    _check_opset(args.opset, args.exporter)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"MODEL.onnx must end in .onnx, got {out}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    model = _model_from_args(args)
    _run_export(args, model, out, time.perf_counter())  # ImportError: one line from the CLI
    return 0


def _run_export(args, model: SSIU, out: Path, start: float) -> None:
    c = model.config
    export_onnx(model, out, opset=args.opset, exporter=args.exporter)
    size_mb = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({size_mb:.1f} MiB, x{c.scale}, opset {args.opset}, {args.exporter}, "
        f"attn_topk={c.attn_topk}, moe_topk={c.moe_topk}, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    if args.verify:
        errors = verify_onnx(out, model)
        shown = ", ".join(f"{k}: {v:.2e}" for k, v in errors.items())
        print(
            f"onnxruntime vs PyTorch, max abs error (RGB in [0, 1]): {shown} "
            f"(tolerance {VERIFY_TOLERANCE:g})"
        )


__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_OPSETS",
    "EXPORTERS",
    "VERIFY_TOLERANCE",
    "add_cli",
    "default_opset",
    "export_onnx",
    "photo_inputs",
    "reference_copy",
    "run",
    "verify_onnx",
]
