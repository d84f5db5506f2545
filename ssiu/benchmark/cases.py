"""The ops the benchmark runs; each case is a few lines (see `harness.Case`).

Shapes are (batch, channels, height, width) of the feature map an op sees (for the
tail: its low-resolution input features): "train" is the released training step (batch
40 of 64x64 LR patches, C = 64), "infer" the paper's x4 inference setting (one 320x180
LR image, output 1280x720), "quick" a tiny CPU-sized one.

FLOPs (for the roofline) count 2 x the multiply-adds of the convolutions and matmuls, as
`ssiu.flops` does for the whole network; elementwise work (LayerNorm, GELU, softmax,
pooling, interpolation, adds) is not counted. ESAM's attention is counted dense (every
query against all window**2 keys) with top-k too: the scores are all computed before
the selection.
"""

from __future__ import annotations

import torch

from ssiu import ops
from ssiu.benchmark.harness import Case, register_case
from ssiu.config import SAMPLING_RATIO
from ssiu.modules import upsample_stages

SHAPES = {"train": (40, 64, 64, 64), "infer": (1, 64, 180, 320), "quick": (2, 64, 16, 16)}
SCALE = 4  # the tail case: x4, two x2 PixelShuffle stages
ESAM_OPTIONS = dict(heads=4, block=8, halo=1)


def _generator() -> torch.Generator:
    # Inputs are drawn on the CPU so every device and dtype sees the same numbers.
    return torch.Generator(device="cpu").manual_seed(0)


def _randn(gen, shape, dtype, device, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(
        device=device, dtype=dtype
    )


def _maker(gen, dtype, device):
    return lambda s, scale=1.0, shift=0.0: _randn(gen, s, dtype, device, scale, shift)


def _pixels(shape) -> int:
    n, _, h, w = shape
    return n * h * w


# --- MSGM ---------------------------------------------------------------------------


def msgm_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    c = shape[1]
    t = _maker(_generator(), dtype, device)
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


def msgm_flops(shape) -> int:
    c = shape[1]
    return 2 * _pixels(shape) * (4 * c * c + 9 * c)  # four 1x1s + dw3x3 (ssiu.flops)


# --- LayerNorm ----------------------------------------------------------------------


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


# --- ESAM ---------------------------------------------------------------------------


def esam_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    c = shape[1]
    t = _maker(_generator(), dtype, device)
    win = ESAM_OPTIONS["block"] + 2 * ESAM_OPTIONS["halo"]
    half_d = c // ESAM_OPTIONS["heads"] // 2
    params = ops.ESAMParams(
        qkv_weight=t((3 * c, c, 1, 1), c**-0.5),
        rel_h=t((win, half_d), 0.1),
        rel_w=t((win, half_d), 0.1),
        prop_weight=t((c, 1, 3, 3), 1 / 3),
        prop_bias=t((c,), 0.1),
    )
    return {"v": t(shape), **params._asdict()}


def _esam_op(topk):
    def op(inputs, backend):
        params = ops.ESAMParams(*(inputs[name] for name in ops.ESAMParams._fields))
        return ops.esam(inputs["v"], params, topk=topk, backend=backend, **ESAM_OPTIONS)

    return op


def esam_flops(shape) -> int:
    n, c, h, w = shape
    block, win = ESAM_OPTIONS["block"], ESAM_OPTIONS["block"] + 2 * ESAM_OPTIONS["halo"]
    up = lambda v: -(-v // block) * block
    half = n * up(h // SAMPLING_RATIO) * up(w // SAMPLING_RATIO)  # padded to whole blocks
    # qkv 1x1, Q K^T and P V over win**2 keys (all heads), LocalProp dw3x3 (ssiu.flops)
    return 2 * half * (3 * c * c + 2 * win * win * c + 9 * c)


# --- MoE-FS -------------------------------------------------------------------------


def moe_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    c = shape[1]
    t = _maker(_generator(), dtype, device)
    inputs = {f"expert{i}": t(shape) for i in range(3)}
    inputs["residual"] = t(shape)
    for i in range(3):
        inputs[f"gate_weight{i}"] = t((c, c, 1, 1), c**-0.5)
        inputs[f"gate_bias{i}"] = t((c,), 0.1)
    inputs["fuse_weight"] = t((c, c, 1, 1), c**-0.5)
    inputs["fuse_bias"] = t((c,), 0.1)
    return inputs


def moe_op(inputs, backend):
    params = ops.MoEParams(
        gate_weights=tuple(inputs[f"gate_weight{i}"] for i in range(3)),
        gate_biases=tuple(inputs[f"gate_bias{i}"] for i in range(3)),
        fuse_weight=inputs["fuse_weight"],
        fuse_bias=inputs["fuse_bias"],
    )
    experts = tuple(inputs[f"expert{i}"] for i in range(3))
    return ops.moe_fs(experts, params, residual=inputs["residual"], backend=backend)


def moe_flops(shape) -> int:
    c = shape[1]
    return 2 * _pixels(shape) * 4 * c * c  # three gate 1x1s + the fuse 1x1


# --- Tail (x4) ----------------------------------------------------------------------


def tail_inputs(shape, dtype, device) -> dict[str, torch.Tensor]:
    n, c, h, w = shape
    t = _maker(_generator(), dtype, device)
    inputs = {"f": t(shape), "skip": t((n, 3, h * SCALE, w * SCALE), 0.5, 0.5)}
    for i, r in enumerate(upsample_stages(SCALE)):
        inputs[f"up_weight{i}"] = t((c * r * r, c, 1, 1), c**-0.5)
        inputs[f"up_bias{i}"] = t((c * r * r,), 0.1)
    inputs["rgb_weight"] = t((3, c, 3, 3), (9 * c) ** -0.5)
    inputs["rgb_bias"] = t((3,), 0.1)
    return inputs


def tail_op(inputs, backend):
    stages = range(len(upsample_stages(SCALE)))
    params = ops.TailParams(
        up_weights=tuple(inputs[f"up_weight{i}"] for i in stages),
        up_biases=tuple(inputs[f"up_bias{i}"] for i in stages),
        rgb_weight=inputs["rgb_weight"],
        rgb_bias=inputs["rgb_bias"],
    )
    return ops.tail(
        inputs["f"], params, factors=upsample_stages(SCALE), skip=inputs["skip"], backend=backend
    )


def tail_flops(shape) -> int:
    c, area, macs = shape[1], _pixels(shape), 0
    for r in upsample_stages(SCALE):
        macs += area * c * c * r * r  # 1x1 C -> C r^2 at the current resolution
        area *= r * r
    return 2 * (macs + area * 9 * c * 3)  # + the 3x3 C -> 3 at the output (ssiu.flops)


MSGM = register_case(Case("msgm", msgm_inputs, msgm_op, SHAPES, msgm_flops))
LAYER_NORM = register_case(Case("layer_norm2d", layer_norm_inputs, layer_norm_op, SHAPES))
ESAM = register_case(Case("esam", esam_inputs, _esam_op(None), SHAPES, esam_flops))
ESAM_TOP16 = register_case(Case("esam_top16", esam_inputs, _esam_op(16), SHAPES, esam_flops))
MOE = register_case(Case("moe_fs", moe_inputs, moe_op, SHAPES, moe_flops))
TAIL = register_case(Case("tail_x4", tail_inputs, tail_op, SHAPES, tail_flops))
