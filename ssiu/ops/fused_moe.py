"""Fused MoE-FS (Triton): not written yet, so the triton backend runs the reference here."""

from __future__ import annotations

from ssiu.ops.moe import moe_fs_reference


def moe_fs(experts, params, *, topk, residual):
    return moe_fs_reference(experts, params, topk=topk, residual=residual)
