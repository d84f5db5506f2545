"""Which implementation an op runs: the reference ("torch") or the fused kernels ("triton")."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# Decided once at import: resolve() runs inside compiled graphs, where a cached call
# would make Dynamo warn on every trace.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, x: torch.Tensor, unsupported=None) -> str:
    """Map "auto" to "triton" on CUDA and "torch" elsewhere; check that "triton" can run.

    unsupported: a callable giving the reason the fused kernels cannot run this input, or
    None; "auto" then falls back to the reference, while "triton" raises that reason.
    """
    check_backend(backend)
    if backend == "auto":
        fused = x.is_cuda and TRITON_AVAILABLE
        return "triton" if fused and (unsupported is None or unsupported() is None) else "torch"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not x.is_cuda and not interpreter_enabled() and x.device.type != "meta":
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing ssiu (slow, for testing), or use "
                "backend='torch' / 'auto'"
            )
    return backend


# The fused twin of each reference op, by name. A reference op file reaches its twin only
# through `fused()`, at run time, when the fused path is asked for (the twin imports
# triton); the twin imports the reference's params type. So imports run one way:
# fused_* -> reference op, never back.
FUSED_MODULES = {
    "layer_norm": "ssiu.ops.fused",
    "msgm": "ssiu.ops.fused",
    "esam": "ssiu.ops.fused_esam",
    "moe": "ssiu.ops.fused_moe",
    "tail": "ssiu.ops.fused_tail",
    "step": "ssiu.ops.fused_step",
    "body": "ssiu.ops.fused_body",
}


def fused(op: str):
    """The module of `op`'s fused kernels (imported on first use). Plain import statements,
    not importlib: Dynamo traces them inside fullgraph compiled code."""
    if op in ("layer_norm", "msgm"):
        from ssiu.ops import fused as module
    elif op == "esam":
        from ssiu.ops import fused_esam as module
    elif op == "moe":
        from ssiu.ops import fused_moe as module
    elif op == "tail":
        from ssiu.ops import fused_tail as module
    elif op == "step":
        from ssiu.ops import fused_step as module
    elif op == "body":
        from ssiu.ops import fused_body as module
    else:
        raise ValueError(f"no fused kernels for op {op!r}; known: {sorted(FUSED_MODULES)}")
    return module
