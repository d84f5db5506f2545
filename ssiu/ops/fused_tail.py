"""Fused upsampling tail (Triton): not written yet, so the triton backend runs the reference."""

from __future__ import annotations

from ssiu.ops.tail import tail_reference


def tail(f, params, *, factors, skip):
    return tail_reference(f, params, factors=factors, skip=skip)
