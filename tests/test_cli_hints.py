"""What a new user meets on the command line: wrong inputs read as one clear input error
(issue 14), hints name commands that work, sizes are height x width everywhere."""

import sys

import pytest
import torch

import ssiu
from ssiu import cli, export
from ssiu.inference import write_png


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    model = ssiu.build(scale=2, channels=8, steps=3, heads=2)
    ssiu.save(model, tmp_path / "w.safetensors")
    write_png(torch.rand(3, 18, 25), tmp_path / "in.png")
    return tmp_path


def _error(argv, capsys) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SSIU_DEBUG" not in err, err  # an input error
    return err


def _upscale(tmp, *extra):
    return ["upscale", str(tmp / "in.png"), str(tmp / "out.png"), "--weights",
            str(tmp / "w.safetensors"), "--no-progress", "--threads", "1", *extra]  # fmt: skip


def test_an_image_given_as_weights(files, capsys):
    for argv in (["info", "--weights", str(files / "in.png")],
                 ["upscale", str(files / "in.png"), str(files / "o.png"), "--weights",
                  str(files / "in.png")]):  # fmt: skip
        err = _error(argv, capsys)
        assert "is a PNG image, not a checkpoint" in err and "weights_only" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_an_input_error(files, capsys):
    err = _error(_upscale(files, "--device", "cuda"), capsys)
    assert "CUDA is not available" in err and "--device cpu" in err


@pytest.mark.parametrize("tile, match", [("0", "--tile must be >= 1"), ("4", "smaller than")])
def test_tiles_too_small_are_refused(files, capsys, tile, match):
    assert match in _error(_upscale(files, "--tile", tile), capsys)


def test_upscale_prints_height_x_width(files, capsys):
    assert cli.main(_upscale(files)) == 0
    assert "x2 18x25 -> 36x50 (height x width)" in capsys.readouterr().err


def test_info_refuses_sizes_the_model_refuses(capsys):
    assert "at least 9x9" in _error(["info", "--size", "5x5"], capsys)


def test_onnx_hints_name_the_checkout_install(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if missing
    argv = ["export", str(files / "m.onnx"), "--weights", str(files / "w.safetensors")]
    err = _error([*argv, "--threads", "1"], capsys)
    assert "pip install -e '.[onnx]'" in err and "ssiu[onnx]" not in err


def test_each_exporter_has_a_working_default_opset():
    assert export.default_opset("torchscript") == 17 and export.default_opset("dynamo") == 18
    for name in export.EXPORTERS:
        export._check_opset(export.default_opset(name), name)
