"""The SSIU network (SSIU.md, the paper's Fig. 2) and `build`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssiu import ops
from ssiu.config import PAD_MULTIPLE, SSIUConfig
from ssiu.modules import MoEFS, SSReMStep, Tail, conv3x3_reflect
from ssiu.ops import check_backend
from ssiu.ops.checks import check_feature_map


def min_input_size() -> int:
    """Smallest height/width the released padding accepts.

    The input is reflect-padded on the right/bottom to a multiple of 16, and a reflect
    pad must be shorter than the side it reflects: sides 1..8 would need a pad >= the side.
    """
    return PAD_MULTIPLE // 2 + 1


def check_image_batch(x: torch.Tensor) -> None:
    """Static checks on a model input (no device synchronisation, compile friendly)."""
    check_feature_map("input", x, channels=3)
    h, w = x.shape[-2:]
    if min(h, w) < min_input_size():
        raise ValueError(
            f"input is {h}x{w}; SSIU needs at least {min_input_size()}x{min_input_size()}: "
            f"the released network reflect-pads to a multiple of {PAD_MULTIPLE}, which is "
            "undefined for smaller sides (upscale small images whole, or pad them yourself)"
        )


class SSIU(nn.Module):
    """SSIU super-resolution network; input (N, 3, H, W) in [0, 1], output (N, 3, sH, sW)."""

    def __init__(self, config: SSIUConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.head = conv3x3_reflect(3, c)
        self.steps = nn.ModuleList(SSReMStep(config) for _ in range(config.steps))
        self.moe = MoEFS(config)
        self.tail = Tail(config)
        self.backend = "torch"

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def hyperparameters(self) -> dict:
        """The constructor's settings (the `SSIUConfig` fields) as a plain dict: what spandrel
        compares between a model and the one it loads (its `assert_loads_correctly`)."""
        return self.config.to_dict()

    def set_backend(self, backend: str) -> SSIU:
        """Route every op through "torch" (reference), "triton" (fused) or "auto".

        Changes no parameter and no state-dict key. Returns the model.
        """
        check_backend(backend)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        return self

    def expert_steps(self) -> list[int]:
        """Indices (0-based) of the steps whose outputs MoE-FS selects from (last three)."""
        n = self.config.steps
        chosen = [t for t in range(n) if (t + 1) % (n // 3) == 0 or t + 1 == n]
        return chosen[-3:]

    def _experts(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of the expert steps (`expert_steps`). Training with a fused backend
        on every step, all steps run as one op (`ops.ssrem_body`: the gradient sums over
        the steps ride in the kernels). Otherwise the steps run one by one, keeping only
        the experts: when nothing needs a gradient (each step's saved tensors are then
        freed when it ends, not when the body does), and when a step must run as a module
        (backend "torch", a hook, a patched forward such as activation checkpointing's)."""
        steps, chosen = list(self.steps), self.expert_steps()
        backend = steps[0].backend
        training = y.requires_grad or any(p.requires_grad for p in self.steps.parameters())
        body = backend != "torch" and torch.is_grad_enabled() and training
        if body and all(_runs_as_op(step, backend) for step in steps):
            params = [step.params() for step in steps]
            outs = ops.ssrem_body(y, params, steps[0].geometry(), backend=backend)
            return tuple(outs[t] for t in chosen)
        experts, a = [], y
        for t, step in enumerate(steps):
            a = step(a, y)
            if t in chosen:
                experts.append(a)
        return tuple(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x)
        s = self.config.scale
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        x_p = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        y = self.head(x_p)
        f = self.moe(self._experts(y), residual=y)
        out = self.tail(f, image=x_p)  # + x_p upsampled bilinearly by s
        return out[:, :, : h * s, : w * s]


def _runs_as_op(step: SSReMStep, backend: str) -> bool:
    """Whether `step` may run inside the body op: its backend is `backend` and nothing
    expects its module call (no hook, no forward patched on the instance)."""
    hooked = step._forward_hooks or step._forward_pre_hooks
    return step.backend == backend and not hooked and "forward" not in vars(step)


def build(scale: int = 4, **options) -> SSIU:
    """A freshly initialised SSIU; `options` are `SSIUConfig` fields (channels, steps, ...)."""
    return SSIU(SSIUConfig(scale=scale, **options))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
