"""`ssiu profile`: the static profile of one fused step, at a small size (fake tensors)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from ssiu.cli import main  # noqa: E402


def test_profile_of_a_training_step(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--train", "--batch", "2", "--size", "32x32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train x4, batch 2, 32x32 LR, bfloat16" in text
    assert "msgm_fwd_kernel" in text and "saved for backward: fused" in text
    result = json.loads(out.read_text())
    kernels = result["kernels"]
    # One gate backward and dx backward per MSGM (4 per step, 9 steps); S1 and S2 share
    # one forward launch (the pair), refine and ffn run one each.
    assert kernels["msgm_fwd_pair_kernel"]["launches"] == 9
    assert kernels["msgm_fwd_kernel"]["launches"] == 18
    assert kernels["msgm_bwd_dx_kernel"]["launches"] == 36
    assert result["triton_launches"] == sum(k["launches"] for k in kernels.values())
    # The glue between ops (head conv, skip, loss, gradient sums) stays; inside the custom
    # ops none is left (issue 11: every launch inside an op is a kernel).
    assert result["torch_ops_outside"]["count"] > 0 and result["torch_ops_inside"]["count"] == 0
    b = result["bytes"]
    assert b["total"] == b["triton"] + b["torch_outside"] + b["torch_inside"]
    assert 0 < b["floor"] < b["total"]
    # Every custom op reading its inputs and writing its outputs once, plus the PyTorch ops
    # outside: between the floor and what the kernels move.
    assert b["floor"] < b["op_boundaries"] < b["total"]
    assert b["op_boundaries"] > b["torch_outside"]
    assert "op boundaries:" in text
    saved = result["saved_for_backward"]
    assert 0 < saved["fused"]["bytes"] < saved["reference"]["bytes"]
    assert result["sass_sm90"] == {}  # not asked for


def test_profile_of_an_inference_step_reads_kernel_figures(tmp_path, capsys):
    from ssiu.launch_capture import tensor_bytes  # noqa: F401  (module imports cleanly)

    table = tmp_path / "kernels.json"
    table.write_text(json.dumps([
        {"kernel": "msgm_fwd_kernel", "config": "c", "arch": 90, "registers": 100, "spills": 0,
         "shared": 0, "warps_per_sm": 16, "hmma": 8, "hgmma": 0, "ldg": {"16": 3, "2": 1},
         "stg": {"8": 1}},
    ]))  # fmt: skip
    argv = ["profile", "--infer", "--size", "24x40", "--dtype", "fp32", "--kernels-json"]
    assert main([*argv, str(table)]) == 0
    text = capsys.readouterr().out
    assert "infer x4, batch 1, 24x40 LR, float32" in text
    assert "saved for backward" not in text
    row = next(line for line in text.splitlines() if line.startswith("msgm_fwd_kernel"))
    assert row.split()[1:2] == ["18"] and "100" in row and "20%" in row and "80%" in row
