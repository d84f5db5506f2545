"""Hyper-parameters of an SSIU network, validated on construction."""

from __future__ import annotations

import dataclasses
import json

SCALES = (2, 3, 4)
# ESAM samples the features at half resolution (sr = 2); SSIU.md fixes it.
SAMPLING_RATIO = 2
# The released network reflect-pads its input to a multiple of this.
PAD_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class SSIUConfig:
    """Shape and sparsity options of SSIU (defaults: the released model).

    scale: upscaling factor, 2, 3 or 4.
    channels: feature channels C (64 released); must split into `heads` heads.
    steps: unfolding steps (SS-ReM blocks), >= 3 (9 released).
    heads: attention heads in ESAM (4 released).
    block: side of the square ESAM query block (8 released).
    halo: key halo around each block (1 released); the key window is block + 2 halo.
    attn_topk: keep the keys whose score is >= the k-th largest per query
        (ties kept); None = dense softmax (released); k >= window**2 is dense too.
    moe_topk: experts kept per channel and pixel in MoE-FS, 1..3 (3 released);
        the kept softmax weights are not renormalised.
    """

    scale: int = 4
    channels: int = 64
    steps: int = 9
    heads: int = 4
    block: int = 8
    halo: int = 1
    attn_topk: int | None = None
    moe_topk: int = 3

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"SSIUConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("scale", "channels", "steps", "heads", "block", "halo", "moe_topk"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool), field, "must be an int")
        need(self.scale in SCALES, "scale", f"must be one of {SCALES}")
        need(self.channels >= 1, "channels", "must be positive")
        need(self.steps >= 3, "steps", "MoE-FS takes three experts, so at least 3 steps")
        need(self.heads >= 1, "heads", "must be positive")
        need(self.channels % self.heads == 0, "heads", f"must divide channels={self.channels}")
        need(self.head_dim % 2 == 0, "heads", "head dim must be even (rel_h, rel_w halves)")
        need(self.block >= 1, "block", "must be positive")
        need(self.halo >= 0, "halo", "must be >= 0")
        need(1 <= self.moe_topk <= 3, "moe_topk", "must be 1, 2 or 3 (there are 3 experts)")
        if self.attn_topk is not None:
            need(
                isinstance(self.attn_topk, int) and not isinstance(self.attn_topk, bool),
                "attn_topk",
                "must be an int or None",
            )
            need(self.attn_topk >= 1, "attn_topk", "must be >= 1 (None means dense)")

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def window(self) -> int:
        """Side of the key window of one query block (block + 2 * halo)."""
        return self.block + 2 * self.halo

    @property
    def keys_per_block(self) -> int:
        return self.window**2

    @property
    def dense_attention(self) -> bool:
        return self.attn_topk is None or self.attn_topk >= self.keys_per_block

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> SSIUConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SSIUConfig fields: {unknown}")
        return cls(**values)
