"""Input checks shared by the public ops: clear messages, no device synchronisation."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_feature_map(name: str, x: torch.Tensor, channels: int | None = None, min_size: int = 1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({FLOAT_DTYPES}), got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected {channels}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{name} is {x.shape[-2]}x{x.shape[-1]}; this op needs at least "
            f"{min_size}x{min_size} (reflect padding)"
        )


def check_param(name: str, x: torch.Tensor, like: torch.Tensor, shape: tuple | None = None):
    """A weight must sit on the input's device (and have `shape` if given).

    Its dtype may differ from the input's: under autocast fp32 weights meet bf16 inputs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, the input on {like.device}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
