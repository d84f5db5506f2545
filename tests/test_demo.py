"""ssiu.demo: a very short run writes the comparison PNG and an honest report."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from ssiu import demo


def test_demo_short_run_writes_outputs(tmp_path):
    lines = []
    report = demo.demo(out_dir=tmp_path, iterations=2, batch_size=2, patch_size=16,
                       device="cpu", eval_crop=24, progress=False, log=lines.append)  # fmt: skip
    for name in ("comparison.png", "report.md", "report.json", "ssiu_x4.safetensors",
                 "sr_astronaut.png", "sr_chelsea.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / "comparison.png") as image:
        assert image.size[0] > 3 * demo.CROP and image.size[1] > 2 * demo.CROP
    with Image.open(tmp_path / "sr_chelsea.png") as image:
        assert image.size == (96, 96)  # the x4 output of the 24x24 LR centre crop
    assert report["steps"] == 2 and report["preset"] == "small"
    assert report["held_out_photos"] == list(demo.DEMO_HELD_OUT)
    assert not set(report["held_out_photos"]) & set(report["train_photos"])
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "REDUCED model" in text and "bicubic" in text and "Verdict" in text
    assert report["before"]["bicubic_psnr"] == pytest.approx(report["after"]["bicubic_psnr"])
    assert any("outputs in" in line for line in lines)


def test_demo_cli_time_budget(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_cli(parser.add_subparsers())
    args = parser.parse_args(["demo", "--minutes", "0.05", "--batch-size", "2", "--patch",
                              "16", "--out", str(tmp_path), "--no-progress",
                              "--device", "cpu", "--eval-crop", "16"])  # fmt: skip
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] >= 1 and (tmp_path / "comparison.png").is_file()
    assert str(tmp_path) in capsys.readouterr().out


def test_verdict_is_honest():
    before = {"psnr": 20.0, "ssim": 0.5}
    worse = {"psnr": 25.0, "ssim": 0.7, "bicubic_psnr": 26.0, "bicubic_ssim": 0.8}
    text = demo.verdict(before, worse, 0.1, 0.05)
    assert "BELOW bicubic" in text and "+5.00 dB" in text
    better = {"psnr": 27.0, "ssim": 0.85, "bicubic_psnr": 26.0, "bicubic_ssim": 0.8}
    assert "beats bicubic upscaling by 1.00 dB" in demo.verdict(before, better, 0.1, 0.05)
    stuck = demo.verdict({"psnr": 30.0, "ssim": 0.9}, better, 0.1, 0.2)
    assert "did not learn" in stuck and "NOT down" in stuck
    with pytest.raises(ValueError, match="minutes"):
        demo.demo(out_dir="unused", minutes=-1)


def test_demo_compile_defaults(monkeypatch, tmp_path):
    """compile=None means compiled on CUDA only: on CPU the demo stays eager."""
    parser = argparse.ArgumentParser()
    demo.add_cli(parser.add_subparsers())
    assert parser.parse_args(["demo"]).compile == "auto"
    seen = {}

    def fake_train(**kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "time_steps", lambda *a, **k: seen.setdefault("probe", k) and 0.1)
    with pytest.raises(RuntimeError, match="stop here"):
        demo.demo(out_dir=tmp_path, iterations=1, batch_size=2, patch_size=16, device="cpu",
                  eval_crop=16, progress=False, log=lambda line: None)  # fmt: skip
    assert seen["compile"] is False and seen["probe"] == {"compile": False}
