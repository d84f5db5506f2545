"""What training adds around the model: an EMA of its weights, activation checkpointing of
its steps, and the peak memory it used."""

from __future__ import annotations

import copy

import torch

from ssiu.model import SSIU


class EMA:
    """Exponential moving average of a model's weights: ema = decay * ema + (1 - decay) * w.

    Updated after every optimizer step; `model` is an eval-mode copy with no gradients.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def set_activation_checkpointing(model: SSIU, enabled: bool) -> SSIU:
    """Recompute every SS-ReM step in backward (torch.utils.checkpoint, use_reentrant=False).

    Patches each step's `forward` on the instance (no new module, so the state dict is
    unchanged); `enabled=False` restores it. Gradients are identical: nothing in a step
    is random.
    """
    from torch.utils.checkpoint import checkpoint

    for step in model.steps:
        step.__dict__.pop("forward", None)
        if enabled:
            inner = step.forward
            step.forward = lambda a, y, _f=inner: checkpoint(_f, a, y, use_reentrant=False)
    return model


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
