"""Planted bugs (mutants): the parity tests must fail on each one.

Each mutant is one realistic bug written as exact source edits (file, old snippet, new
snippet) in the package. The runner copies `ssiu/`, `kernels/` (as `ssiu/kernels`) and
`tests/` into a temporary directory, applies one mutant there, and runs that op's small
parity tests (fp32 and fp16, through the Triton interpreter) with the copy first on the
import path. A mutant is KILLED when at least one test fails, SURVIVED when all pass, and
STALE when a snippet is not found exactly once (the source it targets was rewritten:
update the list). The run first checks that the unmutated copy passes the same tests.

    python tests/mutants.py [--jobs 2] [name ...]      (or `make mutants`)

prints a table mutant -> killed by (test, dtype) and exits 1 unless every mutant is killed.
Bugs that only a GPU would show (bf16 rounding, TF32 dots) are listed in the README.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The small parity tests of each fused op (fp32 and fp16; C = 64 and odd shapes).
LN = ("test_fused_layer_norm.py", "fp32_forward_and_gradients or fp16")
FP32 = "fp32_forward_and_all_gradients"
MSGM = ("test_fused_msgm.py", f"{FP32} and (shape0 or shape3) or fp16_in or c64")
ESAM = ("test_fused_esam.py", f"{FP32} and (None or 16 or 1) or fp16_dense or c64")
MOE = ("test_fused_moe.py", f"{FP32} and shape0 or ties or fp16 or c64")
TAIL = ("test_fused_tail.py", "fp32_tail_forward or fp16 or c64")
# MoE-FS's backward against a float64 reference with a keep set it is handed (altered on
# purpose): it must not reselect the experts from its recomputed softmax.
MOE_KEEP = ("test_moe_keep_set.py", "uses_the_given_keep_set")
# MSGM row tiles whose last tile is one pixel (fp16: the column sums' shift dots).
MSGM_ROWS = ("test_fused_msgm_row_tiles.py", "fp16")
# The ESAM backward kernels against their adjoints (qkv: ties in the 2x2 windows), and the
# final reflect-padded 3x3 (odd shapes, skip, C = 64).
ESAM_BWD = ("test_esam_backward.py", "qkv_bwd or prop_bwd")
TAIL_RGB = ("test_tail_final.py", "rgb_forward_and_all_gradients or rgb_without_skip_and_c64")
# The final 3x3 inside the last x2 stage's kernels (both ways), rows of several tiles.
TAIL_FUSED_RGB = ("test_fused_tail_op.py", "fused_into")
# The tail's bilinear skip of the input image, computed in its RGB epilogue (scales 1-4,
# fp32; fp16 features with an fp32 image and output).
TAIL_IMAGE = ("test_tail_image_skip.py", "fp32_image_skip or autocast_build")
# The fused SS-ReM step (its adds and subtraction inside the MSGM kernels) against the
# reference composition, fp32 dense.
STEP = ("test_fused_step.py", "fp32 and dense")
# The fused body (all steps in one op, the gradient sums over the steps in the kernels).
BODY = ("test_fused_body.py", "expert_pattern or one_step")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    op: str
    direction: str  # "fwd", "bwd" or "fwd+bwd": which pass the bug is in
    edits: tuple[tuple[str, str, str], ...]  # (file, old, new), each old found exactly once
    tests: tuple[str, str]  # (test file, -k expression)


def _m(name, op, direction, tests, *edits) -> Mutant:
    return Mutant(name, op, direction, tuple(edits), tests)


MUTANTS = [
    _m("ln_unbiased_variance", "layer_norm", "fwd+bwd", LN,
       ("kernels/layer_norm.py", "tl.sum(b_xc * b_xc, axis=1) / C + eps",
        "tl.sum(b_xc * b_xc, axis=1) / (C - 1) + eps")),
    _m("ln_dx_drops_mean_term", "layer_norm", "bwd", LN,
       ("kernels/layer_norm.py", "(b_g - mean_g[:, None] - b_xhat", "(b_g - b_xhat")),
    _m("ln_dbias_zeroed", "layer_norm", "bwd", LN,
       ("kernels/layer_norm.py", "tl.store(dbias_part_ptr + pid64 * part_stride + offs_w, acc_b)",
        "tl.store(dbias_part_ptr + pid64 * part_stride + offs_w, 0 * acc_b)")),
    _m("msgm_output_bias_dropped", "msgm", "fwd", MSGM,
       ("ssiu/ops/fused.py", "return msgm_kernels.msgm_fwd(x, params, residual, residual2)",
        "return msgm_kernels.msgm_fwd(x, params[:9] + [params[9] * 0], residual, residual2)")),
    _m("msgm_residual_missing", "msgm", "fwd", MSGM,
       ("kernels/msgm.py", "HAS_RESIDUAL=residual is not None", "HAS_RESIDUAL=False")),
    _m("msgm_weights_transposed", "msgm", "fwd+bwd", MSGM,
       ("kernels/msgm.py", "(t.reshape(t.shape[0], t.shape[1]) if mat",
        "(t.reshape(t.shape[0], t.shape[1]).t() if mat")),
    _m("msgm_reflect_off_by_one", "msgm", "fwd+bwd", MSGM,
       ("kernels/indexing.py", "2 * size - 2 - i, i)", "2 * size - 1 - i, i)")),
    _m("msgm_depthwise_grad_zeroed", "msgm", "bwd", MSGM,
       ("kernels/msgm.py", "tl.store(ptr_wdw, acc_wdw,", "tl.store(ptr_wdw, 0 * acc_wdw,")),
    _m("msgm_column_sum_tap_weights_swapped", "msgm", "fwd+bwd", MSGM,
       ("kernels/msgm.py", "w_l = tl.load(wdw_ptr + offs_c * 9 + r * 3)[None, :]",
        "w_l = tl.load(wdw_ptr + offs_c * 9 + (r * 3 + 2))[None, :]")),
    _m("msgm_right_sum_misses_previous_chunk", "msgm", "fwd+bwd", MSGM_ROWS,
       ("kernels/msgm.py", "            b_r_prev += e_prev * w_r\n", "")),
    _m("esam_topk_strict_tie_rule", "esam", "fwd+bwd", ESAM,
       ("kernels/esam.py", "keep = (b_s >= thr[:, None])", "keep = (b_s > thr[:, None])")),
    _m("esam_scale_by_channels", "esam", "fwd", ESAM,
       ("kernels/esam.py", "(c // heads) ** -0.5, num_warps", "c**-0.5, num_warps")),
    _m("esam_wrong_halo", "esam", "fwd", ESAM,
       ("ssiu/ops/fused_esam.py", "params.rel_w, heads=heads, block=block, halo=halo,",
        "params.rel_w, heads=heads, block=block, halo=0,")),
    _m("esam_input_gradient_missing", "esam", "bwd", ESAM,
       ("ssiu/ops/fused_esam.py", "p.qkv_weight, dout if add_input else None,",
        "p.qkv_weight, None,")),
    _m("esam_rel_grads_swapped_axes", "esam", "bwd", ESAM,
       ("kernels/esam.py", "d_h = tl.sum(tl.where(((r == i)", "d_h = tl.sum(tl.where(((c == i)")),
    _m("esam_maxpool_grad_to_last_maximum", "esam", "bwd", ESAM_BWD,
       ("kernels/esam_bwd.py", "take = (b_v > b_max) | (b_v != b_v)",
        "take = (b_v >= b_max) | (b_v != b_v)")),
    _m("esam_qkv_dw_k_into_q", "esam", "bwd", ESAM_BWD,
       ("kernels/esam_bwd.py", "            elif part == 1:\n                acc_k += b_dw",
        "            elif part == 1:\n                acc_q += b_dw")),
    _m("esam_fold_mirror_rows_dropped", "esam", "bwd", ESAM_BWD,
       ("kernels/esam_bwd.py",  # the padded rows that reflect onto a real row are lost
        "if (corner // 2 == 0) or ((ym >= Hh) and (ym < Hp)):", "if corner // 2 == 0:")),
    _m("esam_fold_window_row_off_by_one", "esam", "bwd", ESAM_BWD,
       ("kernels/esam_bwd.py", "r = py - bh * BLOCK + HALO  #",
        "r = py - bh * BLOCK + HALO - 1  #")),
    _m("moe_topk_strict_tie_rule", "moe_fs", "fwd+bwd", MOE,
       ("kernels/moe.py", "tl.where(p1 >= kth, 1, 0)", "tl.where(p1 > kth, 1, 0)")),
    _m("moe_identity_path_missing", "moe_fs", "fwd", MOE,
       ("kernels/moe.py", "input_precision=PRECISION) + b_m  # [BLOCK_P, C]",
        "input_precision=PRECISION)  # [BLOCK_P, C]")),
    _m("moe_softmax_grad_drops_mean", "moe_fs", "bwd", MOE,
       ("kernels/moe.py", "* b_dm * (b_ek - b_m)  # d logits", "* b_dm * b_ek  # d logits")),
    _m("moe_bwd_reselects_top_k", "moe_fs", "bwd", MOE_KEEP,
       ("kernels/moe.py",
        "keep = _load_keep(keep_ptr + n * C * HW + offs_out, mask, BLOCK_P, C, TOPK)",
        "keep = _selection(p1, p2, p3, TOPK)")),
    _m("moe_gate3_bias_grad_zeroed", "moe_fs", "bwd", MOE,
       ("ssiu/ops/fused_moe.py",  # params: W1, W2, W3, b1, b2, b3, W_fuse, b_fuse
        "for i in range(len(params))]\n",
        "for i in range(len(params))]\n    dparams[5] = 0 * dparams[5]\n")),
    _m("tail_shuffle_channel_order", "tail", "fwd+bwd", TAIL,
       ("kernels/tail.py", "rows = offs_c * RR + sub", "rows = offs_c + sub * C")),
    _m("tail_bias_dropped", "tail", "fwd+bwd", TAIL,
       ("kernels/tail.py", "return b_z + tl.load(b_ptr + rows)[:, None]", "return b_z")),
    _m("tail_stale_mask_in_dw", "tail", "bwd", TAIL,
       ("kernels/tail.py",  # the dW kernel's r = 3 dout load (masked pixels read as 1)
        "other=0.0)  # fmt: skip\n        b_dz = b_dg * b_do",
        "other=1.0)  # fmt: skip\n        b_dz = b_dg * b_do")),
    _m("tail_dbias_not_transposed", "tail", "bwd", TAIL,
       ("kernels/tail.py", "tl.store(part + C * R * R * C + rows, acc_b)",
        "tl.store(part + C * R * R * C + offs_c + sub * C, acc_b)")),
    _m("step_second_residual_dropped", "ssrem_step", "fwd+bwd", STEP,
       ("kernels/msgm.py", "C, BLOCK_P, HALO, True, True, INT64_INDEX",
        "C, BLOCK_P, HALO, True, False, INT64_INDEX")),
    _m("step_pair_beta_reads_z_projection", "ssrem_step", "fwd+bwd", STEP,
       ("kernels/msgm.py", "wo2_ptr,\n            bo2_ptr, H",
        "wo_ptr,\n            bo2_ptr, H")),
    _m("step_beta_grad_misses_subtraction", "ssrem_step", "bwd", STEP,
       ("ssiu/ops/fused_step.py", "msgm_bwd(1, da1, a_n, p.beta, w_b, dw, du,",
        "msgm_bwd(1, da1, a_n, p.beta, w_b, None, du,")),
    _m("esam_prop_subtrahend_added", "ssrem_step", "fwd+bwd", STEP,
       ("kernels/esam.py", "b_out -= tl.load(sub_ptr", "b_out += tl.load(sub_ptr")),
    _m("step_ln_dweight_without_xhat", "ssrem_step", "bwd", STEP,
       ("kernels/msgm.py",  # the LayerNorm backward in MSGM_z's dx epilogue
        "acc_lnw += tl.sum(b_dx * b_xhat, axis=0)", "acc_lnw += tl.sum(b_dx, axis=0)")),
    _m("msgm_dx_plus_sign", "ssrem_step", "bwd", STEP,
       ("kernels/msgm.py", "b_dx += b_plus.to(tl.float32)", "b_dx -= b_plus.to(tl.float32)")),
    _m("body_dy_sum_reads_dx_plus", "ssrem_body", "bwd", BODY,
       ("kernels/msgm.py",  # the running sum of d y re-reads the addend, not the sum
        "b_sum = tl.load(plus_sum_ptr", "b_sum = tl.load(dx_plus_ptr")),
    _m("body_dy_sum_drops_a_step", "ssrem_body", "bwd", BODY,
       ("kernels/msgm.py", "b_sum = b_sum.to(tl.float32) + b_plus.to(tl.float32)",
        "b_sum = b_sum.to(tl.float32)")),
    _m("body_expert_grad_to_its_own_step", "ssrem_body", "bwd", BODY,
       ("ssiu/ops/fused_body.py",  # an output's gradient added to its step's input's
        "da_plus = grads[s - 1].contiguous() if s > 0 and grads[s - 1] is not None else None",
        "da_plus = grads[s].contiguous() if s > 0 and grads[s] is not None else None")),
    _m("msgm_dout2_sign", "ssrem_step", "bwd", STEP,
       ("kernels/msgm.py", "b_do = (b_do.to(tl.float32) - b_do2.to(tl.float32)).to(dtype)",
        "b_do = (b_do.to(tl.float32) + b_do2.to(tl.float32)).to(dtype)")),
    _m("tail_rgb_fused_tile_edge_dropped", "tail", "bwd", TAIL_FUSED_RGB,
       ("kernels/tail.py",  # the 3x3's taps across a tile edge read as zero
        "    return dout_rows(d_img, 2 * y + i, dy, 2 * H, run, 2 * W, sd_c, sd_h, sd_w)",
        "    b_run = dout_rows(d_img, 2 * y + i, dy, 2 * H, run, 2 * W, sd_c, sd_h, sd_w)\n"
        "    edge = (run >= 2 * x0) & (run < 2 * x0 + 2 * BLOCK_P)\n"
        "    return tl.where(edge[:, None], b_run, 0.0)")),
    _m("tail_rgb_fused_fwd_left_halo", "tail", "fwd", TAIL_FUSED_RGB,
       ("kernels/tail.py",  # output row 2y's tap from the column left of the tile
        "g0_left += pick_row(tl.dot(f_left, w_k, input_precision=PRECISION), 15)",
        "g0_left += pick_row(tl.dot(f_left, w_k, input_precision=PRECISION), 14)")),
    _m("tail_rgb_bwd_reflect_off_by_one", "tail_rgb", "bwd", TAIL_RGB,
       ("kernels/tail_rgb.py", "tl.where(y == H - 2, H - 1, -1)",
        "tl.where(y == H - 1, H - 1, -1)")),
    _m("tail_bilinear_weights_swapped", "tail", "fwd", TAIL_IMAGE,
       ("kernels/tail_rgb.py", "((1.0 - lx) * a + lx * b)", "(lx * a + (1.0 - lx) * b)")),
    _m("tail_bilinear_align_corners", "tail", "fwd", TAIL_IMAGE,
       ("kernels/tail_rgb.py",  # columns sampled as align_corners=True-like x / s
        "sx = tl.maximum((x + 0.5) * inv_scale - 0.5, 0.0)", "sx = x * inv_scale")),
    _m("tail_bilinear_last_row_unclamped", "tail", "fwd", TAIL_IMAGE,
       ("kernels/tail_rgb.py",  # the bottom rows blend with the row below the image
        "y1 = y0 + (y0 < IH - 1)", "y1 = tl.minimum(y0 + 1, IH)")),
    _m("tail_image_grad_nearest", "tail", "bwd", TAIL_IMAGE,
       ("ssiu/ops/fused_tail.py",  # the image's gradient through the wrong upsampling
        "up = upsample_image(probe, math.prod(ctx.factors))",
        "up = torch.nn.functional.interpolate(probe, scale_factor=math.prod(ctx.factors))")),
]  # fmt: skip

PYTEST_INI = """[pytest]
markers =
    gpu: needs a CUDA device
    interpreter: Triton interpreter
    slow: slow
    mutants: planted bugs
"""


def copy_package(dest: Path) -> None:
    """ssiu/ with kernels/ inside it (what the editable install maps) and tests/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "ssiu", dest / "ssiu", ignore=ignore)
    shutil.copytree(ROOT / "kernels", dest / "ssiu" / "kernels", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    (dest / "pytest.ini").write_text(PYTEST_INI)


def stale_edits(mutant: Mutant) -> list[str]:
    """The edits whose old snippet is not in the source exactly once."""
    bad = []
    for file, old, _ in mutant.edits:
        path = ROOT / file
        count = path.read_text().count(old) if path.exists() else 0
        if count != 1:
            bad.append(f"{file}: {old!r} found {count} times")
    return bad


def apply(mutant: Mutant, dest: Path) -> None:
    for file, old, new in mutant.edits:
        rel = Path(file)
        target = dest / ("ssiu" / rel if rel.parts[0] == "kernels" else rel)
        target.write_text(target.read_text().replace(old, new))


def run_tests(dest: Path, tests: tuple[str, str]) -> tuple[int, str]:
    """(exit code, output) of pytest on the copy at `dest`."""
    # COLUMNS: pytest cuts the -rf summary lines to the terminal width (the dtype is there)
    env = dict(os.environ, PYTHONPATH=str(dest), TRITON_INTERPRET="1", COLUMNS="1000")
    env.pop("SSIU_TOLERANCE_LOG", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-c",
           str(dest / "pytest.ini"), "--rootdir", str(dest), "-m", "not gpu",
           f"tests/{tests[0]}", "-k", tests[1]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


FAILED = re.compile(r"^FAILED (\S+?)(?: - (.*))?$", re.M)
DTYPE = re.compile(r"torch\.(float16|float32|bfloat16|float64)")


def killers(output: str) -> list[str]:
    """'test_id (dtype)' for each failed test in pytest's -rf summary; the dtype comes from
    assert_close_to_reference's message, else from the test's name."""
    out = []
    for test, message in FAILED.findall(output):
        name = test.split("::", 1)[-1]
        found = DTYPE.search(message or "")
        if found:
            dtype = found.group(1)
        else:
            dtype = {"fp16": "float16", "fp32": "float32"}.get(name[5:9], "?")
        out.append(f"{name} ({dtype})")
    return out


def summary(detail: list[str], output_counts: str = "") -> str:
    """'float32: 5 tests (first: test_x), float16: 2 tests (first: ...)'."""
    by_dtype: dict[str, list[str]] = {}
    for entry in detail:
        name, dtype = entry.rsplit(" (", 1)
        by_dtype.setdefault(dtype.rstrip(")"), []).append(name)
    return "; ".join(
        f"{dtype}: {len(names)} (first {names[0]})" for dtype, names in sorted(by_dtype.items())
    )


def run_mutant(mutant: Mutant) -> tuple[str, list[str], float]:
    """(status, killers or reasons, seconds)."""
    start = time.perf_counter()
    if stale := stale_edits(mutant):
        return "STALE", stale, 0.0
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        dest = Path(tmp)
        copy_package(dest)
        apply(mutant, dest)
        code, output = run_tests(dest, mutant.tests)
    seconds = time.perf_counter() - start
    if code == 1:
        return "KILLED", killers(output), seconds
    if code == 0:
        return "SURVIVED", [], seconds
    return "ERROR", [output[-2000:]], seconds


def run_baseline(groups) -> list[str]:
    """Failures of the unmutated copy (must be none, or a kill means nothing)."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        dest = Path(tmp)
        copy_package(dest)
        probe = subprocess.run(
            [sys.executable, "-c", "import ssiu.kernels.msgm as m; print(m.__file__)"],
            cwd=dest, env=dict(os.environ, PYTHONPATH=str(dest), TRITON_INTERPRET="1"),
            capture_output=True, text=True,
        )  # fmt: skip
        if not probe.stdout.startswith(str(dest)):
            return [f"the copy is not what gets imported: {probe.stdout}{probe.stderr}"]
        for tests in groups:
            code, output = run_tests(dest, tests)
            if code != 0:
                problems.append(f"{tests}: exit {code}\n{output[-3000:]}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if not args.no_baseline:
        groups = sorted({m.tests for m in chosen})
        if problems := run_baseline(groups):
            print("the unmutated copy fails its parity tests:\n" + "\n".join(problems))
            return 1
    width = max(len(m.name) for m in chosen)
    print(f"{'mutant':{width}}  {'op':10}  {'pass':7}  {'status':8}  "
          "failing tests by dtype (first failing test)")  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_mutant, m) for m in chosen]
        results = []
        for mutant, future in zip(chosen, futures, strict=True):  # in order, as they finish
            status, detail, seconds = future.result()
            results.append((status, detail, seconds))
            shown = summary(detail) if status == "KILLED" else "; ".join(detail)
            print(f"{mutant.name:{width}}  {mutant.op:10}  {mutant.direction:7}  {status:8}  "
                  f"{shown}  [{seconds:.0f} s]", flush=True)  # fmt: skip
    bad = [m.name for m, r in zip(chosen, results, strict=True) if r[0] != "KILLED"]
    print(f"{len(chosen) - len(bad)} of {len(chosen)} killed" + (f"; not: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
