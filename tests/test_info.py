"""MAC counts (analytic vs FlopCounterMode, vs the paper) and the `info` CLI."""

from __future__ import annotations

import argparse

import pytest

import ssiu
from ssiu import info
from ssiu.config import SSIUConfig
from ssiu.flops import PAPER_GMACS, PAPER_LR_SIZES, count_flops, count_flops_traced

# Exact MACs of the released networks at the paper's LR sizes (1280x720 output).
EXPECTED_PADDED = {2: 167_151_370_240, 3: 76_602_101_760, 4: 48_905_256_960}
EXPECTED_UNPADDED = {2: 163_517_644_800, 3: 75_715_503_360, 4: 45_848_678_400}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_released_counts(scale):
    h, w = PAPER_LR_SIZES[scale]
    padded = count_flops(SSIUConfig(scale=scale), h, w)
    unpadded = count_flops(SSIUConfig(scale=scale), h, w, padded=False)
    assert padded.macs == EXPECTED_PADDED[scale]
    assert unpadded.macs == EXPECTED_UNPADDED[scale]
    assert padded.flops == 2 * padded.macs
    assert padded.output_size == (h * scale, w * scale)
    assert padded.grid == (-(-h // 16) * 16, -(-w // 16) * 16)
    # The paper's "FLOPs" are MACs: within 2.5% of one of the two counts, never ~2x.
    paper = PAPER_GMACS[scale] * 1e9
    assert min(abs(padded.macs - paper), abs(unpadded.macs - paper)) / paper < 0.025
    assert padded.flops > 1.9 * paper


def test_x4_hand_count():
    """Per padded LR pixel, C = 64: head 27C, 9 steps x (4 MSGM (4C^2 + 9C) + ESAM at a
    quarter of the pixels (3C^2 qkv + 200C attention + 9C dw)), MoE 4C^2, tail 4C^2 +
    4 x 4C^2 + 16 x 27C."""
    c = 64
    per_pixel = (
        27 * c
        + 9 * (4 * (4 * c * c + 9 * c) + (3 * c * c + 200 * c + 9 * c) // 4)
        + 4 * c * c
        + 4 * c * c + 4 * 4 * c * c + 16 * 27 * c
    )  # fmt: skip
    assert count_flops(ssiu.build(4), 180, 320).macs == per_pixel * 192 * 320


@pytest.mark.parametrize(
    "config, size",
    [
        (SSIUConfig(scale=4), (180, 320)),
        (SSIUConfig(scale=3), (37, 50)),
        (SSIUConfig(scale=2, channels=16, heads=2, steps=3), (21, 33)),
        (SSIUConfig(scale=4, channels=32, block=4, halo=2), (40, 24)),
        (SSIUConfig(scale=2, block=6), (48, 48)),  # half grid 24 -> reflect-padded to 24
        (SSIUConfig(scale=2, block=5), (32, 48)),  # half grid 16x24 -> padded to 20x25
    ],
)
def test_analytic_matches_flop_counter(config, size):
    """FlopCounterMode on the meta device counts 2 x MACs of conv and matmul."""
    assert count_flops_traced(config, *size) == count_flops(config, *size).flops


def test_parts_and_inputs():
    count = count_flops(ssiu.build(2, channels=16, heads=2, steps=3), 32, 32)
    assert set(count.parts) == {
        "head", "msgm", "esam_qkv", "esam_attention", "esam_local_prop", "moe", "tail"
    }  # fmt: skip
    assert count.macs == sum(count.parts.values())
    # MACs scale with the number of pixels (no padding at multiples of 16)
    assert count_flops(count.config, 64, 32).macs == 2 * count.macs
    with pytest.raises(TypeError, match="SSIUConfig"):
        count_flops("x4", 32, 32)
    with pytest.raises(ValueError, match="height"):
        count_flops(count.config, 0, 32)
    with pytest.raises(ValueError, match="width"):
        count_flops(count.config, 32, 2.5)


def test_describe_released_x4():
    text = info.describe(SSIUConfig(scale=4))
    assert "parameters: 794,467 (paper: 794K)" in text
    assert "180x320" in text and "output: 720x1280" in text
    assert "48.91 G" in text and "45.85 G" in text
    assert "paper: 49G" in text


def test_size_parsing():
    assert info.parse_size("180x320") == (180, 320)
    assert info.parse_size(" 48 X 64 ") == (48, 64)
    for bad in ("320", "x180", "0x5", "-3x4", "axb"):
        with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
            info.parse_size(bad)


def parse(argv):
    parser = argparse.ArgumentParser(prog="ssiu")
    info.add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.parametrize("scale, params", [(2, "777,827"), (3, "798,627"), (4, "794,467")])
def test_cli_info_fresh(scale, params, capsys):
    args = parse(["info", "--scale", str(scale)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"parameters: {params}" in out
    assert f"paper: {PAPER_GMACS[scale]}G" in out


def test_cli_info_size_and_weights(tmp_path, capsys):
    model = ssiu.build(2, channels=16, heads=2, steps=3)
    ssiu.save(model, tmp_path / "w.safetensors")
    args = parse(["info", "--weights", str(tmp_path / "w.safetensors"), "--size", "24x40"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"parameters: {ssiu.count_parameters(model):,}" in out
    assert "output: 48x80" in out
    assert "channels=16" in out
    macs = count_flops(model, 24, 40).macs  # height 24, width 40
    assert f"{macs / 1e9:.2f} G" in out
    bad = parse(["info", "--weights", str(tmp_path / "w.safetensors"), "--scale", "4"])
    with pytest.raises(ValueError, match="x2 model"):
        bad.func(bad)
    missing = parse(["info", "--weights", str(tmp_path / "missing.pt")])
    with pytest.raises(FileNotFoundError):
        missing.func(missing)
