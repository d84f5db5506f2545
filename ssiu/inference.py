"""Upscaling images with a trained SSIU: whole or in overlapping tiles, plus PNG/JPEG I/O.

    model = ssiu.load("SSIU_x4.safetensors")
    lr = read_image("photo.jpg")                   # (3, H, W) float32 in [0, 1]
    sr = upscale(model, lr, tile=256)              # (3, 4H, 4W), bounded memory
    write_png(sr, "photo_x4.png")

Tiling. The image is cut into a grid of tiles of `tile` x `tile` LR pixels ("cores").
Each core is run with at least `tile_overlap` LR pixels of real image context on every
side (less at the image border), and only the core's part of the output is kept
(centre cropping, no blending). Crops start on multiples of 16 LR pixels and are 16
pixels long where the image allows: that is the grid the network pads to and on which
ESAM lays its 8x8 half-resolution attention blocks, so every tile sees exactly the
block partition of the whole image (misaligned tiles differ ~100x more, up to 0.14
with overlap 8) and the effective overlap is rounded up to the 16-pixel grid.

What remains is missing far context (each of the 9 steps reaches about 20 LR pixels
further: an attention block plus halo, the dw3x3s; the influence decays fast), plus a
floor that overlap removes only slowly: ESAM's bilinear x2 upsampling uses
align_corners=True, whose sampling positions depend on the size of the map, so a tile
never reproduces the whole image's interpolation exactly (with align_corners=False
the error of the tiny model below drops to 1e-7 at overlap 48).

Measured max abs difference, tiled vs whole image (RGB in [0, 1], random weights):

    released x4 architecture, photo crop 256x192 LR, tile 64:
        overlap 0: 0.27   16: 4.0e-4 (mean 6e-6)   32: 1.0e-4   64: 6.0e-5
    tiny model (16 ch, 3 steps), x4, photo crop 112x96 LR, tile 32:
        overlap 0: 0.30   16: 4.5e-4 (mean 1e-5)   32: 1.8e-4   64: 4.0e-5

That is under a tenth of an 8-bit level (1/255 = 3.9e-3) at the default overlap 16.

Fast paths (`compile`, see `choose_path`): the model can run through torch.compile
(`ssiu.compile.compile_for_inference`: fullgraph, H and W dynamic, so a new image size
does not recompile). On CUDA, tiled runs use mode="reduce-overhead" (CUDA graphs, one per
tile shape: at most four, interior and edge tiles). Compiling costs tens of seconds, so
"auto" compiles only on CUDA and only when the work is large (`AUTO_COMPILE_PIXELS` LR
pixels); the output is the same as eager up to float rounding.
Trained weights may spread information further than random ones; measure with yours if
it matters. Centre cropping was chosen over feather blending because every kept pixel
then has the most context available; blending mixes in pixels computed near tile edges.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssiu.config import PAD_MULTIPLE
from ssiu.data import to_uint8
from ssiu.devices import CudaUnavailableError, resolve_device
from ssiu.model import min_input_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CHOICES = ("auto", "on", "off")
# "auto" compiles on CUDA from this many LR pixels (all images and tiles, overlap included):
# a guess at where ~30-60 s of compilation pays (not measured: no GPU was available).
AUTO_COMPILE_PIXELS = 64 * 1024 * 1024
# Tile crops start on this LR grid so the tiles share the whole image's attention blocks.
TILE_ALIGN = PAD_MULTIPLE


# ----------------------------------------------------------------------------- checks


def check_image(image: torch.Tensor) -> None:
    """An LR image must be (3, H, W) or (N, 3, H, W) float RGB in [0, 1], finite."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be (3, H, W) or (N, 3, H, W) RGB, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(
            f"image must be a floating tensor in [0, 1], got {image.dtype} "
            "(convert 8-bit images with x.float() / 255)"
        )
    if image.numel() == 0:
        raise ValueError(f"image is empty: {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = image.min().item(), image.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"image values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")


def _check_options(tile, tile_overlap, dtype) -> None:
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be None (whole image) or an int >= 1, got {tile!r}")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be an int >= 0, got {tile_overlap!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")


def model_scale(model: nn.Module) -> int:
    scale = getattr(model, "scale", None)
    if not isinstance(model, nn.Module) or not isinstance(scale, int):
        raise TypeError(f"model must be an SSIU network (ssiu.build / ssiu.load), got {model!r}")
    return scale


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- tiling


def tile_spans(size: int, tile: int, overlap: int, min_size: int) -> list[tuple[int, ...]]:
    """Split one axis of `size` pixels into (crop_start, crop_end, core_start, core_end).

    The cores tile [0, size) in steps of `tile`; each crop is [core_start - overlap,
    core_end + overlap) clipped to the image, its start rounded down to a multiple of
    TILE_ALIGN, widened (start towards 0, then end) to at least `min_size` pixels, and its
    length rounded up to a multiple of TILE_ALIGN where the image allows (the network
    would pad it to that length anyway: real pixels are better context than reflections).
    Needs size >= min_size.
    """
    spans = []
    for core_start in range(0, size, tile):
        core_end = min(core_start + tile, size)
        crop_end = min(core_end + overlap, size)
        crop_start = max(0, core_start - overlap) // TILE_ALIGN * TILE_ALIGN
        if crop_end - crop_start < min_size:
            crop_start = max(0, crop_end - min_size) // TILE_ALIGN * TILE_ALIGN
            crop_end = min(size, max(crop_end, crop_start + min_size))
        # The network pads every crop to a multiple of 16 anyway: fill that with real image.
        crop_end = min(size, crop_start + -(-(crop_end - crop_start) // TILE_ALIGN) * TILE_ALIGN)
        spans.append((crop_start, crop_end, core_start, core_end))
    return spans


def count_tiles(height: int, width: int, tile: int | None) -> int:
    if tile is None:
        return 1
    return math.ceil(height / tile) * math.ceil(width / tile)


def _pad_tiny(x: torch.Tensor) -> torch.Tensor:
    """Edge-replicate an image with a side below min_input_size() up to that size."""
    m = min_input_size()
    pad_h, pad_w = max(0, m - x.shape[-2]), max(0, m - x.shape[-1])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


# ----------------------------------------------------------------------------- upscale


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def choose_path(device: torch.device, pixels: int, tiled: bool, compile="off") -> dict:
    """How `upscale` runs: {"compiled": bool, "mode": None | "reduce-overhead", "why": str}.

    compile: "off"/False (eager), "on"/True (compiled), "auto" (compiled on CUDA when the
    job has at least AUTO_COMPILE_PIXELS LR pixels). CUDA graphs only for tiled CUDA runs
    (fixed tile shapes); whole images of varying size use dynamic shapes instead.
    """
    flag = {True: "on", False: "off"}.get(compile, compile)
    if flag not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES} or a bool, got {compile!r}")
    cuda = torch.device(device).type == "cuda"
    if flag == "off":
        return {"compiled": False, "mode": None, "why": "eager (compile off)"}
    if flag == "auto" and not cuda:
        return {"compiled": False, "mode": None, "why": "eager (no compile on CPU)"}
    if flag == "auto" and pixels < AUTO_COMPILE_PIXELS:
        why = f"eager ({pixels / 1e6:.1f} MP too small to amortise compiling)"
        return {"compiled": False, "mode": None, "why": why}
    mode = "reduce-overhead" if tiled and cuda else None
    why = "torch.compile, " + ("CUDA graphs per tile shape" if mode else "dynamic H/W")
    return {"compiled": True, "mode": mode, "why": why}


def _forward(model, path: dict, compiler: str | None):
    if not path["compiled"]:
        return model
    from ssiu.compile import compile_for_inference

    return compile_for_inference(
        model, compiler, mode=path["mode"], static=path["mode"] == "reduce-overhead"
    )


def _run(model, x: torch.Tensor, device, dtype, scale: int, clamp: bool = True) -> torch.Tensor:
    """Model output for one crop x (N, 3, h, w) on `device`, as float32 clamped to [0, 1]
    (raw if not `clamp`)."""
    h, w = x.shape[-2:]
    with _autocast(device, dtype):
        out = model(_pad_tiny(x))
    out = out[..., : h * scale, : w * scale].float()
    if dtype != torch.float32 and not torch.isfinite(out).all():
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        raise RuntimeError(
            f"the {name} forward pass produced NaN/inf (values overflow {name}); "
            "use dtype=torch.bfloat16 or torch.float32 (--dtype bf16 / fp32)"
        )
    return out.clamp_(0, 1) if clamp else out


def upscale(
    model: nn.Module,
    image: torch.Tensor,
    *,
    tile: int | None = None,
    tile_overlap: int = 16,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    compile: bool | str = False,
    compiler: str | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Super-resolve `image` with an SSIU `model`.

    image: (3, H, W) or (N, 3, H, W) float RGB in [0, 1] (NaN/inf or values outside
        [0, 1] raise ValueError); any device.
    tile: None runs the whole image at once; an int runs cores of tile x tile LR pixels,
        each with `tile_overlap` LR pixels of context on every side, and keeps the
        centre of every tile's output (memory bounded by the tile, not the image).
        Tiled output differs from whole-image output by ~4e-4 at most with overlap 16 and
        ~1e-4 with overlap 32 (random weights; see the module docstring). Overlap 0
        gives visible seams (errors ~0.3).
    device: where the network runs; default the model's device. The model is moved
        there (in place) if needed. Tiles are sent one at a time; the output is gathered
        on the image's device.
    dtype: torch.float32 (exact), torch.bfloat16 or torch.float16: autocast on `device`.
        A non-finite fp16 output raises RuntimeError (use bf16).
    progress: a tqdm bar over the tiles (stderr).
    compile: False/"off" (default), True/"on", or "auto" (see `choose_path`): run the model
        through torch.compile (fullgraph; dynamic H, W; CUDA graphs for tiles on CUDA).
        compiler: the torch.compile backend (default Inductor).

    Images smaller than `ssiu.model.min_input_size()` on a side are edge-replicated to
    that size and the output cropped. Returns float32 (N, 3, sH, sW) (or (3, sH, sW) for
    a single image) clamped to [0, 1] (raw if `clamp` is False: what the authors'
    evaluation measures), on the image's device.
    """
    scale = model_scale(model)
    check_image(image)
    _check_options(tile, tile_overlap, dtype)
    device = torch.device(device) if device is not None else model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaUnavailableError(f"device {device} requested but CUDA is not available")
    if model_device(model) != device:
        model.to(device)
    single = image.dim() == 3
    x = image[None] if single else image
    n, _, height, width = x.shape
    out_device = x.device
    whole = tile is None or (tile >= height and tile >= width)
    tiles = 1 if whole else count_tiles(height, width, tile)
    side = tile + 2 * tile_overlap if not whole else 0
    pixels = n * height * width if whole else n * tiles * side * side
    net = _forward(model, choose_path(device, pixels, not whole, compile), compiler)

    if whole:
        with torch.inference_mode():
            out = _run(net, x.to(device, torch.float32), device, dtype, scale, clamp).to(out_device)
        return out[0] if single else out

    from tqdm.auto import tqdm

    m = min_input_size()
    x = _pad_tiny(x)
    rows = tile_spans(x.shape[-2], tile, tile_overlap, m)
    cols = tile_spans(x.shape[-1], tile, tile_overlap, m)
    out = torch.empty(n, 3, height * scale, width * scale, device=out_device)
    bar = tqdm(total=len(rows) * len(cols), desc="tiles", unit="tile", disable=not progress)
    with torch.inference_mode(), bar:
        for r0, r1, core_r0, core_r1 in rows:
            for c0, c1, core_c0, core_c1 in cols:
                crop = x[..., r0:r1, c0:c1].to(device, torch.float32)
                sr = _run(net, crop, device, dtype, scale, clamp)
                # keep the core (clipped to the real image if it was padded)
                kr0, kr1 = core_r0, min(core_r1, height)
                kc0, kc1 = core_c0, min(core_c1, width)
                if kr1 > kr0 and kc1 > kc0:
                    out[..., kr0 * scale : kr1 * scale, kc0 * scale : kc1 * scale] = sr[
                        ...,
                        (kr0 - r0) * scale : (kr1 - r0) * scale,
                        (kc0 - c0) * scale : (kc1 - c0) * scale,
                    ].to(out_device)
                bar.update(1)
    return out[0] if single else out


# ----------------------------------------------------------------------------- image I/O


def read_image(path) -> torch.Tensor:
    """Read a PNG/JPEG (anything Pillow reads) as (3, H, W) float32 RGB in [0, 1].

    The package's one reader, `ssiu.data.read_image`: EXIF orientation applied, grey
    images become RGB, an alpha channel is dropped, 16-bit greyscale keeps its 16 bits.
    Raises FileNotFoundError, or ValueError (`ssiu.data.ImageReadError`) for a file that
    is not a readable image.
    """
    from ssiu.data import load_image

    return load_image(os.fspath(path))


def write_png(image: torch.Tensor, path) -> None:
    """Write (3, H, W) float RGB in [0, 1] as an 8-bit PNG (clamped, rounded)."""
    from PIL import Image

    path = Path(os.fspath(path))
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    Image.fromarray(to_uint8(image), mode="RGB").save(path, format="PNG")


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve one image with trained weights",
        description="Super-resolve IN (PNG/JPEG) and write OUT (8-bit PNG).",
    )
    p.add_argument("input", metavar="IN", help="low-resolution image (PNG, JPEG, ...)")
    p.add_argument("output", metavar="OUT", help="output PNG path (its directory must exist)")
    p.add_argument(
        "--weights",
        required=True,
        metavar="W",
        help="weights: ours (safetensors / training checkpoint) or the authors' .pt",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="N",
        help="run in tiles of N x N LR pixels (bounded memory; default: whole image)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=16,
        metavar="M",
        help="LR pixels of context around each tile (default 16)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="fp32 (exact), bf16 or fp16 autocast (default fp32)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="auto: fused Triton kernels on CUDA, reference elsewhere",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="torch.compile the model: auto (default: on CUDA for large jobs), on, off",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ssiu
    from ssiu import cli_checks
    from ssiu.ops import resolve

    src, dst, weights = Path(args.input), Path(args.output), Path(args.weights)
    if not src.is_file():
        raise FileNotFoundError(f"input image not found: {src}")
    if dst.suffix.lower() != ".png":
        raise ValueError(f"OUT must be a .png path, got {dst}")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {dst.parent}")
    cli_checks.weights_file(weights)
    cli_checks.tile_size(args.tile, args.tile_overlap, min_input_size())
    _check_options(args.tile, args.tile_overlap, torch.float32)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]

    image = read_image(src)
    model = ssiu.load(weights, map_location="cpu", backend=args.backend).to(device)
    backend = resolve(args.backend, torch.empty(0, device=device))
    _, height, width = image.shape
    s = model.scale
    tiles = count_tiles(height, width, args.tile)
    side = args.tile + 2 * args.tile_overlap if tiles > 1 else 0
    pixels = tiles * side * side if tiles > 1 else height * width
    path = choose_path(device, pixels, tiles > 1, args.compile)
    print(
        f"ssiu upscale: x{s} {height}x{width} -> {height * s}x{width * s} (height x width); "
        f"device={device} dtype={args.dtype} backend={backend} path={path['why']} "
        + (
            f"tiles={tiles} (tile {args.tile}, overlap {args.tile_overlap})"
            if tiles > 1
            else "whole image"
        ),
        file=sys.stderr,
    )
    start = time.perf_counter()
    sr = upscale(
        model,
        image,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        device=device,
        dtype=dtype,
        progress=not args.no_progress,
        compile=path["compiled"],
    )
    elapsed = time.perf_counter() - start
    write_png(sr, dst)
    print(f"wrote {dst} ({elapsed:.2f} s)")
    return 0


__all__ = [
    "DTYPES",
    "add_cli",
    "check_image",
    "choose_path",
    "count_tiles",
    "model_scale",
    "read_image",
    "run",
    "tile_spans",
    "to_uint8",
    "upscale",
    "write_png",
]
