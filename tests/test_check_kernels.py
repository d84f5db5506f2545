"""`ssiu check-kernels`: ahead-of-time compiles for sm_90 / sm_80 on a machine without a GPU.

The toy kernels live at module level: the compile worker re-imports this file with
TRITON_INTERPRET=0 (the suite may run with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from ssiu.kernels.registry import KERNEL_SPECS, KernelConfig, KernelSpec  # noqa: E402

from ssiu import check_kernels as ck  # noqa: E402


@triton.jit
def _toy_add_kernel(ptr_x, ptr_y, ptr_out, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n_elements
    b_x = tl.load(ptr_x + offs, mask=mask)
    b_y = tl.load(ptr_y + offs, mask=mask)
    tl.store(ptr_out + offs, b_x + b_y, mask=mask)


ADD_SIGNATURE = {"ptr_x": "*fp32", "ptr_y": "*fp32", "ptr_out": "*fp32", "n_elements": "i32"}

TOY_SPEC = KernelSpec(
    name="toy_add",
    fn=_toy_add_kernel,
    signature=ADD_SIGNATURE,
    configs=(KernelConfig({"BLOCK": 1024}, num_warps=4, num_stages=2),),
)
# tl.arange needs a power-of-two range: this config cannot compile.
BROKEN_SPEC = KernelSpec(
    name="toy_add_bad_block",
    fn=_toy_add_kernel,
    signature=ADD_SIGNATURE,
    configs=(KernelConfig({"BLOCK": 1000}, num_warps=4, num_stages=2),),
)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    # A result cache of this module's own: the first compile fills it, run() reuses it.
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("ssiu-cache")
        mp.setenv("SSIU_CACHE_DIR", str(path))
        yield path / "check-kernels"


@pytest.fixture(scope="module")
def rows():
    # One worker run for the whole module: each worker imports torch and triton.
    return ck.check_kernels(archs=(90, 80), specs=[TOY_SPEC, BROKEN_SPEC], workers=2)


def test_toy_kernel_compiles_for_hopper_and_ampere(rows):
    good = [r for r in rows if r.kernel == "toy_add"]
    assert [r.arch for r in good] == [90, 80]
    for r in good:
        assert r.ok, r.status + "\n" + r.detail
        assert r.registers is not None and 0 < r.registers <= ck.MAX_REGISTERS_PER_THREAD
        assert r.spills == 0
        assert r.shared is not None and r.shared <= ck.SHARED_MEMORY_LIMITS[r.arch]
        assert r.config == "BLOCK=1024 w4 s2"
        assert r.status == "ok" and not r.cached and r.compile_s > 0


def test_config_that_cannot_compile_fails(rows):
    bad = [r for r in rows if r.kernel == "toy_add_bad_block"]
    assert [r.arch for r in bad] == [90, 80]
    for r in bad:
        assert not r.ok
        assert r.status.startswith("FAIL: compile error"), r.status
        assert "power of 2" in r.detail or "power of two" in r.detail, r.detail


def test_judge_flags_spills_shared_memory_and_registers():
    row = ck.CheckRow("k", "c", 80, registers=255, spills=8, stack=8, shared=200 * 1024)
    ck._judge(row, num_warps=8)
    text = row.status
    assert "spills 8 bytes" in text
    assert "shared memory" in text and "sm_80" in text
    assert "per block" in text  # 255 registers x 256 threads > 65536
    ok = ck.CheckRow("k", "c", 90, registers=40, spills=0, stack=0, shared=200 * 1024)
    ck._judge(ok, num_warps=4)
    assert ok.ok  # 200 KiB fits the 227 KiB of sm_90


def test_error_inside_a_called_function_is_described():
    try:
        try:
            raise TypeError("Return type mismatch: int64 and int32")
        except TypeError as inner:
            raise RuntimeError("at 12:13:\n    offs_c = _channels(C)\n             ^") from inner
    except RuntimeError as e:
        short, detail = ck._describe_error(e)
    assert short == "TypeError: Return type mismatch: int64 and int32"
    assert "offs_c = _channels(C)" in detail and "Return type mismatch" in detail


def test_ptxas_report_parsing():
    log = (
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size\n"
    )
    assert ck._ptxas_report(log) == {"registers": 64, "spills": 28, "stack": 24}


def test_run_exit_codes_table_and_cache(rows, cache_dir, capsys, tmp_path):
    assert len(list(cache_dir.glob("*.json"))) == 2  # toy_add for sm_90 and sm_80
    out_json = tmp_path / "rows.json"
    args = argparse.Namespace(
        arch=[90], jobs=1, json=str(out_json), specs=[TOY_SPEC, BROKEN_SPEC], verbose=True
    )
    assert ck.run(args) == 1
    text = capsys.readouterr().out
    assert "toy_add" in text and "sm_90" in text and "FAIL: compile error" in text
    assert "1/2 configs ok" in text
    saved = json.loads(out_json.read_text())
    assert [r["ok"] for r in saved] == [True, False]
    first = next(r for r in rows if r.kernel == "toy_add" and r.arch == 90)
    assert saved[0]["cached"] and saved[0]["registers"] == first.registers
    assert not saved[1]["cached"]  # failures are compiled again every time


def test_config_label_names_extra_config_fields():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class WithDtype(KernelConfig):
        dtype: str = "bf16"

    label = ck.config_label(WithDtype({"BLOCK_P": 64}, num_warps=8, num_stages=1))
    assert label == "dtype=bf16,BLOCK_P=64 w8 s1"


def test_only_selects_configs():
    # Nothing matches: no worker is started.
    assert ck.check_kernels(archs=(90,), specs=[TOY_SPEC], only=["no_such_kernel"]) == []


def test_run_with_no_specs_says_so(capsys):
    args = argparse.Namespace(arch=None, jobs=1, json=None, specs=[])
    assert ck.run(args) == 0
    assert "nothing to compile" in capsys.readouterr().out


def test_cli_registers_subcommand():
    parser = argparse.ArgumentParser()
    ck.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check-kernels", "--arch", "90", "--arch", "80"])
    assert args.arch == [90, 80] and args.func is ck.run
    assert parser.parse_args(["check-kernels"]).arch is None  # run() uses (90, 80)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="sm_75"):
        ck.check_kernels(archs=(75,), specs=[TOY_SPEC])


def test_registered_specs_are_found():
    # Imports every module under ssiu.kernels; each registers its specs on import.
    specs, failed = ck.load_registered_specs()
    assert failed == [], [r.status for r in failed]
    assert all(isinstance(s, KernelSpec) for s in specs)
    assert {s.name for s in KERNEL_SPECS} == {s.name for s in specs}


WORKER_TRAP = """
import os, sys, time
import triton
import triton.language as tl

main = sys.modules["__main__"]
if getattr(getattr(main, "__spec__", None), "name", None) == "ssiu.check_kernels":
    {action}  # only inside the compile worker

@triton.jit
def trap_kernel(ptr_x, BLOCK: tl.constexpr):
    tl.store(ptr_x + tl.arange(0, BLOCK), 1.0)
"""


def _trap_spec(tmp_path, name, action):
    path = tmp_path / f"{name}.py"
    path.write_text(WORKER_TRAP.format(action=action))
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return KernelSpec(name, module.trap_kernel, {"ptr_x": "*fp32"}, (KernelConfig({"BLOCK": 64}),))


def test_worker_crash_gives_failing_rows(tmp_path):
    spec = _trap_spec(tmp_path, "crashing_kernel_module", "os._exit(3)")
    (row,) = ck.check_kernels(archs=(90,), specs=[spec], workers=1, cache=False)
    assert not row.ok and row.status == "FAIL: compile worker exited with code 3"


def test_stuck_compile_is_stopped(tmp_path):
    spec = _trap_spec(tmp_path, "stuck_kernel_module", "time.sleep(600)")
    jobs, _ = ck._make_jobs([spec], (90,))
    (row,) = ck._run_workers(jobs, 1, None, None, timeout=1)
    assert not row.ok and "worker stopped" in row.status


SASS = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.U16 R8, desc[UR4][R2.64+0x2] ;
        /*0120*/                   LDG.E.64.CONSTANT R10, desc[UR4][R6.64] ;
        /*0130*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0150*/                   STG.E desc[UR4][R2.64], R12 ;
        /*0160*/                   STG.E.U16 desc[UR4][R2.64], R13 ;
        /*0170*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0180*/                   LDG.E.U8 R9, desc[UR4][R2.64] ;
"""


def test_sass_report_counts_access_widths_and_tensor_cores():
    found = ck.sass_report(SASS)
    assert found["hmma"] == 1 and found["hgmma"] == 1
    assert found["ldg"] == {16: 2, 2: 1, 8: 1, 1: 1}
    assert found["stg"] == {4: 1, 2: 1}


def test_resident_warps_from_registers_shared_memory_and_warps():
    assert ck.resident_warps(90, 128, 0, 8) == 16  # 4096 registers a warp: 16 warps
    assert ck.resident_warps(90, 32, 0, 4) == 64  # the warp limit
    assert ck.resident_warps(80, 32, 100 * 1024, 4) == 4  # one block of 100 KiB fits
    assert ck.resident_warps(90, 255, 0, 16) == 0  # a block does not fit


def test_narrow_accesses_warn_unless_strict():
    row = ck.CheckRow("k", "c", 90, registers=64, spills=0, shared=0, ldg={2: 3, 16: 1})
    ck._judge(row, num_warps=4)
    assert row.ok and row.status.startswith("warn: 3 global accesses")
    strict = ck.CheckRow("k", "c", 90, registers=64, spills=0, shared=0, stg={1: 1})
    ck._judge(strict, num_warps=4, strict_access=True)
    assert not strict.ok and "1 global accesses" in strict.status
    high = ck.CheckRow("k", "c", 90, registers=240, spills=0, shared=0)
    ck._judge(high, num_warps=4)
    assert high.status == "FAIL: 240 registers > 232 (headroom)"


def _captured_toy_launches(*launches):
    import torch

    from ssiu.launch_capture import Launch, recording_launches

    seen = []
    record = lambda kernel, args, kwargs, grid: seen.append(
        Launch(kernel, args, kwargs, grid, None)
    )
    with recording_launches(record):
        for x, n in launches:
            out = torch.empty_like(x)
            _toy_add_kernel[(1,)](x, x, out, n, BLOCK=1024, num_warps=4, num_stages=2)
    return seen


def test_specialisation_follows_the_jit():
    import torch

    x = torch.empty(4096, device="meta")
    one, sixteen, odd = _captured_toy_launches((x, 1), (x, 4096), (x[1:], 4095))
    from ssiu.launch_capture import specialisation

    spec = specialisation(one, 90)
    assert spec["signature"]["n_elements"] == "constexpr"  # == 1 becomes a constant
    assert [[3], 1] in spec["constexprs"] and [[4], 1024] in spec["constexprs"]
    assert spec["options"] == {"num_warps": 4, "num_stages": 2}
    spec = specialisation(sixteen, 90)
    assert spec["signature"]["n_elements"] == "i32"
    assert [[3], [["tt.divisibility", 16]]] in spec["attrs"]  # multiple of 16
    assert [[0], [["tt.divisibility", 16]]] in spec["attrs"]  # aligned pointer
    spec = specialisation(odd, 90)
    assert [p for p, _ in spec["attrs"]] == [[2]]  # x[1:] is 4 bytes off; out is aligned


def test_derived_job_compiles_what_the_jit_would(cache_dir):
    import torch

    from ssiu.launch_capture import specialisation

    (launch,) = _captured_toy_launches((torch.empty(4096, device="meta"), 4096))
    job = ck._derived_job(launch, 90, specialisation(launch, 90), "toy-workload")
    assert job["config"] == "fp32 BLOCK=1024 w4 s2 /16:n_elements"
    registry_job, _ = ck._make_jobs([TOY_SPEC], (90,))
    assert ck._covered(registry_job[0], [job])  # same kernel, constexprs and warps
    (row,) = ck._run_workers([job], 1, None, None)
    assert row.ok and row.source == "toy-workload", row.status + row.detail
    assert row.registers and row.ldg and row.stg and row.warps_per_sm is None  # judged later
