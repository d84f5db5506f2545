"""Which implementation an op runs: the reference ("torch") or the fused kernels ("triton")."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton", "auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, x: torch.Tensor) -> str:
    """Map "auto" to "triton" on CUDA and "torch" elsewhere; check that "triton" can run."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not x.is_cuda and not interpreter_enabled() and x.device.type != "meta":
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing ssiu (slow, for testing), or use "
                "backend='torch' / 'auto'"
            )
    return backend
