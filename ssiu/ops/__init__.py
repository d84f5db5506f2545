"""Functional ops of SSIU: each checks its input, then runs the reference or a fused kernel.

`backend="torch"` runs the plain PyTorch reference (`*_reference`), `"triton"` the fused
custom ops of `ssiu.ops.fused`, `"auto"` triton on CUDA and torch elsewhere.
"""

from ssiu.ops.backend import BACKENDS, check_backend, resolve
from ssiu.ops.esam import ESAMParams, esam, esam_reference, halo_attention_reference
from ssiu.ops.layer_norm import layer_norm2d, layer_norm2d_reference
from ssiu.ops.moe import MoEParams, moe_fs, moe_fs_reference
from ssiu.ops.msgm import MSGMParams, msgm, msgm_reference
from ssiu.ops.step import (
    ESAMGeometry,
    StepParams,
    ssrem_body,
    ssrem_body_reference,
    ssrem_step,
    ssrem_step_reference,
)
from ssiu.ops.tail import TailParams, tail, tail_reference

__all__ = [
    "BACKENDS",
    "ESAMGeometry",
    "ESAMParams",
    "MSGMParams",
    "MoEParams",
    "check_backend",
    "esam",
    "esam_reference",
    "halo_attention_reference",
    "layer_norm2d",
    "layer_norm2d_reference",
    "moe_fs",
    "moe_fs_reference",
    "msgm",
    "msgm_reference",
    "resolve",
    "ssrem_body",
    "ssrem_body_reference",
    "ssrem_step",
    "ssrem_step_reference",
    "StepParams",
    "tail",
    "tail_reference",
    "TailParams",
]
