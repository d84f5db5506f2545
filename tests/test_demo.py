"""ssiu.demo: a very short run writes the comparison PNG and an honest report, and repeats."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image

import ssiu
from ssiu import demo

TINY = dict(batch_size=2, patch_size=16, device="cpu", eval_crop=24, progress=False)


def test_demo_short_run_writes_outputs(tmp_path):
    lines = []
    report = demo.demo(out_dir=tmp_path, iterations=2, log=lines.append, **TINY)
    for name in ("comparison.png", "report.md", "report.json", "ssiu_x4.safetensors",
                 "sr_astronaut.png", "sr_chelsea.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size[0] > 3 * demo.CROP and image.size[1] > 2 * demo.CROP
    with Image.open(tmp_path / "sr_chelsea.png") as image:
        assert image.size == (96, 96)  # the x4 output of the 24x24 LR centre crop
    assert report["steps"] == 2 and report["preset"] == "small" and report["cpu_threads"] == 1
    assert report["held_out_photos"] == list(demo.DEMO_HELD_OUT)
    assert not set(report["held_out_photos"]) & set(report["train_photos"])
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "REDUCED model" in text and "bicubic" in text and "Verdict" in text
    assert "starts at zero" in text and "fixed" in text
    assert report["before"]["bicubic_psnr"] == pytest.approx(report["after"]["bicubic_psnr"])
    assert any("outputs in" in line for line in lines)
    # The saved weights are the trained model, loadable as usual.
    model = ssiu.load(tmp_path / "ssiu_x4.safetensors")
    assert model.config.channels == 32 and model.tail.to_rgb.weight.abs().sum() > 0


def test_two_runs_give_identical_numbers(tmp_path):
    runs = [demo.demo(out_dir=tmp_path / str(i), iterations=3, log=lambda line: None, **TINY)
            for i in range(2)]  # fmt: skip
    a, b = runs
    assert a["loss"] == b["loss"] and len(a["loss"]) == 3
    for key in ("psnr", "ssim", "bicubic_psnr"):
        assert a["after"][key] == b["after"][key] and a["before"][key] == b["before"][key]
    weights = [ssiu.load(tmp_path / str(i) / "ssiu_x4.safetensors").state_dict() for i in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_untrained_network_is_its_bilinear_skip():
    torch.manual_seed(0)
    model = demo.zero_residual_(ssiu.build(4, channels=16, steps=3)).eval()
    x = torch.rand(1, 3, 16, 32)  # a multiple of 16: no reflect padding before the skip
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear")
        torch.testing.assert_close(model(x), expected)


def test_schedule_warms_up_then_decays_to_zero():
    total = 200
    f = [demo.lr_factor(i, total) for i in range(total)]
    n_warm = round(demo.WARMUP * total)
    assert f[0] == pytest.approx(1 / n_warm) and f[n_warm - 1] == 1.0 and f[n_warm] == 1.0
    assert all(b <= a for a, b in zip(f[n_warm:], f[n_warm + 1 :], strict=False))
    assert f[-1] < 1e-3 and f[(total + n_warm) // 2] == pytest.approx(0.5, abs=0.01)
    assert demo.lr_factor(0, 1) == 1.0  # a 1-step run still takes a step


def test_threads_are_restored():
    before = torch.get_num_threads()
    with demo.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cli_options(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_cli(parser.add_subparsers())
    assert parser.parse_args(["demo"]).compile == "auto"
    args = parser.parse_args(["demo", "--iters", "1", "--batch-size", "2", "--patch", "16",
                              "--out", str(tmp_path), "--no-progress", "--device", "cpu",
                              "--eval-crop", "16", "--threads", "1"])  # fmt: skip
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 1 and math.isfinite(report["train_seconds"])
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "wall time" in out


def test_verdict_is_honest():
    before = {"psnr": 20.0, "ssim": 0.5}
    worse = {"psnr": 25.0, "ssim": 0.7, "bicubic_psnr": 26.0, "bicubic_ssim": 0.8}
    text = demo.verdict(before, worse, 0.1, 0.05)
    assert "BELOW bicubic" in text and "+5.00 dB" in text
    better = {"psnr": 27.0, "ssim": 0.85, "bicubic_psnr": 26.0, "bicubic_ssim": 0.8}
    assert "beats bicubic upscaling by 1.00 dB" in demo.verdict(before, better, 0.1, 0.05)
    stuck = demo.verdict({"psnr": 30.0, "ssim": 0.9}, better, 0.1, 0.2)
    assert "did not learn" in stuck and "NOT down" in stuck
    with pytest.raises(ValueError, match="iterations"):
        demo.demo(out_dir="unused", iterations=0)
