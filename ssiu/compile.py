"""torch.compile for SSIU: training (static shapes) and inference (dynamic H, W).

    step_fn = compile_for_training(model)          # torch.compile(model, fullgraph=True)
    forward = compile_for_inference(model)         # any image size, one graph

Recompile policy (why dynamic shapes and no size buckets):

- Training runs fixed-size patches (batch x 3 x P x P, every step), so the model is
  compiled with `dynamic=False`: one static graph, the best code from Inductor.
  Validation images have other sizes; they run through the eager model (same
  parameters), so they never trigger a recompile of the training graph.
- Inference sees many image sizes. The network reflect-pads its input to a multiple of
  16 and crops the output; `compile_for_inference` does that padding itself, outside the
  graph (the same `F.pad(..., mode="reflect")`, so the output is identical), and marks H
  and W dynamic. The compiled model then only ever sees multiples of 16, so its
  `if pad_h or pad_w` branch is always the same and one symbolic graph serves every size.
  The very first input may get a graph of its own (Dynamo compiles the first call
  statically where the code specialises on it, e.g. a 16x16 input whose attention grid
  is exactly one block, or duck sizing of H == W); every later size shares the dynamic
  graph. Measured (tests/test_compile.py and by hand, reference and fused backends):
  2 graphs for 16x16, 20x40, 36x18. A new batch size adds one. Buckets would have to
  pad beyond the multiple of 16, which changes the output (ESAM's align_corners=True
  upsampling depends on the map size), so they are not used. `RECOMPILE_LIMIT` bounds
  the graphs per function; past it, with fullgraph=True, Dynamo raises instead of
  silently running eager.
- CUDA graphs (`mode="reduce-overhead"`) are used only for fixed shapes (tiled
  inference), on CUDA: a CUDA graph is recorded per shape, which pays for many
  same-size tiles and not for one-off image sizes.

The fused ops are opaque `torch.library` custom ops with fake implementations and
registered autograd, so `fullgraph=True` holds with backend "triton" on CUDA and through
the Triton interpreter on CPU (tests use the "aot_eager" compiler there: Inductor's C++
build is slow on a small CPU and adds nothing the custom ops see).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssiu.config import PAD_MULTIPLE

# Graphs Dynamo may build per compiled function (image sizes, batch sizes, train/eval).
RECOMPILE_LIMIT = 8


def default_compiler(device: torch.device | str) -> str:
    """Inductor everywhere (it needs a C++ compiler on CPU, present on Linux)."""
    return "inductor"


def recompile_limit():
    """A context in which Dynamo may build RECOMPILE_LIMIT graphs per function (or the
    process's limit if higher); the process-wide setting is restored after it. Dynamo
    reads the limit when it traces, so the compiled calls run inside it."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)})


def compile_for_training(model: nn.Module, compiler: str | None = None) -> nn.Module:
    """torch.compile(model, fullgraph=True, dynamic=False) for fixed-size training batches.

    The returned module shares `model`'s parameters (save/load `model`, not it). Call it
    inside `recompile_limit()` (the training loop does).
    """
    device = next(model.parameters()).device
    return torch.compile(
        model, fullgraph=True, dynamic=False, backend=compiler or default_compiler(device)
    )


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Reflect-pad (N, C, H, W) on the right/bottom to multiples of `multiple`, as SSIU does."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


class CompiledInference:
    """Callable x (N, 3, H, W) -> model(x), through one compiled graph for every size.

    Pads x outside the graph (see the module docstring), marks H and W dynamic (or, with
    `static=True`, compiles per shape: for CUDA graphs on fixed-size tiles) and crops.
    """

    def __init__(
        self,
        model: nn.Module,
        compiler: str | None = None,
        mode: str | None = None,
        static: bool = False,
    ):
        device = next(model.parameters()).device
        self.model, self.static, self.mode = model, static, mode
        self.compiler = compiler or default_compiler(device)
        dynamic = False if static else None
        self._fn = torch.compile(
            model, fullgraph=True, dynamic=dynamic, backend=self.compiler, mode=mode
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ssiu.model import check_image_batch

        check_image_batch(x)  # eager, with its clear message for too-small inputs
        s = self.model.config.scale
        h, w = x.shape[-2:]
        x_p = pad_to_multiple(x).contiguous()
        if not self.static:
            torch._dynamo.maybe_mark_dynamic(x_p, 2)
            torch._dynamo.maybe_mark_dynamic(x_p, 3)
        with recompile_limit():
            out = self._fn(x_p)
        if self.mode == "reduce-overhead":
            out = out.clone()  # CUDA graph outputs are overwritten by the next replay
        return out[:, :, : h * s, : w * s]


class _CompiledCache(dict):
    """A model's compiled forwards, kept on the model itself (in its __dict__, not as a
    submodule: the state dict is unchanged), so they live exactly as long as the model.
    Copies and pickles of the model start empty: a compiled forward belongs to one model."""

    def __deepcopy__(self, memo):
        return _CompiledCache()

    def __reduce__(self):
        return (_CompiledCache, ())


_CACHE_ATTR = "_ssiu_compiled_inference"


def compile_for_inference(
    model: nn.Module, compiler: str | None = None, mode: str | None = None, static: bool = False
) -> CompiledInference:
    """A cached `CompiledInference` for `model` (one per model and settings).

    The cache is stored on the model (a process-wide table whose values hold the model
    would keep every model ever compiled alive); it goes when the model goes.
    """
    per_model = model.__dict__.setdefault(_CACHE_ATTR, _CompiledCache())
    key = (compiler, mode, static)
    if key not in per_model:
        per_model[key] = CompiledInference(model, compiler, mode, static)
    return per_model[key]


def graph_count() -> int:
    """Graphs Dynamo has compiled in this process (torch._dynamo.utils.counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


__all__ = [
    "RECOMPILE_LIMIT",
    "CompiledInference",
    "compile_for_inference",
    "compile_for_training",
    "graph_count",
    "recompile_limit",
    "pad_to_multiple",
]
