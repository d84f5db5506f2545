"""GPU checks of the fused path as a whole (marked `gpu`, skipped without CUDA).

What the per-op GPU tests (tests/test_fused_*.py) do not cover: the released x4 model
fused end to end in fp32/bf16/fp16 at C = 64, the top-k keep set being the same in the
forward and the backward, bit-identical gradients on two runs, the device guard on a
second GPU, fp16 on real photographs, and the CUDA-graph inference path.

`make gpu-check DRY=1` (bench/gpu_check.py) runs this file on the CPU with
SSIU_GPU_DRY=1: the tests are then not marked `gpu`, run through the Triton interpreter
at toy sizes (C = 16, one head, 3 unfolding steps, fp32/fp16), so a broken test is caught
before a GPU is lent. Comparisons use the relative norm error ||got - ref|| / ||ref||
against a float64 reference, bounded by twice the error of the reference itself run in
the same dtype plus a small floor: the fused path must be about as close as eager.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import ssiu
from ssiu import ops

DRY = os.environ.get("SSIU_GPU_DRY") == "1"
pytestmark = [] if DRY else [pytest.mark.gpu]
DEVICE = torch.device("cpu" if DRY else "cuda")
# The released width on a GPU; toy sizes through the interpreter in the dry run.
C, HEADS, STEPS, SCALE = (16, 1, 3, 2) if DRY else (64, 4, 9, 4)
DTYPES = [torch.float32] if DRY else [torch.float32, torch.bfloat16, torch.float16]
# Floors of the relative norm error (fp32 on a GPU: TF32 dots in eager and fused alike).
FLOOR = {torch.float32: 1e-5 if DRY else 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (inf when got has NaN/inf)."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def model(**options) -> ssiu.SSIU:
    torch.manual_seed(0)
    return ssiu.build(SCALE, channels=C, heads=HEADS, steps=STEPS, **options).to(DEVICE)


def out_and_grads(net, x, dout):
    x = x.detach().requires_grad_()
    out = net(x)
    grads = torch.autograd.grad(out, [x, *net.parameters()], dout.to(out.dtype))
    return [out, *grads]


# Measured on the H200 (bench/reports/nvidia-h200/rerun): in fp32 the fused model's
# gradients are about 3x further from float64 than eager's on 374 of 441 tensors, and the
# gpu-check bisect (only some modules fused) puts it on MSGM alone (259 tensors over, the
# others none): its fp32 backward runs its 1x1 dots as one TF32 product, forward recompute
# included. Kept visible as an expected failure until an fp32 backward of about fp32
# accuracy is measured (README, "Measured on a GPU").
FP32_MSGM_GAP = pytest.mark.xfail(
    not DRY, reason="fused MSGM fp32 backward (TF32) ~3x eager's error (H200, measured)"
)


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(d, marks=FP32_MSGM_GAP) if d == torch.float32 else d for d in DTYPES],
    ids=str,
)
def test_released_model_fused_about_as_close_as_eager(dtype):
    """Output and every gradient (input, each parameter) of the whole fused model against
    float64, no further from it than twice the eager reference in the same dtype."""
    base = model(attn_topk=16)
    gen = torch.Generator().manual_seed(1)
    n, hw = (1, (9, 11)) if DRY else (2, (37, 45))
    x = torch.rand(n, 3, *hw, generator=gen, dtype=torch.float64).to(DEVICE)
    dout = torch.randn(n, 3, SCALE * hw[0], SCALE * hw[1], generator=gen, dtype=torch.float64)
    ref = out_and_grads(copy.deepcopy(base).double().set_backend("torch"), x, dout.to(DEVICE))
    runs = {
        backend: out_and_grads(
            copy.deepcopy(base).to(dtype).set_backend(backend), x.to(dtype), dout.to(DEVICE)
        )
        for backend in ("torch", "triton")
    }
    names = ["output", "input", *(n for n, _ in base.named_parameters())]
    bad = []
    for i, name in enumerate(names):
        eager, fused = rel_err(runs["torch"][i], ref[i]), rel_err(runs["triton"][i], ref[i])
        # An eager run that overflows (error ~1 or inf) does not excuse the fused one. Below
        # that, eager's own error is the yardstick: on the H200, steps.6.esam.rel_h (a sum
        # over every query of a top-16 attention) is 10-15% off float64 in eager bf16 (it
        # varies run to run: cuDNN's algorithms) and 24-25% in the fused model.
        eager = min(eager, 0.5)
        if not fused <= 2 * eager + FLOOR[dtype]:
            bad.append(f"{name}: fused {fused:.3g} vs eager {eager:.3g}")
    assert not bad, f"{len(bad)} of {len(names)} tensors too far from float64: {bad[:8]}"


def esam_params(gen, dtype):
    d, win = C // HEADS, 10
    t = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(DEVICE, dtype)
    return ops.ESAMParams(
        qkv_weight=t(3 * C, C, 1, 1, s=C**-0.5), rel_h=t(win, d // 2, s=0.5),
        rel_w=t(win, d // 2, s=0.5), prop_weight=t(C, 1, 3, 3, s=1 / 3), prop_bias=t(C, s=0.1),
    )  # fmt: skip


def shift_residual(dtype, topk) -> float:
    """How far the fused ESAM backward is from softmax shift invariance, per query.

    Every key (zero-padded ones included) gets the same first channel of each head: its
    k part is zeroed in the qkv weight and rel_h[:, 0] = 1. Adding q[0] to all scores of
    a query changes neither the softmax nor the top-k set, so dL/dq[0] = scale * sum_j dS_j
    is exactly 0 for every query, and so is the q[0] row of d qkv_weight. That holds only
    if the backward keeps the very keys the forward kept (and renormalises with the
    forward's log-sum-exp): a key kept in one and not in the other leaves ~P_j of it.
    Returns the largest such row's norm over the median norm of the other q rows.
    """
    gen = torch.Generator().manual_seed(2)
    d = C // HEADS
    p = esam_params(gen, dtype)
    w = p.qkv_weight.clone()
    first = torch.arange(HEADS, device=DEVICE) * d
    w[C + first] = 0  # k channel 0 of every head
    rel_h = p.rel_h.clone()
    rel_h[:, 0] = 1
    n, hw = (1, 16) if DRY else (8, 64)
    v = torch.randn(n, C, hw, hw, generator=gen).to(DEVICE, dtype).requires_grad_()
    params = p._replace(qkv_weight=w.requires_grad_(), rel_h=rel_h)
    out = ops.esam(v, params, heads=HEADS, topk=topk, backend="triton")
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    (dw,) = torch.autograd.grad(out, [params.qkv_weight], dout)
    rows = dw[:C].reshape(C, C).double().norm(dim=1)
    others = torch.ones(C, dtype=torch.bool, device=DEVICE)
    others[first] = False
    return float(rows[first].max() / rows[others].median())


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("topk", [16] if DRY else [16, 50])
def test_topk_keep_set_same_in_forward_and_backward(dtype, topk):
    """The shift-invariance residual with top-k is at the level of dense attention (no
    keep set at all): forward and backward select the same keys for every query."""
    dense = shift_residual(dtype, None)
    sparse = shift_residual(dtype, topk)
    assert sparse <= 10 * dense + (1e-5 if dtype == torch.float32 else 1e-3), (sparse, dense)


def test_keep_set_check_catches_a_planted_mismatch(monkeypatch):
    """The check above fails when the backward keeps other keys than the forward: here
    the backward gets thresholds of -inf (the forward's are saved after its log-sum-exps
    in lse), so it keeps every key. (On a CPU: 1e-6 consistent, 0.2 planted.)"""
    from ssiu.ops import fused_esam

    dense = shift_residual(torch.float32, None)
    original = fused_esam.esam_bwd

    def planted(*args):
        *tensors, lse, qkv, heads, block, halo, topk, add_input = args
        lse = lse.clone()
        lse[..., lse.shape[-1] // 2 :] = float("-inf")  # the thresholds
        return original(*tensors, lse, qkv, heads, block, halo, topk, add_input)

    monkeypatch.setattr(fused_esam, "esam_bwd", planted)
    assert shift_residual(torch.float32, 16) > 100 * (10 * dense + 1e-5)


@pytest.mark.parametrize(
    "amp",
    [None] if DRY else [None, torch.bfloat16],
    ids=["fp32", "bf16-autocast"][: 1 if DRY else 2],
)
def test_gradients_bit_identical_on_two_runs(amp, monkeypatch):
    """Deterministic backward: the same step twice gives bit-identical gradients (no float
    atomics whose order varies, e.g. PyTorch's bilinear/reflect-pad backward on CUDA).
    cuDNN is held to its deterministic algorithms, so what is checked is the fused path."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    net = model(attn_topk=16).set_backend("triton")
    gen = torch.Generator().manual_seed(3)
    n, hw = (1, 9) if DRY else (4, 64)
    x = torch.rand(n, 3, hw, hw, generator=gen).to(DEVICE)
    hr = torch.rand(n, 3, SCALE * hw, SCALE * hw, generator=gen).to(DEVICE)

    def grads():
        with torch.autocast(DEVICE.type, dtype=amp, enabled=amp is not None):
            loss = F.l1_loss(net(x).float(), hr)
        return torch.autograd.grad(loss, list(net.parameters()))

    first, second = grads(), grads()
    names = [n for n, _ in net.named_parameters()]
    differ = [n for n, a, b in zip(names, first, second, strict=True) if not torch.equal(a, b)]
    assert not differ, f"gradients differ between two identical runs: {differ}"


@pytest.mark.skipif(DRY or torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_device_guard_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every fused op launches on cuda:1 and
    matches the reference there; the current device is left as it was."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    base = ssiu.build(4, channels=C, heads=HEADS, steps=3, attn_topk=16).to(dev)
    x = torch.rand(2, 3, 20, 28, device=dev)
    dout = torch.randn(2, 3, 80, 112, device=dev)
    ref = out_and_grads(copy.deepcopy(base).set_backend("torch"), x, dout)
    got = out_and_grads(copy.deepcopy(base).set_backend("triton"), x, dout)
    assert torch.cuda.current_device() == 0
    assert all(g.device == dev for g in got)
    errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errs) <= 2e-2, errs  # fp32 with TF32 dots on both sides


def photos(size: int) -> torch.Tensor:
    """Centre crops of three real photographs shipped with scikit-image, (3, 3, s, s)."""
    from skimage import data

    crops = []
    for name in ("astronaut", "chelsea", "coffee"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        h, w = img.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def test_fp16_on_real_photos_does_not_overflow():
    """The fused fp16 forward on real photographs stays finite and close to fp32; the
    largest activation of each unfolding step is reported on failure."""
    base = model(attn_topk=16)
    x = photos(9 if DRY else 128).to(DEVICE)[: 1 if DRY else 3]
    peaks: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            tensors = output if isinstance(output, tuple) else (output,)
            peaks[name] = max(
                float(t.detach().abs().max()) for t in tensors if t.is_floating_point()
            )

        return record

    with torch.inference_mode():
        ref = copy.deepcopy(base).set_backend("torch")(x)
        fp16 = copy.deepcopy(base).half().set_backend("triton")
        for name, module in fp16.named_children():
            module.register_forward_hook(hook(name))
        out = fp16(x.half())
    err = rel_err(out, ref)
    assert err <= 1e-2, f"fp16 fused vs fp32: {err:.3g}; peak |activation| per part: {peaks}"


@pytest.mark.skipif(DRY, reason="CUDA graphs need CUDA")
def test_cuda_graph_inference_matches_eager():
    """The CUDA-graph path (`compile_for_inference(mode="reduce-overhead", static=True)`,
    as `ssiu upscale` uses for tiles) gives the fused eager output on each replay."""
    from ssiu.compile import compile_for_inference

    net = model(attn_topk=16).set_backend("triton")
    fn = compile_for_inference(net, mode="reduce-overhead", static=True)
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):  # warm-up, recording, replays on fresh inputs
            x = torch.rand(1, 3, 48, 64, generator=gen).to(DEVICE)
            out, ref = fn(x), net(x)
            assert rel_err(out, ref) <= 1e-2
