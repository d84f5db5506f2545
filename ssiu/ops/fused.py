"""Fused (Triton) implementations behind the ops; filled in by the kernel issues."""

from __future__ import annotations


def _not_yet(op: str):
    raise NotImplementedError(
        f"backend='triton' has no fused {op} yet; use backend='torch' (or 'auto')"
    )


def layer_norm2d(x, weight, bias, eps):
    _not_yet("layer_norm2d")


def msgm(x, params, residual):
    _not_yet("msgm")
