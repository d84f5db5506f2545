"""Fused ESAM (Triton): not written yet, so the triton backend runs the reference here."""

from __future__ import annotations

from ssiu.ops.esam import esam_reference


def esam(v, params, **kwargs):
    return esam_reference(v, params, **kwargs)
