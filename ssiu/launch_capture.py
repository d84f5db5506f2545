"""Run the fused model with Triton launches recorded instead of executed (no GPU, no memory).

`fake_step(...)` builds SSIU under torch's `FakeTensorMode` (tensors carry shapes, strides
and dtypes but no storage), runs one fused training or inference step at a workload, and
returns a `Capture`:

- `launches`: every Triton kernel launch (`JITFunction.run` / the interpreter's `run`
  replaced by a recorder): the kernel, its arguments, launch options and grid, the custom
  op it ran in, and which pointer arguments it reads and writes;
- `ops`: every PyTorch op that writes memory, outside the custom ops and inside them (the
  launchers' glue), with the bytes it reads and writes;
- `saved`: the tensors autograd saves for backward (saved-tensor hooks), for training.

Fake tensors have no device memory, so the custom ops' fake (meta) implementations would
normally run; a `TorchDispatchMode` routes each `ssiu::` custom op to its real Python
implementation instead, which runs the launchers and so reaches the recorder. Tensors
live on a fake CPU device so that CPU autocast gives the bf16 workloads fp32 master weights
and bf16 activations, as `ssiu train --amp bf16` does on CUDA. `ssiu.kernels.common`'s
program counts model an H100 (132 SMs) meanwhile.

Read/write model of a launch: a pointer argument whose storage was allocated (empty) and
not yet written by an earlier launch is an output (written once); any other is an input
(read once). Each counts its tensor's bytes (its elements x element size).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ssiu.check_kernels import python_function

MODELLED_SM_COUNT = 132  # H100 SXM, the GPU of the performance model (DESIGN.md)

# The canonical workloads (DESIGN.md): keyword arguments of `fake_step`.
WORKLOADS = {
    "train-bf16": dict(train=True, batch=40, size=(64, 64), dtype=torch.bfloat16),
    "infer-bf16": dict(train=False, batch=1, size=(180, 320), dtype=torch.bfloat16),
    "infer-fp32": dict(train=False, batch=1, size=(180, 320), dtype=torch.float32),
}
# The other compile-checked widths (kernels.common.SUPPORTED_CHANNELS; the CPU tests run
# them): small fp32 training steps, heads chosen so that head_dim = 16.
WIDTH_WORKLOADS = {
    f"train-fp32-c{c}": dict(
        train=True, batch=1, size=(32, 32), dtype=torch.float32, channels=c, heads=c // 16
    )
    for c in (16, 32)
}
ALL_WORKLOADS = {**WORKLOADS, **WIDTH_WORKLOADS}

# Ops that allocate without writing, or only read metadata: no memory traffic.
_NO_TRAFFIC = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "device"}


@dataclasses.dataclass
class Launch:
    """One Triton kernel launch, recorded instead of run."""

    kernel: object  # the JITFunction (or InterpretedFunction)
    args: tuple
    kwargs: dict
    grid: object
    op: str | None  # the custom op it ran in
    reads: int = 0  # bytes of the pointer arguments it reads
    writes: int = 0  # bytes of the pointer arguments it writes (fresh buffers)

    @property
    def name(self) -> str:
        return python_function(self.kernel).__name__


@dataclasses.dataclass
class OpRecord:
    """One PyTorch op that writes memory."""

    name: str
    inside: str | None  # the custom op whose implementation ran it, None outside
    reads: int
    writes: int


@dataclasses.dataclass
class Capture:
    launches: list[Launch] = dataclasses.field(default_factory=list)
    ops: list[OpRecord] = dataclasses.field(default_factory=list)
    saved: list[tuple[torch.Size, torch.dtype, int]] = dataclasses.field(default_factory=list)
    inputs_bytes: int = 0  # model input + parameters
    outputs_bytes: int = 0  # model output (+ parameter gradients when training)
    op_boundary_bytes: int = 0  # the ssiu:: custom ops' tensor inputs and outputs, once each


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write all of t: its elements, or the elements
    its view spans if fewer (a broadcast view); a view with gaps (a column block of a
    packed partials buffer) counts only its own elements."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return min(span, t.numel()) * t.element_size()


def _storage(t: torch.Tensor):
    return StorageWeakRef(t.untyped_storage())


def _view_key(t: torch.Tensor):
    """What makes two tensor arguments the same bytes (one is moved once)."""
    return _storage(t), t.storage_offset(), t.shape


def _distinct_bytes(tree) -> int:
    """Bytes of the tensors in a pytree, a tensor passed twice counted once."""
    seen, total = set(), 0
    for t in torch.utils._pytree.tree_leaves(tree):
        if _is_tensor(t) and (key := _view_key(t)) not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


class _Recorder(TorchDispatchMode):
    """Counts the ops that write memory and routes ssiu:: custom ops to their real code."""

    def __init__(self, capture: Capture):
        super().__init__()
        self.capture = capture
        self.op: str | None = None  # the custom op being run
        self.fresh: set = set()  # storages allocated and not yet written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ssiu":
            return self._custom_op(func, args, kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if _is_tensor(a)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if _is_tensor(o)]
        if name in _NO_TRAFFIC:
            self.fresh.update(_storage(o) for o in flat_out)
            return out
        in_storages = {_storage(a) for a in flat_in}
        new = [o for o in flat_out if _storage(o) not in in_storages]
        mutated = func._schema.is_mutable
        if not new and not mutated:
            return out  # a view or an alias: nothing written
        for o in flat_out:
            self.fresh.discard(_storage(o))
        reads = sum(tensor_bytes(a) for a in flat_in)
        writes = sum(tensor_bytes(o) for o in (new or flat_out))
        self.capture.ops.append(OpRecord(str(func), self.op, reads, writes))
        return out

    def _custom_op(self, func, args, kwargs):
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS[func._schema.name]
        outer, self.op = self.op, func._schema.name
        try:
            with self:  # count the implementation's own PyTorch ops too
                out = opdef._init_fn(*args, **kwargs)
        finally:
            self.op = outer
        if outer is None:  # the outermost custom op: its interface, each tensor once
            self.capture.op_boundary_bytes += _distinct_bytes((args, kwargs, out))
        return out

    def launch(self, kernel, args, kwargs, grid):
        record = Launch(kernel, args, kwargs, grid, self.op)
        seen = set()  # a tensor passed twice (a dummy pointer) is moved once
        for a in args:
            if not _is_tensor(a) or (key := _view_key(a)) in seen:
                continue
            seen.add(key)
            if _storage(a) in self.fresh:
                record.writes += tensor_bytes(a)
                self.fresh.discard(_storage(a))
            else:
                record.reads += tensor_bytes(a)
        self.capture.launches.append(record)


def _is_tensor(a) -> bool:
    return isinstance(a, torch.Tensor)


@contextlib.contextmanager
def recording_launches(on_launch):
    """Within the block, `kernel[grid](*args, **kwargs)` calls on_launch(kernel, args,
    kwargs, grid) and runs nothing (compiled and interpreted kernels alike)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            on_launch(self, args, kwargs, grid)
        return None

    saved = {cls: cls.__dict__["run"] for cls in (JITFunction, InterpretedFunction)}
    try:
        for cls in saved:
            cls.run = run
        yield
    finally:
        for cls, fn in saved.items():
            cls.run = fn


@contextlib.contextmanager
def _modelled_gpu():
    """Fake CPU tensors pass the triton backend's device check, programs are counted for
    an H100, buffers are not poisoned. The interpreter flag only affects
    `ssiu.ops.backend.resolve` here: kernels are already decorated, and no launch runs."""
    from ssiu.kernels import common

    # Poisoned buffers (SSIU_POISON_EMPTY, set by the tests) would add fill ops.
    env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "SSIU_POISON_EMPTY")}
    os.environ.update(TRITON_INTERPRET="1", SSIU_POISON_EMPTY="0")
    try:
        with common.modelled_sm_count(MODELLED_SM_COUNT):
            yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fake_step(
    *,
    train: bool,
    batch: int,
    size: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    scale: int = 4,
    backend: str = "triton",
    **config,
) -> Capture:
    """One step of SSIU(scale, **config) at (batch, 3, *size), captured (see module doc).

    train: forward + backward of an L1 loss (optimizer excluded); else a forward under
    torch.no_grad. dtype: bf16/fp16 autocast (fp32 weights) or fp32.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ssiu.model import build

    capture = Capture()
    fake = FakeTensorMode()
    with fake:
        model = build(scale, **config).set_backend(backend)
        model.requires_grad_(train)
        x = torch.rand(batch, 3, *size)
    recorder = _Recorder(capture)
    params = list(model.parameters())
    capture.inputs_bytes = tensor_bytes(x) + sum(tensor_bytes(p) for p in params)
    saved_storages = {}
    param_storages = {_storage(p) for p in params} | {_storage(x)}

    def pack(t):
        key = _storage(t)
        if key not in param_storages and key not in saved_storages:
            saved_storages[key] = (t.shape, t.dtype, tensor_bytes(t))
        return t

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    grad = torch.enable_grad() if train else torch.no_grad()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with _modelled_gpu(), recording_launches(recorder.launch), fake, grad, recorder:
        with autocast, hooks:
            y = model(x)
        capture.outputs_bytes = tensor_bytes(y)
        if train:
            (y.float() - 0.5).abs().mean().backward()
            capture.outputs_bytes += sum(tensor_bytes(p) for p in params)
    capture.saved = list(saved_storages.values())
    return capture


def launch_counts(capture: Capture) -> collections.Counter:
    return collections.Counter(launch.name for launch in capture.launches)


def _meta(a):
    """A meta tensor with a's shape, strides, offset and dtype (fake tensors have no
    data_ptr; a meta tensor's is 0 + offset, i.e. a 16-byte aligned allocation)."""
    if not _is_tensor(a):
        return a
    extent = a.storage_offset() + (tensor_bytes(a) // a.element_size() if a.numel() else 0)
    base = torch.empty(max(extent, 1), dtype=a.dtype, device="meta")
    return base.as_strided(a.shape, a.stride(), a.storage_offset())


def jit_function(kernel):
    """The JITFunction of a kernel; under TRITON_INTERPRET=1 one built from the
    interpreted function's source and decorator options (for its binder only)."""
    from triton.runtime.jit import JITFunction

    for _ in range(8):
        if isinstance(kernel, JITFunction):
            return kernel
        if type(kernel).__name__ == "InterpretedFunction":
            return JITFunction(kernel.fn, **kernel.kwargs)
        kernel = kernel.fn
    raise TypeError(f"{kernel!r} is not a Triton kernel")


def specialisation(launch: Launch, arch: int) -> dict:
    """What the JIT compiles for this launch on sm_<arch>, from Triton's own binder:
    {"signature": {arg: type or "constexpr"}, "constexprs": [[path, value]],
     "attrs": [[path, [[attr, value]]]], "options": {launch option: value}}.

    Integers equal to 1 become constants, integers that are multiples of 16 and pointers
    aligned to 16 bytes get `tt.divisibility` 16, `do_not_specialize` is honoured.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = jit_function(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    args = [_meta(a) for a in launch.args]
    kwargs = {k: _meta(v) for k, v in launch.kwargs.items()}
    bound, spec, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
    names = {p.name for p in jit.params}
    return {
        "signature": signature,
        "constexprs": [[list(path), value] for path, value in constexprs.items()],
        "attrs": [[list(path), value] for path, value in attrs.items() if value],
        "options": {k: v for k, v in kwargs.items() if k not in names},
    }
