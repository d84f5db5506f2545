"""`ssiu.testing.OP_PRECISION` states what the fp32 kernels really compile with on a GPU.

The first GPU run (bench/reports/nvidia-h200) failed the fp32 tail tests because the table
said "tf32x3" for the tail's forward while its final 3x3 kernel runs TF32: a GPU bound
tighter than the kernel. Here each op's entry must equal the loosest dot precision of its
registered fp32 kernel configs, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from ssiu.kernels.registry import KERNEL_SPECS

import ssiu.ops.fused  # noqa: F401  (importing the fused ops registers their kernels)
import ssiu.ops.fused_esam  # noqa: F401
import ssiu.ops.fused_moe  # noqa: F401
import ssiu.ops.fused_tail  # noqa: F401
from ssiu.testing import OP_PRECISION

# Loosest first; a kernel without a dot (None) constrains nothing.
LOOSENESS = ("tf32", "tf32x3", "ieee")
OP_OF_PREFIX = {
    "layer_norm2d_": "layer_norm",
    "msgm_": "msgm",
    "esam_": "esam",
    "moe_fs_": "moe_fs",
    "upshuffle_": "tail",
    "tail_rgb_": "tail",
}


def _loosest(precisions: set) -> str:
    found = [p for p in LOOSENESS if p in precisions]
    return found[0] if found else "ieee"


def _kernel_precisions() -> dict[tuple[str, str], set]:
    table: dict[tuple[str, str], set] = {}
    for spec in KERNEL_SPECS:
        op = next((o for pre, o in OP_OF_PREFIX.items() if spec.name.startswith(pre)), None)
        if op is None:
            continue
        direction = "bwd" if "_bwd" in spec.name else "fwd"
        for config in spec.configs:
            if getattr(config, "dtype", None) == torch.float32:
                k = config.constexprs
                table.setdefault((op, direction), set()).add(
                    k.get("PRECISION", k.get("DOT_PRECISION"))
                )
    return table


@pytest.mark.parametrize("op", sorted(OP_PRECISION))
def test_op_precision_is_the_loosest_of_its_kernels(op):
    table = _kernel_precisions()
    got = (_loosest(table.get((op, "fwd"), set())), _loosest(table.get((op, "bwd"), set())))
    assert OP_PRECISION[op] == got, f"{op}: table {OP_PRECISION[op]}, kernels {got}"
