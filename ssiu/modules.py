"""The building blocks of SSIU as nn.Modules: they own the parameters and call `ssiu.ops`.

Every module has a `backend` attribute ("torch", "triton" or "auto") that it passes to its
op; `SSIU.set_backend` sets it everywhere. It is not state: the state dict never changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ssiu import ops
from ssiu.config import SSIUConfig


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


def conv3x3_reflect(cin: int, cout: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect", groups=groups)


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels, eps 1e-6, biased variance, affine."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm2d(x, self.weight, self.bias, backend=self.backend)


class MSGM(nn.Module):
    """Mixed-scale gating module: out(GELU(gate(x)) * reduce(depthwise(expand(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = conv1x1(channels, channels)
        self.expand = conv1x1(channels, channels)
        self.depthwise = conv3x3_reflect(channels, channels, groups=channels)
        self.reduce = conv1x1(channels, channels)
        self.out = conv1x1(channels, channels)
        self.backend = "torch"

    def params(self) -> ops.MSGMParams:
        layers = (self.gate, self.expand, self.depthwise, self.reduce, self.out)
        return ops.MSGMParams(*(t for layer in layers for t in (layer.weight, layer.bias)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.msgm(x, self.params(), residual, backend=self.backend)


class ESAM(nn.Module):
    """Efficient sparse attention: top-k halo-block attention at half resolution."""

    def __init__(self, config: SSIUConfig):
        super().__init__()
        c, d = config.channels, config.head_dim
        self.heads, self.block, self.halo = config.heads, config.block, config.halo
        self.topk = config.attn_topk
        self.qkv = conv1x1(c, 3 * c, bias=False)
        self.rel_h = nn.Parameter(torch.randn(config.window, d // 2) * d**-0.5)
        self.rel_w = nn.Parameter(torch.randn(config.window, d // 2) * d**-0.5)
        self.local_prop = conv3x3_reflect(c, c, groups=c)
        self.backend = "torch"

    def params(self) -> ops.ESAMParams:
        return ops.ESAMParams(
            self.qkv.weight, self.rel_h, self.rel_w, self.local_prop.weight, self.local_prop.bias
        )

    def forward(self, v: torch.Tensor, add_input: bool = True) -> torch.Tensor:
        return ops.esam(
            v, self.params(), heads=self.heads, block=self.block, halo=self.halo,
            topk=self.topk, add_input=add_input, backend=self.backend,
        )  # fmt: skip


class SSReMStep(nn.Module):
    """One unfolding step (SS-ReM): S1, S2, S3.a, S3.b and the feed-forward MSGM.

    With backend "torch" the submodules run one by one (each with its own backend); with
    "triton" or "auto" the whole step is one op (`ops.ssrem_step`: fused on CUDA, with
    the step's additions inside the kernels). `SSIU` runs all its steps as one op
    (`ops.ssrem_body`) when each has the same fused backend and no hook.
    """

    def __init__(self, config: SSIUConfig):
        super().__init__()
        c = config.channels
        self.norm = LayerNorm2d(c)
        self.msgm_z = MSGM(c)  # S1
        self.msgm_beta = MSGM(c)  # S2
        self.esam = ESAM(config)  # S3.a
        self.msgm_refine = MSGM(c)  # S3.b
        self.msgm_ffn = MSGM(c)
        self.backend = "torch"

    def params(self) -> ops.StepParams:
        return ops.StepParams(
            self.norm.weight, self.norm.bias, self.msgm_z.params(), self.msgm_beta.params(),
            self.esam.params(), self.msgm_refine.params(), self.msgm_ffn.params(),
        )  # fmt: skip

    def geometry(self) -> ops.ESAMGeometry:
        esam = self.esam
        return ops.ESAMGeometry(esam.heads, esam.block, esam.halo, esam.topk)

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch":
            return ops.ssrem_step(a, y, self.params(), self.geometry(), backend=self.backend)
        a_n = self.norm(a)
        z = self.msgm_z(a_n)
        beta = self.msgm_beta(a_n)
        v = self.esam(a_n + z + y)
        a = self.msgm_refine(v - beta, residual=beta)
        return self.msgm_ffn(a, residual=a)


class MoEFS(nn.Module):
    """Mixture-of-experts feature selector over three expert feature maps."""

    def __init__(self, config: SSIUConfig):
        super().__init__()
        c = config.channels
        self.gates = nn.ModuleList(conv1x1(c, c) for _ in range(ops.moe.NUM_EXPERTS))
        self.fuse = conv1x1(c, c)
        self.topk = config.moe_topk
        self.backend = "torch"

    def params(self) -> ops.MoEParams:
        return ops.MoEParams(
            tuple(g.weight for g in self.gates),
            tuple(g.bias for g in self.gates),
            self.fuse.weight,
            self.fuse.bias,
        )

    def forward(self, experts, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.moe_fs(
            tuple(experts), self.params(), topk=self.topk, residual=residual,
            backend=self.backend,
        )  # fmt: skip


def upsample_stages(scale: int) -> tuple[int, ...]:
    """PixelShuffle factors of the tail: x4 is two x2 stages, x2 and x3 one stage."""
    return (2, 2) if scale == 4 else (scale,)


class Tail(nn.Module):
    """(1x1 C -> C*r*r, PixelShuffle(r), GELU) per stage, then a reflect 3x3 to RGB."""

    def __init__(self, config: SSIUConfig):
        super().__init__()
        c = config.channels
        self.factors = upsample_stages(config.scale)
        self.upsample = nn.ModuleList(conv1x1(c, c * r * r) for r in self.factors)
        self.to_rgb = conv3x3_reflect(c, 3)
        self.backend = "torch"

    def params(self) -> ops.TailParams:
        return ops.TailParams(
            tuple(conv.weight for conv in self.upsample),
            tuple(conv.bias for conv in self.upsample),
            self.to_rgb.weight,
            self.to_rgb.bias,
        )

    def forward(
        self, f: torch.Tensor, skip: torch.Tensor | None = None, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RGB at the output size from features f, plus `skip` (the upsampled input) or
        plus the input `image` upsampled bilinearly (the fused kernels do it in place)."""
        return ops.tail(f, self.params(), factors=self.factors, skip=skip, image=image,
                        backend=self.backend)  # fmt: skip
