"""Benchmark evaluation: PSNR/SSIM (Y channel, border = scale) on Set5, Set14, B100, ...

    model = ssiu.load("SSIU_x4.pth")
    report = evaluate(model, "benchmarks/")            # every set found under the folder
    print(report.table())                               # one row per set, + bicubic
    report.write("results.md")                          # or .csv

Folder layouts, per set `DIR/<set>/` (set names are matched case-insensitively, and
B100 = BSD100 = BSDS100):

* `HR/*.png` + `LR_bicubic/X4/*x4.png` (the common SR benchmark release; `x4` suffix
  or the same name);
* `GTmod12/*.png` + `LRbicx4/*.png` (BasicSR's own benchmark folders);
* HR only (`HR/`, `GTmod12/`, `GT/` or images directly in the set folder): the LR input
  is made here by bicubic downsampling (Pillow, close to but not bit-identical with
  MATLAB's `imresize`, so numbers differ slightly from papers), with a
  `SyntheticLRWarning`.
`DIR` may also be one set folder itself.

As in the SR literature, each HR image is cropped to a multiple of the scale ("mod
crop") before measuring; the SR output and the bicubic baseline are clamped and rounded
to 8 bits; PSNR and SSIM are measured on BT.601 Y with `scale` border pixels removed
(`ssiu.metrics.psnr_y`, `ssim_y`). The bicubic baseline upsamples the same LR images
(Pillow bicubic in float, `ssiu.data.bicubic_upsample`).

`protocol="authors"` (`ssiu eval --protocol authors`) measures as the SSIU authors' test
code does instead (no clamping or rounding, SSIM on their mis-scaled Y: see
`ssiu.metrics`), to compare with the paper's table; "basicsr" is the default.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssiu.data import HRFolder, PairedFolders, PairSource, to_tensor
from ssiu.devices import resolve_device
from ssiu.model import SSIU

# Usual order of the SR benchmark sets; others found in the folder follow, by name.
STANDARD_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
ALIASES = {"bsd100": "b100", "bsds100": "b100"}
HR_DIRS = ("HR", "GTmod12", "GT", "hr", "gt")
LR_DIRS = ("LR_bicubic/X{s}", "LR_bicubic/x{s}", "LRbicx{s}", "LR/X{s}", "LR/x{s}", "X{s}")


PROTOCOL_TITLES = {
    "basicsr": "BasicSR protocol (8-bit outputs)",
    "authors": "the authors' protocol (float outputs, their SSIM)",
}


class SyntheticLRWarning(UserWarning):
    """A set without LR images for this scale: LR made here by bicubic downsampling."""


@dataclass
class BenchmarkSet:
    """One benchmark folder: where its HR and LR images are, and how they were found."""

    name: str
    folder: Path
    hr_dir: Path
    lr_dir: Path | None  # None: LR made by bicubic downsampling of the HR images
    layout: str  # "HR + LR_bicubic/X4", "GTmod12 + LRbicx4", "HR only (bicubic LR)", ...

    def pairs(self, scale: int) -> PairSource:
        """(LR, HR) uint8 pairs, HR mod-cropped; clear errors for empty or unpaired folders."""
        try:
            if self.lr_dir is None:
                return HRFolder(self.hr_dir, scale)
            return PairedFolders(self.hr_dir, self.lr_dir, scale)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"set {self.name!r}: {e}") from None


@dataclass
class SetResult:
    name: str
    layout: str
    images: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> metrics

    def mean(self, key: str) -> float:
        return float(np.mean([m[key] for m in self.images.values()]))

    @property
    def count(self) -> int:
        return len(self.images)


@dataclass
class EvalReport:
    """Per-set means (and per-image values) of SSIU and the bicubic baseline."""

    scale: int
    sets: list[SetResult]
    bicubic: bool
    model_name: str = "SSIU"
    source: str | None = None  # e.g. the weights file, shown in the table's title
    protocol: str = "basicsr"  # ssiu.metrics.PROTOCOLS

    COLUMNS = ("set", "images", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim")

    def rows(self) -> list[dict]:
        out = []
        for r in self.sets:
            row = {"set": r.name, "images": r.count, "psnr": r.mean("psnr"), "ssim": r.mean("ssim")}
            if self.bicubic:
                row.update(bicubic_psnr=r.mean("bicubic_psnr"), bicubic_ssim=r.mean("bicubic_ssim"))
            out.append(row)
        return out

    def table(self, fmt: str = "markdown") -> str:
        """The per-set table as "markdown" (also fine on a terminal) or "csv"."""
        rows = self.rows()
        if fmt == "csv":
            buf = io.StringIO()
            cols = [c for c in self.COLUMNS if c in rows[0]]
            writer = csv.DictWriter(buf, fieldnames=cols + ["scale"], lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "scale": self.scale})
            return buf.getvalue()
        if fmt != "markdown":
            raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
        m = self.model_name
        head = ["set", "images", f"{m} PSNR", f"{m} SSIM"]
        if self.bicubic:
            head += ["bicubic PSNR", "bicubic SSIM"]
        lines = [
            f"x{self.scale}{f' {self.source}' if self.source else ''}, "
            f"PSNR (dB) / SSIM on Y (BT.601), border {self.scale}, "
            f"{PROTOCOL_TITLES[self.protocol]}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
        ]
        for row in rows:
            cells = [row["set"], str(row["images"]), f"{row['psnr']:.2f}", f"{row['ssim']:.4f}"]
            if self.bicubic:
                cells += [f"{row['bicubic_psnr']:.2f}", f"{row['bicubic_ssim']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def per_image_csv(self) -> str:
        buf = io.StringIO()
        keys = ["psnr", "ssim"] + (["bicubic_psnr", "bicubic_ssim"] if self.bicubic else [])
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["set", "image", *keys])
        for r in self.sets:
            for name, m in r.images.items():
                writer.writerow([r.name, name, *(repr(m[k]) for k in keys)])
        return buf.getvalue()

    def write(self, path: str | os.PathLike) -> Path:
        """Write the table: `.csv` as CSV, anything else (`.md`) as Markdown."""
        path = Path(os.fspath(path))
        if not path.parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {path.parent}")
        path.write_text(self.table("csv" if path.suffix.lower() == ".csv" else "markdown"))
        return path


# ----------------------------------------------------------------------------- layout


def _has_images(folder: Path) -> bool:
    from ssiu.data import IMAGE_EXTENSIONS

    return folder.is_dir() and any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()
    )


def _key(name: str) -> str:
    low = name.lower()
    return ALIASES.get(low, low)


def classify_set(folder: Path, scale: int) -> BenchmarkSet | None:
    """How `folder` holds a benchmark set at `scale`, or None if it holds none."""
    hr_dir = next((folder / d for d in HR_DIRS if (folder / d).is_dir()), None)
    if hr_dir is None:
        if _has_images(folder):
            return BenchmarkSet(folder.name, folder, folder, None, "images only (bicubic LR)")
        return None
    for pattern in LR_DIRS:
        lr_dir = folder / pattern.format(s=scale)
        if lr_dir.is_dir():
            return BenchmarkSet(
                folder.name, folder, hr_dir, lr_dir, f"{hr_dir.name} + {lr_dir.relative_to(folder)}"
            )
    return BenchmarkSet(folder.name, folder, hr_dir, None, f"{hr_dir.name} only (bicubic LR)")


def find_sets(data_dir: str | os.PathLike, scale: int, sets=None) -> list[BenchmarkSet]:
    """The benchmark sets under `data_dir` (or `data_dir` itself if it is one set).

    sets: names to evaluate, in that order (case-insensitive; B100 = BSD100 = BSDS100);
        None = every set found, the standard ones first.
    Raises FileNotFoundError / ValueError naming what is missing.
    """
    root = Path(os.fspath(data_dir))
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {root}")
    own = classify_set(root, scale)
    if any((root / d).is_dir() for d in HR_DIRS):
        found = [own]  # DIR is a set folder itself (HR/, GTmod12/, ...)
    else:
        found = [s for d in sorted(root.iterdir()) if d.is_dir() and (s := classify_set(d, scale))]
        if not found and own is not None:
            found = [own]  # a flat folder of HR images
    if not found:
        raise ValueError(
            f"no benchmark sets in {root}: expected set folders like {root}/Set5/HR + "
            f"{root}/Set5/LR_bicubic/X{scale}, {root}/Set5/GTmod12 + {root}/Set5/LRbicx{scale}, "
            "or folders of HR images"
        )
    by_key = {_key(s.name): s for s in found}
    if sets is None:
        order = [_key(n) for n in STANDARD_SETS]
        return sorted(
            found,
            key=lambda s: (
                order.index(_key(s.name)) if _key(s.name) in order else len(order),
                s.name.lower(),
            ),
        )
    names = [n.strip() for n in ([sets] if isinstance(sets, str) else sets)]
    names = [n for part in names for n in part.split(",") if n.strip()]
    if not names:
        raise ValueError("no set names given")
    unknown = [n for n in names if _key(n.strip()) not in by_key]
    if unknown:
        raise ValueError(
            f"unknown set(s) {unknown} in {root}; found: {', '.join(s.name for s in found)}"
        )
    return [by_key[_key(n.strip())] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- evaluation


def image_metrics(sr, lr, hr, scale: int, bicubic: bool = True, protocol: str = "basicsr") -> dict:
    """{"psnr", "ssim"[, "bicubic_psnr", "bicubic_ssim"]} of one (3, H, W) output against
    its HR image: the one measurement of `ssiu eval` and of validation during training.
    protocol: "basicsr" (default) or "authors" (`ssiu.metrics`)."""
    from ssiu.data import bicubic_upsample
    from ssiu.metrics import psnr_y, ssim_y

    measure = lambda img: (
        psnr_y(img, hr, scale, protocol=protocol),
        ssim_y(img, hr, scale, protocol=protocol),
    )
    psnr, ssim = measure(sr)
    row = {"psnr": psnr, "ssim": ssim}
    if bicubic:
        row["bicubic_psnr"], row["bicubic_ssim"] = measure(bicubic_upsample(lr, scale))
    return row


def evaluate(
    model: SSIU,
    data_dir: str | os.PathLike,
    *,
    scale: int | None = None,
    sets=None,
    device: str | torch.device | None = None,
    tile: int | None = None,
    tile_overlap: int = 16,
    bicubic: bool = True,
    progress: bool = True,
    protocol: str = "basicsr",
) -> EvalReport:
    """PSNR/SSIM (Y, border = scale) of `model` on the benchmark sets under `data_dir`.

    scale: must equal the model's (default: the model's).
    sets: names or a comma-separated string ("Set5,Set14"); None = all sets found.
    device, tile, tile_overlap: as `ssiu.inference.upscale` (tile=None: whole images).
    bicubic: also measure the bicubic baseline.
    progress: a tqdm bar over the images (stderr).
    protocol: "basicsr" (default) or "authors" (the SSIU authors' measurement, to compare
        with the paper; see `ssiu.metrics`).
    Sets with HR images only get LR by bicubic downsampling, with a SyntheticLRWarning.
    """
    from tqdm.auto import tqdm

    from ssiu.inference import model_scale, upscale
    from ssiu.metrics import check_protocol

    check_protocol(protocol)
    s = model_scale(model)
    if scale is not None and scale != s:
        raise ValueError(f"scale {scale} does not match the model, which is x{s}")
    chosen = find_sets(data_dir, s, sets)
    sources = []
    for bench in chosen:
        if bench.lr_dir is None:
            warnings.warn(
                f"set {bench.name!r} has no LR images for x{s} ({bench.hr_dir}): making them "
                "by bicubic downsampling (Pillow); numbers will differ slightly from "
                "papers that use MATLAB imresize",
                SyntheticLRWarning,
                stacklevel=2,
            )
        sources.append((bench, bench.pairs(s)))
    was_training = model.training
    model.eval()
    results = []
    bar = tqdm(total=sum(len(p) for _, p in sources), desc="eval", unit="img", disable=not progress)
    try:
        with bar:
            for bench, pairs in sources:
                result = SetResult(bench.name, bench.layout)
                bar.set_description(bench.name)
                for name, lr8, hr8 in pairs:
                    lr, hr = to_tensor(lr8), to_tensor(hr8)
                    sr = upscale(
                        model,
                        lr,
                        tile=tile,
                        tile_overlap=tile_overlap,
                        device=device,
                        progress=False,
                        clamp=protocol == "basicsr",  # the authors measure the raw output
                    ).cpu()
                    try:
                        row = image_metrics(sr, lr, hr, s, bicubic, protocol)
                    except ValueError as e:
                        raise ValueError(f"set {bench.name!r}, image {name!r}: {e}") from None
                    result.images[name] = row
                    bar.update(1)
                results.append(result)
    finally:
        model.train(was_training)
    return EvalReport(scale=s, sets=results, bicubic=bicubic, protocol=protocol)


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="PSNR/SSIM on benchmark sets (Set5, Set14, B100, Urban100, Manga109)",
        description="Evaluate weights on benchmark folders: DIR/<set>/HR + LR_bicubic/X<s>, "
        "DIR/<set>/GTmod12 + LRbicx<s>, or HR images only (LR made by bicubic, with a "
        "warning). Prints PSNR/SSIM on Y (border = scale) per set, with the bicubic baseline.",
    )
    p.add_argument(
        "--weights",
        required=True,
        metavar="W",
        help="weights: ours (safetensors / training checkpoint) or the authors' file",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder holding the set folders")
    p.add_argument(
        "--scale",
        type=int,
        choices=(2, 3, 4),
        default=None,
        help="check that the weights have this scale (default: the weights' scale)",
    )
    p.add_argument(
        "--sets",
        default=None,
        metavar="S1,S2",
        help="comma-separated set names (default: every set found)",
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
        help="run in tiles of N x N LR pixels (default: whole images)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=16,
        metavar="M",
        help="LR pixels of context around each tile (default 16)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="auto: fused Triton kernels on CUDA, reference elsewhere",
    )
    p.add_argument(
        "--attn-topk",
        type=int,
        default=None,
        metavar="K",
        help="override the sparse-attention k (default: from the weights / dense)",
    )
    p.add_argument(
        "--moe-topk",
        type=int,
        default=None,
        metavar="K",
        help="override MoE-FS top-k (default: from the weights / 3)",
    )
    p.add_argument(
        "--protocol",
        choices=("basicsr", "authors"),
        default="basicsr",
        help="basicsr (default: 8-bit outputs, BasicSR's PSNR/SSIM) or authors (the SSIU "
        "authors' test code: float outputs, their SSIM; to compare with the paper)",
    )
    p.add_argument("--no-bicubic", action="store_true", help="skip the bicubic baseline")
    p.add_argument(
        "--out",
        action="append",
        default=[],
        metavar="PATH",
        help="also write the table to PATH: .csv or .md (repeatable)",
    )
    p.add_argument(
        "--per-image",
        metavar="CSV",
        default=None,
        help="write every image's values to this CSV file",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ssiu
    from ssiu import cli_checks

    weights = Path(args.weights)
    cli_checks.weights_file(weights)
    for out in [*args.out, *([args.per_image] if args.per_image else [])]:
        if not Path(out).parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {Path(out).parent}")
    device = resolve_device(args.device)
    options = {
        k: v
        for k, v in (("attn_topk", args.attn_topk), ("moe_topk", args.moe_topk))
        if v is not None
    }
    model = ssiu.load(weights, map_location="cpu", backend=args.backend, **options).to(device)
    if args.scale is not None and args.scale != model.scale:
        raise ValueError(f"--scale {args.scale} but {weights} is an x{model.scale} model")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SyntheticLRWarning)
        report = evaluate(
            model,
            args.data,
            sets=args.sets,
            device=device,
            tile=args.tile,
            tile_overlap=args.tile_overlap,
            bicubic=not args.no_bicubic,
            progress=not args.no_progress,
            protocol=args.protocol,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    report.source = str(weights)
    print(report.table())
    print(
        f"({sum(r.count for r in report.sets)} images, {time.perf_counter() - start:.1f} s, "
        f"device {device})"
    )
    for out in args.out:
        print(f"wrote {report.write(out)}")
    if args.per_image:
        Path(args.per_image).write_text(report.per_image_csv())
        print(f"wrote {args.per_image}")
    return 0


__all__ = [
    "BenchmarkSet",
    "EvalReport",
    "SetResult",
    "SyntheticLRWarning",
    "add_cli",
    "classify_set",
    "evaluate",
    "find_sets",
    "image_metrics",
    "run",
]
