"""The ops the benchmark runs; each case is a few lines (see `bench.harness.Case`).

Shapes are (batch, channels, height, width) of the feature map an op sees:
"train" is the released training step (batch 40 of 64x64 LR patches, C = 64),
"quick" a small CPU-sized one.
"""

from __future__ import annotations

import torch

from bench.harness import Case, register_case
from ssiu import ops

SHAPES = {"train": (40, 64, 64, 64), "quick": (2, 64, 32, 32)}


def _generator() -> torch.Generator:
    # Inputs are drawn on the CPU so every device and dtype sees the same numbers.
    return torch.Generator(device="cpu").manual_seed(0)


def _randn(gen, shape, dtype, device, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(
        device=device, dtype=dtype
    )


def msgm_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    n, c, h, w = shape
    gen = _generator()
    t = lambda s, scale=1.0, shift=0.0: _randn(gen, s, dtype, device, scale, shift)
    conv = lambda: t((c, c, 1, 1), c**-0.5)  # keeps activations O(1) through the 1x1s
    bias = lambda: t((c,), 0.1)
    weights = ops.MSGMParams(
        gate_weight=conv(), gate_bias=bias(),
        expand_weight=conv(), expand_bias=bias(),
        depthwise_weight=t((c, 1, 3, 3), 1 / 3), depthwise_bias=bias(),
        reduce_weight=conv(), reduce_bias=bias(),
        out_weight=conv(), out_bias=bias(),
    )  # fmt: skip
    return {"x": t(shape), "residual": t(shape), **weights._asdict()}


def msgm_op(inputs, backend):
    params = ops.MSGMParams(*(inputs[name] for name in ops.MSGMParams._fields))
    return ops.msgm(inputs["x"], params, inputs["residual"], backend=backend)


def layer_norm_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    c = shape[1]
    gen = _generator()
    return {
        "x": _randn(gen, shape, dtype, device, 2.0, 0.5),
        "weight": _randn(gen, (c,), dtype, device, 0.1, 1.0),
        "bias": _randn(gen, (c,), dtype, device, 0.1),
    }


def layer_norm_op(inputs, backend):
    return ops.layer_norm2d(inputs["x"], inputs["weight"], inputs["bias"], backend=backend)


MSGM = register_case(Case("msgm", msgm_inputs, msgm_op, SHAPES))
LAYER_NORM = register_case(Case("layer_norm2d", layer_norm_inputs, layer_norm_op, SHAPES))
