"""`ssiu eval`: benchmark layouts, the per-set table, bicubic baseline and clear errors.

The benchmark folder is built here from crops of scikit-image's photos, in the three
layouts (HR + LR_bicubic/X4, GTmod12 + LRbicx4, HR only), with a tiny random model.
"""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
from PIL import Image

import ssiu
import ssiu.data
from ssiu.data import bicubic_downsample, bicubic_upsample, crop_to_multiple, to_tensor
from ssiu.evaluate import SyntheticLRWarning, add_cli, evaluate, find_sets
from ssiu.metrics import psnr_y, ssim_y

SCALE = 4
PHOTOS = ("astronaut", "chelsea", "coffee")


def tiny_model(scale: int = SCALE):
    torch.manual_seed(0)
    return ssiu.build(scale=scale, channels=16, steps=3).eval()


@pytest.fixture(scope="module")
def crops():
    images = ssiu.data.sample_images(list(PHOTOS))
    # 50x62: not a multiple of 4 (mod crop to 48x60) nor of 12; LR 12x15 (>= 9)
    return {name: a[100:150, 120:182].copy() for name, a in images.items()}


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def bench(tmp_path, crops):
    """DIR/Set5 (HR + LR_bicubic/X4, x4 suffix), DIR/Set14 (GTmod12 + LRbicx4),
    DIR/Urban100 (HR only)."""
    root = tmp_path / "benchmarks"
    for name, hr in crops.items():
        _save(hr, root / "Set5" / "HR" / f"{name}.png")
        lr = bicubic_downsample(crop_to_multiple(hr, SCALE), SCALE)
        _save(lr, root / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")
        hr12 = crop_to_multiple(hr, 12)
        _save(hr12, root / "Set14" / "GTmod12" / f"{name}.png")
        _save(bicubic_downsample(hr12, SCALE), root / "Set14" / "LRbicx4" / f"{name}.png")
        _save(hr, root / "Urban100" / "HR" / f"{name}.png")
    return root


def test_table_rows_and_values(bench, crops):
    model = tiny_model()
    with pytest.warns(SyntheticLRWarning, match="Urban100"):
        report = evaluate(model, bench, progress=False)
    rows = report.rows()
    assert [r["set"] for r in rows] == ["Set5", "Set14", "Urban100"]  # standard order
    assert [r["images"] for r in rows] == [3, 3, 3]
    for row in rows:
        for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
            assert math.isfinite(row[key]), (row["set"], key)
        assert 0 < row["ssim"] <= 1 and 0 < row["bicubic_ssim"] <= 1
    # All three layouts hold the same mod-cropped photos and the same bicubic LR.
    for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        assert rows[0][key] == pytest.approx(rows[1][key], abs=1e-9)
        assert rows[0][key] == pytest.approx(rows[2][key], abs=1e-9)
    # One image by hand: mod crop, model, 8-bit rounding, Y, border = scale.
    hr8 = crop_to_multiple(crops["chelsea"], SCALE)
    lr = to_tensor(bicubic_downsample(hr8, SCALE))
    hr = to_tensor(hr8)
    with torch.no_grad():
        sr = model(lr[None])[0].clamp(0, 1)
    got = report.sets[0].images["chelsea"]
    assert got["psnr"] == pytest.approx(psnr_y(sr, hr, SCALE), abs=1e-6)
    assert got["ssim"] == pytest.approx(ssim_y(sr, hr, SCALE), abs=1e-6)
    up = bicubic_upsample(lr, SCALE)
    assert got["bicubic_psnr"] == pytest.approx(psnr_y(up, hr, SCALE), abs=1e-9)

    text = report.table()
    assert "| Set14 | 3 |" in text and "bicubic PSNR" in text and "border 4" in text
    csv_lines = report.table("csv").splitlines()
    assert csv_lines[0] == "set,images,psnr,ssim,bicubic_psnr,bicubic_ssim,scale"
    assert len(csv_lines) == 4 and csv_lines[1].startswith("Set5,3,")
    assert len(report.per_image_csv().splitlines()) == 1 + 9


def test_authors_protocol(bench, crops):
    model = tiny_model()
    with torch.no_grad():
        model.tail.to_rgb.bias += 0.3  # bright pixels overshoot 1: clamping would show
    report = evaluate(model, bench, sets="Set5", progress=False, protocol="authors")
    assert "the authors' protocol" in report.table()
    # One image by hand: raw float output (no clamp, no rounding), the authors' metrics.
    hr8 = crop_to_multiple(crops["coffee"], SCALE)
    lr = to_tensor(bicubic_downsample(hr8, SCALE))
    hr = to_tensor(hr8)
    with torch.no_grad():
        sr = model(lr[None])[0]
    assert sr.max() > 1
    got = report.sets[0].images["coffee"]
    assert got["psnr"] == pytest.approx(psnr_y(sr, hr, SCALE, protocol="authors"), abs=1e-6)
    assert got["ssim"] == pytest.approx(ssim_y(sr, hr, SCALE, protocol="authors"), abs=1e-6)
    up = bicubic_upsample(lr, SCALE)
    assert got["bicubic_ssim"] == pytest.approx(ssim_y(up, hr, SCALE, protocol="authors"))
    basicsr = evaluate(model, bench, sets="Set5", progress=False).sets[0].images["coffee"]
    assert got["ssim"] > basicsr["ssim"] and got["psnr"] != basicsr["psnr"]
    with pytest.raises(ValueError, match="protocol"):
        evaluate(model, bench, progress=False, protocol="matlab")


def test_set_selection_aliases_and_single_set_folder(bench):
    (bench / "Set14").rename(bench / "BSDS100")
    chosen = find_sets(bench, SCALE, "b100, set5")
    assert [s.name for s in chosen] == ["BSDS100", "Set5"]
    assert chosen[0].layout == "GTmod12 + LRbicx4"
    assert chosen[1].layout == "HR + LR_bicubic/X4"
    # DIR may be one set folder itself
    (own,) = find_sets(bench / "Set5", SCALE)
    assert own.name == "Set5" and own.lr_dir is not None
    # a flat folder of HR images: LR made by bicubic
    (flat,) = find_sets(bench / "Urban100" / "HR", SCALE)
    assert flat.lr_dir is None
    # x2 has no LR folders here: everything falls back to bicubic LR
    assert all(s.lr_dir is None for s in find_sets(bench, 2))


def test_without_bicubic_and_tiled(bench):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Set5 has LR images: no warning
        whole = evaluate(tiny_model(), bench, sets=["Set5"], bicubic=False, progress=False)
        tiled = evaluate(tiny_model(), bench, sets="Set5", tile=9, tile_overlap=16, progress=False)
    assert "bicubic_psnr" not in whole.rows()[0] and "bicubic" not in whole.table()
    assert tiled.rows()[0]["psnr"] == pytest.approx(whole.rows()[0]["psnr"], abs=0.05)


def test_bad_layouts_give_clear_errors(bench, tmp_path):
    model = tiny_model()
    (bench / "Set5" / "LR_bicubic" / "X4" / "coffeex4.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Set5.*no LR partner.*coffee\.png"):
        evaluate(model, bench, sets="Set5", progress=False)
    with pytest.raises(ValueError, match=r"unknown set\(s\) \['Set7'\].*found: Set14, Set5"):
        find_sets(bench, SCALE, "Set7")
    empty = tmp_path / "empty_set"
    (empty / "HR").mkdir(parents=True)
    (empty / "LR_bicubic" / "X4").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        evaluate(model, empty, progress=False)
    with pytest.raises(ValueError, match="no benchmark sets"):
        find_sets(tmp_path / "empty_set" / "LR_bicubic", SCALE)
    with pytest.raises(FileNotFoundError, match="benchmark folder not found"):
        find_sets(tmp_path / "nope", SCALE)
    with pytest.raises(ValueError, match="does not match the model"):
        evaluate(model, bench, scale=2, progress=False)
    # LR images of the wrong scale (x4 files in a folder used for an x2 model)
    x2 = bench / "Set14" / "LRbicx2"
    (bench / "Set14" / "LRbicx4").rename(x2)
    with pytest.raises(ValueError, match="wrong scale"):
        evaluate(tiny_model(scale=2), bench, sets="Set14", progress=False)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="ssiu")
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli(bench, tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    ssiu.save(tiny_model(), weights)
    md, csv_path, per_image = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "img.csv"
    args = _parse(["eval", "--weights", str(weights), "--data", str(bench), "--device", "cpu",
                   "--sets", "Set5,Urban100", "--out", str(md), "--out", str(csv_path),
                   "--per-image", str(per_image), "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "| Set5 | 3 |" in captured.out and "| Urban100 | 3 |" in captured.out
    assert "Set14" not in captured.out
    assert "warning:" in captured.err and "Urban100" in captured.err
    assert md.read_text().count("\n| ") == 3  # header + 2 sets
    assert csv_path.read_text().startswith("set,images,psnr")
    assert len(per_image.read_text().splitlines()) == 7
    theirs = _parse(["eval", "--weights", str(weights), "--data", str(bench), "--device", "cpu",
                     "--sets", "Set5", "--protocol", "authors", "--no-progress"])  # fmt: skip
    assert theirs.func(theirs) == 0
    assert "the authors' protocol" in capsys.readouterr().out
    bad = _parse(["eval", "--weights", str(weights), "--data", str(bench), "--scale", "2"])
    with pytest.raises(ValueError, match="--scale 2"):
        bad.func(bad)
