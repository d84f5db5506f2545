"""Launch configs chosen per GPU architecture (MSGM: wider tiles on sm_90, which spill on
sm_80), and check-kernels compiling each for the architectures it is picked for."""

from __future__ import annotations

import torch
from ssiu.kernels import common
from ssiu.kernels import msgm as msgm_kernels
from ssiu.kernels.registry import KERNEL_SPECS

import ssiu.ops.fused  # noqa: F401  (registers the MSGM kernels)
from ssiu.check_kernels import _make_jobs, config_label


def _tile(kernel: str, dtype: torch.dtype, arch: int, int64_index: bool = False):
    config = msgm_kernels.msgm_config(64, dtype, kernel, int64_index, arch)
    return config.constexprs["BLOCK_P"], config.num_warps, config.archs


def test_msgm_tiles_by_architecture():
    assert _tile("fwd", torch.bfloat16, 90) == (64, 8, (90,))  # two warpgroups: wgmma
    assert _tile("fwd", torch.bfloat16, 80) == (32, 8, (80,))
    for kernel in ("bwd_gate", "bwd_dx"):
        assert _tile(kernel, torch.float16, 90) == (32, 8, (90,))
        assert _tile(kernel, torch.float16, 80) == (16, 8, (80,))
    # fp32 and int64 offsets: one config for every architecture
    assert _tile("fwd", torch.float32, 90) == _tile("fwd", torch.float32, 80)[:2] + (None,)
    assert _tile("fwd", torch.bfloat16, 90, True)[2] is None


def test_device_arch_modelled_and_on_cpu():
    cpu = torch.device("cpu")
    assert common.device_arch(cpu) == common.TUNED_ARCH == 90
    with common.modelled_arch(80):
        assert common.device_arch(cpu) == 80
        assert _tile("fwd", torch.bfloat16, common.device_arch(cpu))[0] == 32
    assert common.device_arch(cpu) == 90


def test_registry_compiles_each_config_only_for_its_architectures():
    spec = next(s for s in KERNEL_SPECS if s.name == "msgm_fwd_kernel")
    jobs, bad = _make_jobs([spec], (90, 80))
    assert not bad
    for job in jobs:
        config = next(c for c in spec.configs if config_label(c) == job["config"])
        assert config.archs is None or job["arch"] in config.archs
    wide = [j for j in jobs if j["constexprs"]["BLOCK_P"] == 64 and j["dtype"] == "bfloat16"]
    assert wide and {j["arch"] for j in wide} == {90}
    assert any(" sm_90" in j["config"] for j in wide)
