"""ONNX export: dynamic batch/height/width, top-k options, onnxruntime parity, CLI, bad input.

Tiny models (16 channels, 3 steps) keep the exports to seconds; the released x4
architecture was measured the same way (max abs error 2e-7 dense, 2e-6 with
attn_topk=16, moe_topk=1; see ssiu/export.py). The released-size and dynamo-exporter
checks are marked slow (minutes on a 2-core CPU; `make test-slow`).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import ssiu
from ssiu.export import VERIFY_SIZES, add_cli, export_onnx, photo_inputs, verify_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

slow_export = pytest.mark.slow  # minutes on a 2-core CPU: `make test-slow` runs them
# Max abs difference ONNX Runtime vs PyTorch accepted here (measured: ~2e-7 dense).
TOL = 1e-5


def tiny(scale=4, **options):
    torch.manual_seed(0)
    return ssiu.build(scale=scale, channels=16, steps=3, **options)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny x4 model in training mode on the reference backend, and its ONNX file."""
    model = tiny(scale=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "x4.onnx")
    # exporting leaves the model as it was
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return model.eval(), path


def test_dynamic_shapes_match_pytorch_on_photos(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == ["sr"]
    # two sizes (neither the traced one; one odd, one a multiple of 16) and batch 2
    inputs = photo_inputs(VERIFY_SIZES, batch=2) + photo_inputs(((32, 16),))
    errors = verify_onnx(path, model, inputs, tolerance=TOL)
    assert set(errors) == {"2x48x40", "2x33x57", "1x32x16"}
    assert max(errors.values()) <= TOL


def test_topk_options(tmp_path):
    model = tiny(scale=3, attn_topk=16, moe_topk=1)
    path = export_onnx(model, tmp_path / "m.onnx", opset=13)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("TopK") == 3 + 1  # one per ESAM (3 steps), one in MoE-FS
    errors = verify_onnx(path, model, tolerance=TOL)
    assert len(errors) == len(VERIFY_SIZES)


def test_verify_catches_a_wrong_graph(exported):
    model, path = exported
    other = tiny()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.bias.add_(0.01)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        verify_onnx(path, other)


def test_bad_arguments(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="opset must be an int in \\[11, 20\\]"):
        export_onnx(model, tmp_path / "m.onnx", opset=9)
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(model, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(ValueError, match=".onnx"):
        export_onnx(model, tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="output directory does not exist"):
        export_onnx(model, tmp_path / "nope" / "m.onnx")
    with pytest.raises(TypeError, match="ssiu.SSIU"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="H, W >= 9"):
        verify_onnx(tmp_path / "m.onnx", model, [torch.rand(1, 3, 8, 20)])
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        verify_onnx(tmp_path / "m.onnx", model)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="ssiu")
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli(tmp_path, capsys, monkeypatch):
    # The CLI exports the released size; a tiny model keeps this test fast.
    weights = tmp_path / "tiny.safetensors"
    ssiu.save(tiny(scale=2), weights)
    out = tmp_path / "tiny.onnx"
    args = _parse(["export", str(out), "--weights", str(weights), "--opset", "17"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "x2, opset 17" in text and "max abs error" in text
    args = _parse(["export", str(out), "--weights", str(weights), "--scale", "4", "--no-verify"])
    with pytest.raises(ValueError, match="--scale 4"):
        args.func(args)
    real_build = ssiu.build
    small = lambda scale=4, **o: real_build(scale=scale, channels=16, steps=3, **o)
    monkeypatch.setattr(ssiu, "build", small)
    args = _parse(["export", str(tmp_path / "r.onnx"), "--scale", "3", "--moe-topk", "1",
                   "--no-verify"])  # fmt: skip
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights (x3)" in captured.err and "moe_topk=1" in captured.out
    assert "max abs error" not in captured.out


@slow_export
def test_released_architecture_with_topk(tmp_path):
    model = ssiu.build(scale=4, attn_topk=16, moe_topk=1)
    path = export_onnx(model, tmp_path / "x4.onnx")
    assert max(verify_onnx(path, model, tolerance=TOL).values()) <= TOL


@slow_export
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model = tiny(scale=4, attn_topk=16)
    path = export_onnx(model, tmp_path / "d.onnx", exporter="dynamo", opset=18)
    assert max(verify_onnx(path, model, tolerance=TOL).values()) <= TOL
