"""PSNR / SSIM on Y: hand computations, skimage cross-check, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ssiu.metrics import (
    PEAK,
    gaussian_window,
    psnr_y,
    psnr_y_per_image,
    quantize_8bit,
    rgb_to_y,
    ssim_y,
    ssim_y_per_image,
)


def random_pair(n=2, h=40, w=48, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    # float64 so that k / 255 is exact to ~1e-16 and hand computations compare tightly.
    hr = torch.randint(0, 256, (n, 3, h, w), generator=g).double() / 255
    sr = (hr + noise * torch.randn(hr.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return sr, hr


def test_y_of_known_colours():
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).view(3, 3, 1, 1)
    y = rgb_to_y(rgb.double()).flatten().tolist()
    assert y == pytest.approx([16.0, 235.0, 16.0 + 65.481])


def test_identical_images():
    _, hr = random_pair()
    assert psnr_y(hr, hr.clone(), 2) == math.inf
    assert ssim_y(hr, hr.clone(), 2) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y(hr[0], hr[0], 0) == math.inf  # (3, H, W) accepted


def test_constant_offset_gives_known_psnr():
    g = torch.Generator().manual_seed(1)
    hr = torch.randint(0, 200, (2, 3, 20, 20), generator=g).double() / 255  # room for + offset
    # Unquantised: adding d to R, G and B adds d * 219 to Y (the coefficients sum to 219).
    d = 1 / 219
    assert psnr_y(hr + d, hr, 3, quantize=False) == pytest.approx(20 * math.log10(255), abs=1e-9)
    # Quantised: +3 levels on every channel of an 8-bit image -> Y moves by 3 * 219 / 255.
    sr = hr + 3 / 255
    expected = 20 * math.log10(255 / (3 * 219 / 255))
    assert psnr_y(sr, hr, 1) == pytest.approx(expected, abs=1e-9)


def test_border_crop_is_applied():
    _, hr = random_pair(n=1, h=20, w=20)
    sr = hr.clone()
    sr[..., :2, :] = 1 - sr[..., :2, :]  # damage only the 2-pixel top border
    assert psnr_y(sr, hr, 2) == math.inf
    assert psnr_y(sr, hr, 1) < 40


def test_batch_mean_of_per_image_values():
    sr, hr = random_pair(n=3)
    per = psnr_y_per_image(sr, hr, 2)
    assert psnr_y(sr, hr, 2) == pytest.approx(sum(per) / 3)
    assert per[1] == pytest.approx(psnr_y(sr[1], hr[1], 2))
    per_ssim = ssim_y_per_image(sr, hr, 2)
    assert ssim_y(sr, hr, 2) == pytest.approx(sum(per_ssim) / 3)


def test_quantize_option():
    sr, hr = random_pair(n=1)
    sr = sr + 0.001  # off the 8-bit grid
    assert quantize_8bit(torch.tensor([-0.2, 0.5 / 255, 1.3])).tolist() == [0.0, 0.0, 1.0]
    assert psnr_y(sr, hr, 0) != psnr_y(sr, hr, 0, quantize=False)
    assert psnr_y(sr, hr, 0, quantize=True) == psnr_y(quantize_8bit(sr), hr, 0, quantize=False)


def test_gaussian_window_matches_opencv_formula():
    w = gaussian_window(dtype=torch.float64)
    assert w.shape == (11, 11)
    assert w.sum().item() == pytest.approx(1.0)
    g = torch.exp(-((torch.arange(11.0, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    assert torch.allclose(w, torch.outer(g, g) / g.sum() ** 2)


@pytest.mark.parametrize("quantize", [True, False])
def test_matches_skimage(quantize):
    metrics = pytest.importorskip("skimage.metrics")
    sr, hr = random_pair(n=2, h=37, w=45, noise=0.08)
    border = 3
    for i in range(2):
        pair = [quantize_8bit(x[i : i + 1]) if quantize else x[i : i + 1] for x in (sr, hr)]
        ys, yh = (rgb_to_y(x.double())[0, 0, border:-border, border:-border].numpy() for x in pair)
        ref_ssim = metrics.structural_similarity(
            ys, yh, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        ref_psnr = metrics.peak_signal_noise_ratio(yh, ys, data_range=255)
        assert ssim_y(sr[i], hr[i], border, quantize=quantize) == pytest.approx(ref_ssim, abs=1e-9)
        assert psnr_y(sr[i], hr[i], border, quantize=quantize) == pytest.approx(ref_psnr, abs=1e-9)


def test_ssim_drops_with_noise():
    a = ssim_y(*random_pair(noise=0.02), 2)
    b = ssim_y(*random_pair(noise=0.2), 2)
    assert 0 < b < a < 1


def test_half_precision_input_accepted():
    sr, hr = random_pair(n=1)
    assert psnr_y(sr.float(), hr.float(), 0) == pytest.approx(psnr_y(sr, hr, 0), abs=1e-4)
    assert psnr_y(sr.half(), hr.bfloat16(), 0) == pytest.approx(psnr_y(sr, hr, 0), abs=0.5)


@pytest.mark.parametrize(
    "sr, hr, border, error, match",
    [
        (torch.rand(3, 20, 20), torch.rand(3, 20, 21), 0, ValueError, "same shape"),
        (torch.rand(1, 3, 20, 20), torch.rand(3, 20, 20), 0, ValueError, "same shape"),
        (torch.zeros(3, 20, 20, dtype=torch.uint8), torch.rand(3, 20, 20), 0, TypeError, "float"),
        (torch.rand(1, 20, 20), torch.rand(1, 20, 20), 0, ValueError, "3 \\(RGB\\) channels"),
        (torch.rand(4, 20, 20), torch.rand(4, 20, 20), 0, ValueError, "3 \\(RGB\\) channels"),
        (torch.rand(20, 20), torch.rand(20, 20), 0, ValueError, "\\(3, H, W\\)"),
        (torch.rand(3, 20, 20), torch.rand(3, 20, 20), 10, ValueError, "border"),
        (torch.rand(3, 20, 20), torch.rand(3, 20, 20), -1, ValueError, "border"),
        ([[0.0]], torch.rand(3, 20, 20), 0, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(sr, hr, border, error, match):
    with pytest.raises(error, match=match):
        psnr_y(sr, hr, border)


def test_nan_and_inf_rejected():
    sr, hr = random_pair(n=1)
    bad = sr.clone()
    bad[0, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psnr_y(bad, hr, 0)
    with pytest.raises(ValueError, match="NaN"):
        ssim_y(hr, bad, 0)
    bad[0, 1, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        ssim_y(bad, hr, 0)


def test_ssim_needs_a_full_window():
    x = torch.rand(3, 14, 30)
    assert psnr_y(x, x, 2) == math.inf  # 10x26 is fine for PSNR
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(x, x, 2)  # 10x26 is too small for an 11x11 window


# ----------------------------------------------------------------------------- protocols


def grey(level: float, h=24, w=24) -> torch.Tensor:
    return torch.full((3, h, w), level / 255, dtype=torch.float64)


def test_authors_psnr_does_not_round():
    # 0.3 of a level above 100 on every channel: rounds back to 100 under BasicSR.
    hr, sr = grey(100), grey(100.3)
    assert psnr_y(sr, hr, 4) == math.inf
    dy = 0.3 * 219 / 255  # the Y coefficients sum to 219
    expected = 20 * math.log10(255 / dy)
    assert psnr_y(sr, hr, 4, protocol="authors") == pytest.approx(expected, abs=1e-9)
    # and does not clamp: 0.2 above white stays 0.2 above white
    over = torch.ones(3, 24, 24, dtype=torch.float64)
    assert psnr_y(over + 0.2, over, 4) == math.inf
    expected = 20 * math.log10(255 / (0.2 * 219))
    assert psnr_y(over + 0.2, over, 4, protocol="authors") == pytest.approx(expected, abs=1e-9)


def test_authors_ssim_on_flat_images_by_hand():
    # Flat images: no variance, SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    hr, sr = grey(100), grey(120)

    def luminance(mx, my, c1):
        return (2 * mx * my + c1) / (mx**2 + my**2 + c1)

    y = lambda level: 16 + 219 * level / 255  # BasicSR's Y, 0..255 scale
    basicsr = luminance(y(120), y(100), (0.01 * PEAK) ** 2)
    assert ssim_y(sr, hr, 2) == pytest.approx(basicsr, abs=1e-12)
    y_theirs = lambda level: 16 + 219 * (level / 255) / 255  # their Y, in [16, 16.86]
    theirs = luminance(y_theirs(120), y_theirs(100), 0.01**2)
    # (variances cancel to ~1e-12 in float64 against C2 = 9e-4)
    assert ssim_y(sr, hr, 2, protocol="authors") == pytest.approx(theirs, abs=1e-8)
    assert basicsr < 0.995 < theirs  # a 20-level shift barely registers with their Y


def test_authors_ssim_keeps_structure_and_reads_higher():
    sr, hr = random_pair(n=2, h=40, w=48, noise=0.05)
    ours = ssim_y_per_image(sr, hr, 4, quantize=False)
    theirs = ssim_y_per_image(sr, hr, 4, protocol="authors")
    # Zero-mean noise leaves local means nearly equal: only the luminance term differs.
    for a, b in zip(ours, theirs, strict=True):
        assert a < b < a + 0.01
    with pytest.raises(ValueError, match="protocol"):
        ssim_y(sr, hr, 4, protocol="matlab")
