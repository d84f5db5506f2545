"""Index helpers called from inside several kernels (@triton.jit device functions)."""

import triton
import triton.language as tl


@triton.jit
def reflect(i, size):
    """Index into a reflect-padded (pad 1) axis of length size >= 2, as F.pad(mode="reflect")."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= size, 2 * size - 2 - i, i)


@triton.jit
def row_tile(tile, H, tiles_per_row, BLOCK: tl.constexpr):
    """Image (int64), row y, first column x0 and columns x [BLOCK] of one row tile: tiles
    run along image rows (tiles_per_row per row), so a tile's pixels are contiguous."""
    per_image = H * tiles_per_row
    n = tl.cast(tile, tl.int64) // per_image
    rest = tile % per_image
    x0 = (rest % tiles_per_row) * BLOCK
    return n, rest // tiles_per_row, x0, x0 + tl.arange(0, BLOCK)
