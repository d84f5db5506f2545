"""upscale(): whole and tiled inference, dtypes, bad input; image I/O; the `upscale` CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import ssiu
from ssiu import inference
from ssiu.inference import (
    TILE_ALIGN,
    count_tiles,
    read_image,
    tile_spans,
    to_uint8,
    upscale,
    write_png,
)
from ssiu.model import min_input_size

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(scale=4, seed=0):
    torch.manual_seed(seed)
    return ssiu.build(scale, channels=16, heads=2, steps=3).eval()


@pytest.fixture(scope="module")
def photo():
    """A real photograph (skimage's astronaut), (3, 512, 512) float in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    return torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- whole image


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_whole_image_equals_model_forward(scale):
    model = tiny(scale)
    x = torch.rand(2, 3, 20, 27)
    with torch.no_grad():
        expected = model(x).clamp(0, 1)
    out = upscale(model, x, progress=False)
    assert out.shape == (2, 3, 20 * scale, 27 * scale) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    single = upscale(model, x[1], progress=False)
    assert single.shape == (3, 20 * scale, 27 * scale)
    torch.testing.assert_close(single, expected[1], rtol=0, atol=1e-6)


def test_output_clamped_and_no_grad():
    model = tiny()
    with torch.no_grad():
        model.tail.to_rgb.bias.fill_(5.0)  # push the output far above 1
    out = upscale(model, torch.rand(3, 16, 16), progress=False)
    assert out.max().item() == 1.0 and out.min().item() >= 0
    assert not out.requires_grad


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (8, 30), (min_input_size(), 3)])
def test_tiny_images(size):
    """Sides below min_input_size() are edge-replicated, run, and cropped back."""
    model = tiny(2)
    x = torch.rand(3, *size)
    out = upscale(model, x, progress=False)
    assert out.shape == (3, 2 * size[0], 2 * size[1])
    tiled = upscale(model, x, tile=8, tile_overlap=2, progress=False)
    assert tiled.shape == out.shape
    assert torch.isfinite(tiled).all()


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("size", [9, 16, 17, 40, 100, 257])
@pytest.mark.parametrize("tile, overlap", [(1, 0), (5, 0), (16, 16), (32, 8), (48, 16), (300, 4)])
def test_tile_spans_cover_the_image(size, tile, overlap):
    m = min_input_size()
    spans = tile_spans(size, tile, overlap, m)
    covered = []
    for crop_start, crop_end, core_start, core_end in spans:
        assert crop_start % TILE_ALIGN == 0
        assert 0 <= crop_start <= core_start < core_end <= crop_end <= size
        assert crop_end - crop_start >= m  # every crop is big enough for the network
        assert core_start - crop_start >= min(overlap, core_start)  # context before
        assert crop_end - core_end >= min(overlap, size - core_end)  # context after
        assert core_end - core_start <= tile
        covered.extend(range(core_start, core_end))
    assert covered == list(range(size))  # cores tile the axis exactly once, in order


def test_count_tiles():
    assert count_tiles(100, 50, None) == 1
    assert count_tiles(100, 50, 32) == 4 * 2
    assert count_tiles(64, 64, 64) == 1


def test_tile_as_large_as_image_is_exact():
    model = tiny()
    x = torch.rand(1, 3, 30, 40)
    whole = upscale(model, x, progress=False)
    torch.testing.assert_close(upscale(model, x, tile=40, progress=False), whole, rtol=0, atol=0)


def test_tiled_matches_untiled_random_image():
    """Tiny model (16 ch, 3 steps), random image 64x48, partial edge tiles.

    Measured max abs error: overlap 0: 0.34, overlap 16: 6e-4 (32 covers the image). The
    floor that more overlap does not remove comes from ESAM's bilinear upsampling with
    align_corners=True, whose sampling positions depend on the size of the map.
    """
    model = tiny(seed=1)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 48, 64)
    whole = upscale(model, x, progress=False)
    errors = {
        ov: max_diff(upscale(model, x, tile=32, tile_overlap=ov, progress=False), whole)
        for ov in (0, 16, 32)
    }
    assert errors[0] > 1e-2  # the check is sensitive: no context is visibly wrong
    assert errors[16] < 3e-3
    assert errors[32] <= errors[16] + 1e-6 and errors[32] < 2e-3


def test_tiled_matches_untiled_photo(photo):
    """A real photo crop, x2, batch of 2, odd sizes, tile 40 (measured max 5e-4, mean 1e-5)."""
    model = tiny(2, seed=2)
    crop = torch.stack([photo[:, 100:170, 150:239], photo[:, 300:370, 200:289]])  # 70x89
    whole = upscale(model, crop, progress=False)
    tiled = upscale(model, crop, tile=40, tile_overlap=16, progress=False)
    assert tiled.shape == whole.shape == (2, 3, 140, 178)
    assert max_diff(tiled, whole) < 3e-3
    assert (tiled - whole).abs().mean().item() < 1e-4


def test_unaligned_tiles_would_be_worse():
    """Aligning crops to the 16-pixel block grid matters: misaligned tiles differ much more."""
    model = tiny(seed=3)
    torch.manual_seed(3)
    x = torch.rand(1, 3, 48, 48)
    whole = upscale(model, x, progress=False)
    aligned = max_diff(upscale(model, x, tile=24, tile_overlap=4, progress=False), whole)
    original = inference.TILE_ALIGN
    try:
        inference.TILE_ALIGN = 2  # what unaligned (any even) crop starts would give
        unaligned = max_diff(upscale(model, x, tile=24, tile_overlap=4, progress=False), whole)
    finally:
        inference.TILE_ALIGN = original
    assert aligned < 3e-3 < unaligned


def test_tiles_bound_the_work():
    """Every forward pass sees at most tile + 2 overlap (+ up to 15 per side to align)."""
    model = tiny(2)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    out = upscale(model, torch.rand(3, 70, 100), tile=32, tile_overlap=16, progress=False)
    assert out.shape == (3, 140, 200)
    assert len(shapes) == count_tiles(70, 100, 32) == 3 * 4
    assert max(max(s) for s in shapes) <= 32 + 2 * 16 + 2 * (TILE_ALIGN - 1)


def test_progress_bar_over_tiles(capsys):
    upscale(tiny(2), torch.rand(3, 20, 20), tile=10, progress=True)
    assert "4/4" in capsys.readouterr().err


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision_autocast(dtype, tol):
    model = tiny()
    x = torch.rand(3, 16, 24)
    ref = upscale(model, x, progress=False)
    out = upscale(model, x, dtype=dtype, progress=False)
    assert out.dtype == torch.float32
    assert max_diff(out, ref) < tol


def test_fp16_overflow_is_a_clear_error():
    model = tiny()
    with torch.no_grad():
        model.tail.to_rgb.weight.mul_(1e7)  # activations beyond fp16's 65504
    with pytest.raises(RuntimeError, match="fp16 .*NaN/inf.*bfloat16"):
        upscale(model, torch.rand(3, 16, 16), dtype=torch.float16, progress=False)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_cuda_matches_cpu(dtype, tol):
    model = tiny()
    x = torch.rand(3, 40, 56)
    ref = upscale(model, x, progress=False)
    out = upscale(model, x, device="cuda", dtype=dtype, tile=24, progress=False)
    assert out.device == x.device  # gathered on the image's device
    assert max_diff(out, ref) < tol + 3e-3  # + the tiling difference


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.full((3, 16, 16), float("nan")), ValueError, "NaN"),
        (torch.full((3, 16, 16), float("inf")), ValueError, "infinite"),
        (torch.full((3, 16, 16), 1.5), ValueError, r"\[0, 1\]"),
        (torch.full((3, 16, 16), -0.1), ValueError, r"\[0, 1\]"),
        (torch.zeros(3, 16, 16, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(1, 16, 16), ValueError, "RGB"),
        (torch.rand(16, 16), ValueError, "RGB"),
        (torch.rand(1, 1, 3, 16, 16), ValueError, "RGB"),
        (torch.rand(0, 3, 16, 16), ValueError, "empty"),
        (np.zeros((3, 16, 16)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_image(image, error, match):
    with pytest.raises(error, match=match):
        upscale(tiny(2), image, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile=0), "tile"),
        (dict(tile=-8), "tile"),
        (dict(tile=16.0), "tile"),
        (dict(tile=True), "tile"),
        (dict(tile=16, tile_overlap=-1), "tile_overlap"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(dtype="bf16"), "dtype"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upscale(tiny(2), torch.rand(3, 16, 16), progress=False, **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match="SSIU"):
        upscale(torch.nn.Conv2d(3, 3, 1), torch.rand(3, 16, 16), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        upscale(tiny(2), torch.rand(3, 16, 16), device="cuda", progress=False)


# ----------------------------------------------------------------------------- image I/O


def test_png_round_trip(tmp_path):
    x = torch.randint(0, 256, (3, 13, 21)).float() / 255
    write_png(x, tmp_path / "a.png")
    back = read_image(tmp_path / "a.png")
    assert back.shape == (3, 13, 21) and back.dtype == torch.float32
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    # out-of-range values are clamped, in-between values rounded
    assert to_uint8(torch.tensor([-1.0, 0.5 / 255 + 1e-4, 2.0]).view(3, 1, 1)).ravel().tolist() == [
        0,
        1,
        255,
    ]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_read_other_modes(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), np.uint8))
    rgb.convert(mode).save(tmp_path / "x.png")
    x = read_image(tmp_path / "x.png")
    assert x.shape == (3, 9, 11) and 0 <= x.min() and x.max() <= 1


def test_read_jpeg_and_16bit_png(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    Image.fromarray(array).save(tmp_path / "x.jpg", quality=95)
    assert read_image(tmp_path / "x.jpg").shape == (3, 10, 12)
    deep = np.full((4, 5), 1001, dtype=np.uint16)  # not a multiple of 257: not 8-bit
    Image.fromarray(deep).save(tmp_path / "deep.png")
    x = read_image(tmp_path / "deep.png")
    assert x.shape == (3, 4, 5)
    assert (x == torch.tensor(1001 / 65535, dtype=torch.float32)).all()  # all 16 bits kept


def test_io_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        write_png(torch.rand(3, 4, 4), tmp_path / "nope" / "out.png")
    with pytest.raises(ValueError, match=".png"):
        write_png(torch.rand(3, 4, 4), tmp_path / "out.jpg")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        write_png(torch.rand(1, 3, 4, 4), tmp_path / "out.png")


# ----------------------------------------------------------------------------- CLI


def parse(argv):
    parser = argparse.ArgumentParser(prog="ssiu")
    inference.add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture()
def files(tmp_path):
    model = tiny(2)
    ssiu.save(model, tmp_path / "w.safetensors")
    lr = torch.randint(0, 256, (3, 18, 25)).float() / 255
    write_png(lr, tmp_path / "in.png")
    return tmp_path, model, lr


def test_cli_upscale(files, capsys):
    tmp, model, lr = files
    args = parse(["upscale", str(tmp / "in.png"), str(tmp / "out.png"),
                  "--weights", str(tmp / "w.safetensors"), "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "device=cpu" in captured.err and "dtype=fp32" in captured.err
    assert "backend=torch" in captured.err
    out = read_image(tmp / "out.png")
    assert out.shape == (3, 36, 50)
    expected = torch.from_numpy(to_uint8(upscale(model, lr, progress=False))).permute(2, 0, 1)
    assert torch.equal((out * 255).round().to(torch.uint8), expected)


def test_cli_upscale_tiled_bf16(files, capsys):
    tmp, _, _ = files
    args = parse(["upscale", str(tmp / "in.png"), str(tmp / "out.png"), "--weights",
                  str(tmp / "w.safetensors"), "--tile", "10", "--tile-overlap", "4",
                  "--dtype", "bf16", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    assert "tiles=6" in capsys.readouterr().err
    assert read_image(tmp / "out.png").shape == (3, 36, 50)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(input="missing.png"), FileNotFoundError, "input image not found"),
        (dict(input="text.png"), ValueError, "cannot read"),
        (dict(output="nodir/out.png"), FileNotFoundError, "output directory"),
        (dict(output="out.jpg"), ValueError, ".png"),
        (dict(weights="missing.pt"), FileNotFoundError, "weights file not found"),
        (dict(extra=["--tile", "0"]), ValueError, "tile"),
        (dict(extra=["--device", "nonsense"]), ValueError, "device"),
    ],
)
def test_cli_upscale_errors(files, change, error, match):
    tmp, _, _ = files
    (tmp / "text.png").write_text("not an image")
    argv = ["upscale", str(tmp / change.get("input", "in.png")),
            str(tmp / change.get("output", "out.png")),
            "--weights", str(tmp / change.get("weights", "w.safetensors")),
            "--no-progress", *change.get("extra", [])]  # fmt: skip
    args = parse(argv)
    with pytest.raises(error, match=match):
        args.func(args)


def test_cli_main_reports_errors(files, capsys):
    import ssiu.cli as cli

    tmp, _, _ = files
    code = cli.main(["upscale", str(tmp / "in.png"), str(tmp / "out.png"),
                     "--weights", str(tmp / "missing.pt")])  # fmt: skip
    assert code != 0
    assert "weights file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fast paths


def test_choose_path_policy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    big = inference.AUTO_COMPILE_PIXELS
    assert not inference.choose_path(cpu, big, False, "auto")["compiled"]
    assert not inference.choose_path(gpu, big - 1, False, "auto")["compiled"]
    assert inference.choose_path(gpu, big, False, "auto") == {
        "compiled": True, "mode": None, "why": "torch.compile, dynamic H/W"}  # fmt: skip
    assert inference.choose_path(gpu, 1, True, "on")["mode"] == "reduce-overhead"
    assert inference.choose_path(cpu, 1, True, True)["mode"] is None  # CUDA graphs: CUDA only
    assert not inference.choose_path(gpu, big, True, False)["compiled"]
    with pytest.raises(ValueError, match="compile must be one of"):
        inference.choose_path(cpu, 1, False, "fast")


def test_compiled_upscale_equals_eager():
    """Compiled (Dynamo; the "eager" compiler keeps CPU CI fast), whole and tiled."""
    torch._dynamo.reset()
    model = tiny(2)
    x = torch.rand(1, 3, 30, 21)
    for tile in (None, 16):
        expected = upscale(model, x, tile=tile, progress=False)
        out = upscale(model, x, tile=tile, progress=False, compile=True, compiler="eager")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_cli_upscale_reports_path(files, capsys):
    tmp, _, _ = files
    args = parse(["upscale", str(tmp / "in.png"), str(tmp / "out.png"), "--weights",
                  str(tmp / "w.safetensors"), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert args.compile == "auto"
    assert args.func(args) == 0
    assert "path=eager (no compile on CPU)" in capsys.readouterr().err
