"""Index helpers called from inside several kernels (@triton.jit device functions)."""

import triton
import triton.language as tl


@triton.jit
def reflect(i, size):
    """Index into a reflect-padded (pad 1) axis of length size >= 2, as F.pad(mode="reflect")."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= size, 2 * size - 2 - i, i)
