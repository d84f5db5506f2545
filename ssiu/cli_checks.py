"""Checks of command-line inputs shared by the commands, so that a mistake reads as one
clear input error (ValueError / FileNotFoundError) before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

# First bytes of the image files a user may pass to --weights by mistake.
IMAGE_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"RIFF": "a RIFF (WebP?) file",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}


def weights_file(path: str | os.PathLike, option: str = "--weights") -> Path:
    """The weights path, refused when missing or an image (torch would answer with advice
    about weights_only that does not apply)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in IMAGE_MAGIC.items():
        if head.startswith(magic):
            raise ValueError(
                f"{option} {path} is {kind}, not a checkpoint: give ssiu_x<s>.safetensors, a "
                "training checkpoint.pt or the authors' .pt/.pth file"
            )
    return path


def tile_size(tile: int | None, overlap: int, min_tile: int) -> None:
    """--tile must cover at least its own overlap (and the model's smallest input): smaller
    tiles recompute the overlap many times over (--tile 4 with overlap 16 runs 81 times the
    work of the whole image)."""
    if tile is None:
        return
    if tile < 1:
        raise ValueError(f"--tile must be >= 1 LR pixels (or left out: whole image), got {tile}")
    least = max(overlap, min_tile)
    if tile < least:
        raise ValueError(
            f"--tile {tile} is smaller than --tile-overlap {overlap} (or the model's smallest "
            f"input {min_tile}): use --tile {max(least, 64)} or more (each tile runs on "
            "tile + 2 x overlap pixels)"
        )
