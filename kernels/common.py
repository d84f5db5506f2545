"""Helpers shared by the kernel launchers: output allocation, program counts, type names.

Environment variables read here (at call time, so tests can flip them):

| variable | effect |
|---|---|
| `SSIU_POISON_EMPTY=1` | launcher-allocated buffers start as NaN (catches unwritten elements) |

The test suite sets it for every test (tests/conftest.py); `ssiu.testing.poison_empty` sets
it for a block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
from ssiu.kernels.registry import KernelConfig

# Triton pointer type names per torch dtype, for the ahead-of-time signatures in the registry.
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(TRITON_TYPE)


def poison_enabled() -> bool:
    return os.environ.get("SSIU_POISON_EMPTY", "0") not in ("", "0")


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, NaN-filled (integers: their maximum) when SSIU_POISON_EMPTY=1 (tests
    catch unwritten elements)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max)
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# SMs and compute capability ("sms", "arch") of the GPU modelled while launches are
# captured, not run (ssiu.launch_capture, ssiu check-kernels); None: the real device's.
_modelled: dict[str, int | None] = {"sms": None, "arch": None}
# The architecture the launch configs are tuned for (H100/H200), used where no GPU is:
# the interpreter runs any config, so CPU tests exercise what sm_90 runs.
TUNED_ARCH = 90


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """Compute capability (e.g. 90, 80) the launch configs are chosen for: the modelled
    one while launches are captured, the device's on CUDA, else TUNED_ARCH."""
    if _modelled["arch"] is not None:
        return _modelled["arch"]
    if device.type == "cuda":
        return _capability(device.index if device.index is not None else 0)
    return TUNED_ARCH


@contextlib.contextmanager
def _modelling(key: str, value: int):
    outer, _modelled[key] = _modelled[key], value
    try:
        yield
    finally:
        _modelled[key] = outer


def modelled_arch(arch: int):
    """Within the block, `device_arch` answers `arch` (configs chosen for that GPU)."""
    return _modelling("arch", arch)


def modelled_sm_count(sms: int):
    """Within the block, `max_programs` counts programs for a GPU with `sms` SMs."""
    return _modelling("sms", sms)


def modelling_gpu() -> bool:
    """Whether a GPU is modelled (launches captured, not run: `modelled_arch` or
    `modelled_sm_count` active): launchers then pick what they would pick on CUDA."""
    return any(v is not None for v in _modelled.values())


def max_programs(device: torch.device) -> int:
    """How many programs a persistent (tile-looping) launch starts at most.

    On CUDA a few per SM, enough to fill the GPU while keeping the per-program
    weight-gradient partials small. Under the interpreter programs run one after
    another, so a handful suffices and makes the tests exercise the tile loop.
    """
    return per_sm_programs(device, 4)


def per_sm_programs(device: torch.device, per_sm: int) -> int:
    """per_sm programs per SM of the device (or of the modelled GPU, see
    `modelled_sm_count`); under the interpreter 4, so tests run the tile loops."""
    if _modelled["sms"] is not None:
        return per_sm * _modelled["sms"]
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else 0)
    return 4


def needs_int64_index(*maps: torch.Tensor | None) -> bool:
    """Whether an offset inside one image (N fixed) of any (N, C, H, W) map, or of a
    contiguous map of the same shape, can reach 2**31: then kernels index in int64.

    The image index and image base offsets are int64 in every kernel variant.
    """
    limit = 2**31 - 1
    for t in maps:
        if t is None:
            continue
        _, c, h, w = t.shape
        dims = zip(t.shape[1:], t.stride()[1:], strict=True)
        extent = sum((size - 1) * abs(stride) for size, stride in dims)
        if max(extent, c * h * w) >= limit:
            return True
    return False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class DtypeConfig(KernelConfig):
    """A KernelConfig that also names the activation dtype it is compiled for.

    The kernels take their dtype from their pointers (no DTYPE constexpr), so the
    registry signature (see `dtype_signature`) reads it from here.
    """

    dtype: torch.dtype = torch.float32
    # Pointers named here are fp32 even where the signature says "dt": a 16-bit kernel
    # reading or writing one fp32 map (the tail's output and its gradient under autocast).
    fp32_pointers: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: KernelConfig, dtype: torch.dtype, extra: dict | None = None,
           fp32_pointers: tuple[str, ...] = ()):  # fmt: skip
        constexprs = {**config.constexprs, **(extra or {})}
        return cls(constexprs, config.num_warps, config.num_stages, maxnreg=config.maxnreg,
                   archs=config.archs, dtype=dtype, fp32_pointers=fp32_pointers)  # fmt: skip


def dtype_signature(pointers, scalars, floats=(), wide=()):
    """Registry signature: pointers [name] are fp32, [name, "dt"] the config's dtype,
    [name, "u8"] uint8 (a config's `fp32_pointers` are fp32); `scalars` are i32 and
    `floats` fp32 arguments (in the kernel's argument order).
    Scalars also named in `wide` (strides) are i64 in configs with INT64_INDEX=True,
    the variant launchers pick when an image's offsets reach 2**31, where strides do too.
    """

    def signature(config: DtypeConfig) -> dict:
        dt = TRITON_TYPE[config.dtype]
        sig = {p[0]: "*" + {"dt": dt, "u8": "u8"}.get("".join(p[1:]), "fp32") for p in pointers}
        sig.update(dict.fromkeys(config.fp32_pointers, "*fp32"))
        int64 = config.constexprs.get("INT64_INDEX", False)
        sig.update({s: "i64" if int64 and s in wide else "i32" for s in scalars})
        sig.update(dict.fromkeys(floats, "fp32"))
        return sig

    return signature


# The channel widths the fused ops accept: exactly those `ssiu check-kernels` compiles
# (64 in the canonical workloads, 16 and 32 in its width workloads, which the CPU tests
# run). Others fall back to the reference under backend "auto" and raise under "triton":
# at C = 128 two [C, C] fp32 accumulators would run unchecked configs.
SUPPORTED_CHANNELS = (16, 32, 64)


def channels_supported(channels: int, dtype: torch.dtype) -> bool:
    """A kernel dtype and a compile-checked channel width (SUPPORTED_CHANNELS)."""
    return dtype in KERNEL_DTYPES and channels in SUPPORTED_CHANNELS


def image_offsets_fit(t: torch.Tensor) -> bool:
    """Whether every offset inside one image of t (N, C, H, W) fits in int32.

    Kernels that address inside an image with int32 (and across images with int64) need it.
    """
    extent = zip(t.shape[1:], t.stride()[1:], strict=True)
    return sum((size - 1) * abs(stride) for size, stride in extent) < 2**31


def tensors_device(*args) -> torch.device | None:
    """The one device of the tensors among args (lists and tuples searched too), or None.

    Raises ValueError naming the devices when the tensors of one op are on several.
    """
    found: dict[torch.device, int] = {}
    stack = list(args)
    while stack:
        a = stack.pop(0)
        if isinstance(a, torch.Tensor):
            found.setdefault(a.device, len(found))
        elif isinstance(a, (list, tuple)):
            stack[:0] = list(a)
    if len(found) > 1:
        raise ValueError(
            "the fused op's tensors are on different devices: "
            + ", ".join(str(d) for d in found)
            + "; move them to one device"
        )
    return next(iter(found), None)


def device_guard(device: torch.device | None):
    """Launches inside run on `device` (Triton launches on the current CUDA device)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """Decorate a custom op's implementation: its kernels launch on its tensors' device,
    and tensors on several devices raise ValueError. torch.library reads the schema from
    the signature, which keeps fn's parameters with their annotations resolved."""
    import inspect

    @functools.wraps(fn)
    def run_on_device(*args, **kwargs):
        with device_guard(tensors_device(*args, *kwargs.values())):
            return fn(*args, **kwargs)

    run_on_device.__signature__ = inspect.signature(fn, eval_str=True)
    return run_on_device
