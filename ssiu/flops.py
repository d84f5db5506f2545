"""Multiply-accumulate counts of SSIU, analytically from the config (no forward pass).

What is counted: one MAC per multiply-add of every convolution (head, the five layers of
every MSGM, ESAM's qkv 1x1 and LocalProp dw3x3, the MoE-FS 1x1s, the tail) and of the
two attention matmuls of ESAM (Q K^T and P V, dense: every query against all
window**2 keys, as the released model computes them). Biases, LayerNorm, GELU, softmax,
max-pool, the relative-position add, the bilinear upsamplings and the residual adds are
elementwise and not counted (together they are under 2% of the total).
`FlopCount.flops` is 2 x MACs.

Spatial size: the network reflect-pads its input to a multiple of 16 and computes
everything on the padded grid, so `padded=True` (default) counts what actually runs.
`padded=False` counts per real LR pixel (H x W), the way many papers report.

The paper's "FLOPs" (1280x720 output) are MACs of exactly these layers; no single rule
reproduces all three figures (computed / paper):

    scale  LR size   padded grid  MACs padded  MACs unpadded  paper
    x2     640x360   640x368      167.2 G      163.5 G        164 G
    x3     427x240   432x240      76.6 G       75.7 G         75 G   (426x240: 75.5 G)
    x4     320x180   320x192      48.9 G       45.8 G         49 G

x4 matches the padded count (what the network runs), x2 and x3 the unpadded one;
2 x MACs (true FLOPs) is twice every paper figure, so "FLOPs" there means MACs.
`torch.utils.flop_counter.FlopCounterMode` on the meta device gives exactly 2 x the
padded count (tests/test_info.py checks it).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from ssiu.config import PAD_MULTIPLE, SAMPLING_RATIO, SSIUConfig
from ssiu.modules import upsample_stages

# LR sizes whose output is 1280x720 (the paper's FLOPs setting), (height, width).
PAPER_LR_SIZES = {2: (360, 640), 3: (240, 427), 4: (180, 320)}
PAPER_GMACS = {2: 164, 3: 75, 4: 49}
PAPER_PARAMS = {2: "778K", 3: "799K", 4: "794K"}

MSGM_PER_STEP = 4
MOE_GATES = 3


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """MACs of one forward pass, by part. `height`, `width`: the LR input."""

    config: SSIUConfig
    height: int
    width: int
    padded: bool
    grid: tuple[int, int]  # the spatial size counted at (padded or not)
    parts: dict[str, int]  # MACs per part, see `count_flops`

    @property
    def macs(self) -> int:
        return sum(self.parts.values())

    @property
    def flops(self) -> int:
        """2 x MACs (one multiply and one add each)."""
        return 2 * self.macs

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.config.scale
        return self.height * s, self.width * s


def _config_of(model_or_config) -> SSIUConfig:
    if isinstance(model_or_config, SSIUConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(config, SSIUConfig):
        return config
    raise TypeError(
        f"expected an SSIU model or an SSIUConfig, got {type(model_or_config).__name__}"
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def count_flops(model_or_config, height: int, width: int, *, padded: bool = True) -> FlopCount:
    """MACs of SSIU on one (3, height, width) LR image; batch N costs N times this.

    parts (MACs): head; msgm (4 per step x 5 layers); esam_qkv; esam_attention (QK^T +
    PV); esam_local_prop (dw3x3 at half resolution); moe (3 gates + fuse); tail.
    padded: count on the grid the network computes on (input reflect-padded to a
    multiple of 16, ESAM's half-resolution grid to whole blocks); False: per real pixel.
    """
    cfg = _config_of(model_or_config)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    c = cfg.channels
    if padded:
        h, w = _round_up(height, PAD_MULTIPLE), _round_up(width, PAD_MULTIPLE)
        pixels = Fraction(h * w)
        # ESAM: max-pool 2x2, then reflect-pad the half grid to whole blocks.
        hb = _round_up(h // SAMPLING_RATIO, cfg.block)
        wb = _round_up(w // SAMPLING_RATIO, cfg.block)
        half = Fraction(hb * wb)
    else:
        h, w = height, width
        pixels = Fraction(h * w)
        half = pixels / SAMPLING_RATIO**2

    msgm = 4 * c * c + 9 * c  # 1x1_a, 1x1_c, 1x1_d, 1x1_o + dw3x3, per pixel
    keys = cfg.keys_per_block
    parts = {
        "head": pixels * 9 * 3 * c,
        "msgm": cfg.steps * MSGM_PER_STEP * msgm * pixels,
        "esam_qkv": cfg.steps * 3 * c * c * half,
        # every query (one per half-resolution pixel) against `keys` keys, all heads:
        "esam_attention": cfg.steps * 2 * keys * c * half,
        "esam_local_prop": cfg.steps * 9 * c * half,
        "moe": (MOE_GATES + 1) * c * c * pixels,
    }
    tail, area = Fraction(0), pixels
    for r in upsample_stages(cfg.scale):
        tail += area * c * c * r * r  # 1x1 C -> C r^2 at the current resolution
        area *= r * r
    tail += area * 9 * c * 3  # 3x3 C -> 3 at the output resolution
    parts["tail"] = tail
    return FlopCount(
        config=cfg, height=height, width=width, padded=padded, grid=(h, w),
        parts={k: round(v) for k, v in parts.items()},
    )  # fmt: skip


def count_flops_traced(model_or_config, height: int, width: int) -> int:
    """FLOPs (2 x MACs of conv and matmul) measured by FlopCounterMode on the meta device.

    Builds a meta-device copy of the architecture (no memory, no compute): a cross-check
    of `count_flops(..., padded=True).flops`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssiu.model import SSIU

    cfg = _config_of(model_or_config)
    with torch.device("meta"):
        model = SSIU(cfg)
        x = torch.empty(1, 3, height, width)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


__all__ = [
    "PAPER_GMACS",
    "PAPER_LR_SIZES",
    "PAPER_PARAMS",
    "FlopCount",
    "count_flops",
    "count_flops_traced",
]
