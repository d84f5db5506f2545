"""The list of every (kernel, config) a launcher can run, for ahead-of-time compile checks.

A kernel module appends one `KernelSpec` per kernel; `ssiu check-kernels` compiles each
spec's every config for each architecture without a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launchable variant: constexpr values plus launch options."""

    constexprs: dict  # name -> value, e.g. {"BLOCK_P": 64, "C": 64, "DTYPE": "fp32"}
    num_warps: int = 4
    num_stages: int = 2
    # ptxas register cap per thread (None: the compiler's choice, at most 255). Set where
    # a kernel would otherwise sit above check-kernels' 232-register headroom; a cap that
    # costs spills is caught by check-kernels like any other spill.
    maxnreg: int | None = None
    # Of the architectures check-kernels knows (80, 90), those a launcher picks this config
    # for (None: every one); check-kernels compiles a registered config only for these.
    archs: tuple[int, ...] | None = None

    def launch_options(self) -> dict:
        """Keyword options of a launch: num_warps, num_stages (and maxnreg when capped)."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A @triton.jit function, its pointer/scalar signature, and the configs it runs with.

    signature: name -> triton type string for the non-constexpr arguments, e.g.
        {"x_ptr": "*fp32", "n_pixels": "i32"}; a callable taking the config returns it
        when pointer dtypes depend on the config (e.g. "*bf16" for the bf16 variant).
    """

    name: str
    fn: Callable
    signature: dict | Callable[[KernelConfig], dict]
    configs: tuple[KernelConfig, ...]

    def signature_for(self, config: KernelConfig) -> dict:
        return self.signature(config) if callable(self.signature) else dict(self.signature)


KERNEL_SPECS: list[KernelSpec] = []


def register(spec: KernelSpec) -> KernelSpec:
    if any(s.name == spec.name for s in KERNEL_SPECS):
        raise ValueError(f"kernel spec {spec.name!r} registered twice")
    KERNEL_SPECS.append(spec)
    return spec
