"""PSNR and SSIM on the Y channel: BasicSR's convention (default), or the SSIU authors' own.

Both metrics take RGB tensors in [0, 1], shaped (N, 3, H, W) or (3, H, W), and return the
mean over the batch of the per-image values as a Python float.

Convention (SSIU.md, "Evaluation"; the BasicSR `calculate_psnr/ssim(test_y_channel=True)`
pipeline):

1. `quantize=True` (default): both images are clamped to [0, 1] and rounded to the 256
   levels of an 8-bit image, as happens when the SR output is saved to PNG or converted
   with BasicSR's `tensor2img` (`(x.clamp(0, 1) * 255).round()`). The reference HR image
   read from an 8-bit file is unchanged by this. `quantize=False` measures the raw float
   output: rounding adds about 0.03 to the Y-channel MSE (0..255 scale), so at ~30 dB
   the two differ by a few thousandths of a dB; outputs outside [0, 1] are clamped only
   when quantizing.
2. Y of BT.601 YCbCr: Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1], so Y is
   in [16, 235] on a 0..255 scale. Y is kept in float64, *not* rounded to an integer.
3. `border` pixels are cropped on every side (the scale factor, by convention).
4. PSNR = 10 log10(255^2 / MSE) with MSE over the cropped Y plane; identical images give
   `inf`.
5. SSIM: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid'
   filtering (no padding, so the SSIM map is 10 pixels smaller in each direction than the
   cropped image), mean of the map. This is Wang et al.'s `ssim_index.m` and BasicSR's
   `_ssim`; it equals skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
   use_sample_covariance=False, data_range=255)`.

The defaults (quantize=True, unrounded float Y, border = scale) are BasicSR's `tensor2img`
+ `calculate_psnr/calculate_ssim(crop_border=scale, test_y_channel=True)`: protocol
"basicsr", what `ssiu eval`, the training validation and the demo report.

Protocol "authors" (`protocol="authors"`, `ssiu eval --protocol authors`) follows the
SSIU authors' own test code, to compare with the paper's table:
no clamping and no 8-bit rounding of the output (PSNR is then `quantize=False`), and SSIM
on a mis-scaled Y: their `rgb_to_ycbcr` expects 0..255 data and divides by 255, and they
call it on [0, 1] data, so Y' = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 lies in
[16, 16.86]; SSIM on Y' uses the constants of data range 1 (C1 = 0.01^2, C2 = 0.03^2),
which keeps the contrast/structure term of the proper SSIM and makes the luminance term
about 1. It reads about 0.001-0.005 higher than BasicSR's SSIM; PSNR moves by a few
thousandths of a dB. Reconstructed from a description of their code (window, border and
'valid' filtering assumed as above): their script was not available to run against it.

Where numbers can differ from other evaluation code:
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# BT.601 luma for RGB in [0, 1] -> Y in [16, 235] (Matlab rgb2ycbcr, BasicSR bgr2ycbcr).
Y_OFFSET = 16.0
Y_COEFFS = (65.481, 128.553, 24.966)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PEAK = 255.0
PROTOCOLS = ("basicsr", "authors")


def _check_pair(sr: torch.Tensor, hr: torch.Tensor, border: int, min_side: int):
    """Validate the two images and return them as (N, 3, H, W) float64 on sr's device."""
    for name, x in (("sr", sr), ("hr", hr)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating tensor with RGB values in [0, 1], got {x.dtype} "
                "(convert 8-bit images with x.float() / 255)"
            )
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-3] != 3:
            raise ValueError(f"{name} must have 3 (RGB) channels, got shape {tuple(x.shape)}")
    if sr.shape != hr.shape:
        raise ValueError(
            f"sr {tuple(sr.shape)} and hr {tuple(hr.shape)} must have the same shape "
            "(crop the HR image to the SR size, e.g. to a multiple of the scale, first)"
        )
    if isinstance(border, bool) or not isinstance(border, int) or border < 0:
        raise ValueError(f"border must be an int >= 0, got {border!r}")
    h, w = sr.shape[-2:]
    if min(h, w) - 2 * border < min_side:
        raise ValueError(
            f"images are {h}x{w}; cropping border={border} on each side leaves "
            f"{h - 2 * border}x{w - 2 * border}, this metric needs at least {min_side}x{min_side}"
        )
    for name, x in (("sr", sr), ("hr", hr)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    sr = sr.detach().to(torch.float64)
    hr = hr.detach().to(device=sr.device, dtype=torch.float64)
    if sr.dim() == 3:
        sr, hr = sr[None], hr[None]
    return sr, hr


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels of an 8-bit image (still float)."""
    return (x.clamp(0, 1) * 255).round() / 255


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 Y (0..255 scale, float) of RGB in [0, 1]: (N, 3, H, W) -> (N, 1, H, W)."""
    coeffs = torch.tensor(Y_COEFFS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * coeffs).sum(1, keepdim=True) + Y_OFFSET


def rgb_to_y_authors(x: torch.Tensor) -> torch.Tensor:
    """The authors' mis-scaled Y of RGB in [0, 1]: 16 + (65.481 R + 128.553 G + 24.966 B) / 255
    (a 0..255 formula applied to [0, 1] data), in [16, 16.86]: (N, 3, H, W) -> (N, 1, H, W)."""
    return (rgb_to_y(x) - Y_OFFSET) / PEAK + Y_OFFSET


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def _y_planes(sr, hr, border: int, quantize: bool, to_y=rgb_to_y):
    if quantize:
        sr, hr = quantize_8bit(sr), quantize_8bit(hr)
    y_sr, y_hr = to_y(sr), to_y(hr)
    if border:
        y_sr = y_sr[..., border:-border, border:-border]
        y_hr = y_hr[..., border:-border, border:-border]
    return y_sr, y_hr


def psnr_y_per_image(
    sr: torch.Tensor,
    hr: torch.Tensor,
    border: int = 0,
    *,
    quantize: bool = True,
    protocol: str = "basicsr",
) -> list[float]:
    """PSNR (dB) on Y of every image of the batch; `inf` where the Y planes are equal."""
    if check_protocol(protocol) == "authors":
        quantize = False  # their script measures the raw float output
    sr, hr = _check_pair(sr, hr, border, 1)
    y_sr, y_hr = _y_planes(sr, hr, border, quantize)
    mse = (y_sr - y_hr).square().mean(dim=(1, 2, 3)).tolist()
    return [math.inf if m == 0 else 10 * math.log10(PEAK**2 / m) for m in mse]


def psnr_y(
    sr: torch.Tensor,
    hr: torch.Tensor,
    border: int = 0,
    *,
    quantize: bool = True,
    protocol: str = "basicsr",
) -> float:
    """Mean over the batch of the Y-channel PSNR (dB, peak 255) of sr against hr.

    sr, hr: (N, 3, H, W) or (3, H, W) float RGB in [0, 1], equal shapes.
    border: pixels cropped on each side before measuring (the scale, by convention).
    quantize: round both images to 8 bits first, as saving the SR output to PNG would
        (the usual evaluation; see the module docstring).
    protocol: "basicsr" (default) or "authors" (no rounding: quantize is ignored).
    Identical images give `inf` (and a batch containing one gives `inf`).
    """
    values = psnr_y_per_image(sr, hr, border, quantize=quantize, protocol=protocol)
    return sum(values) / len(values)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, **kw) -> torch.Tensor:
    """(size, size) normalised Gaussian, the outer product of cv2.getGaussianKernel(size, sigma)."""
    r = torch.arange(size, **kw) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(y_sr: torch.Tensor, y_hr: torch.Tensor, data_range: float = PEAK) -> torch.Tensor:
    """SSIM map of (N, 1, H, W) planes, 'valid' filtering: (N, 1, H-10, W-10).

    data_range: L of the constants C1 = (K1 L)^2, C2 = (K2 L)^2 (255: Y on a 0..255 scale).
    """
    window = gaussian_window(dtype=y_sr.dtype, device=y_sr.device)[None, None]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    blur = lambda t: F.conv2d(t, window)
    mu_x, mu_y = blur(y_sr), blur(y_hr)
    var_x = blur(y_sr * y_sr) - mu_x**2
    var_y = blur(y_hr * y_hr) - mu_y**2
    cov = blur(y_sr * y_hr) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def ssim_y_per_image(
    sr: torch.Tensor,
    hr: torch.Tensor,
    border: int = 0,
    *,
    quantize: bool = True,
    protocol: str = "basicsr",
) -> list[float]:
    """SSIM on Y of every image of the batch."""
    sr, hr = _check_pair(sr, hr, border, SSIM_WINDOW)
    if check_protocol(protocol) == "authors":
        y_sr, y_hr = _y_planes(sr, hr, border, False, rgb_to_y_authors)
        return ssim_map(y_sr, y_hr, data_range=1.0).mean(dim=(1, 2, 3)).tolist()
    y_sr, y_hr = _y_planes(sr, hr, border, quantize)
    return ssim_map(y_sr, y_hr).mean(dim=(1, 2, 3)).tolist()


def ssim_y(
    sr: torch.Tensor,
    hr: torch.Tensor,
    border: int = 0,
    *,
    quantize: bool = True,
    protocol: str = "basicsr",
) -> float:
    """Mean over the batch of the Y-channel SSIM of sr against hr (1.0 for identical images).

    sr, hr: (N, 3, H, W) or (3, H, W) float RGB in [0, 1], equal shapes, at least 11x11
    after cropping `border` pixels on each side. 11x11 Gaussian window (sigma 1.5),
    K1 0.01, K2 0.03, L 255, 'valid' filtering (Wang et al. / BasicSR / Matlab convention).
    quantize: round both images to 8 bits first (see the module docstring).
    protocol: "basicsr" (default) or "authors" (unrounded, the authors' mis-scaled Y and
        data range 1; quantize is ignored).
    """
    values = ssim_y_per_image(sr, hr, border, quantize=quantize, protocol=protocol)
    return sum(values) / len(values)


__all__ = [
    "PROTOCOLS",
    "check_protocol",
    "gaussian_window",
    "psnr_y",
    "psnr_y_per_image",
    "quantize_8bit",
    "rgb_to_y",
    "rgb_to_y_authors",
    "ssim_map",
    "ssim_y",
    "ssim_y_per_image",
]
