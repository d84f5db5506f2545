"""Validation during training: the data sets, the measurement (`ssiu.evaluate`'s
`image_metrics`, so the numbers match `ssiu eval`), and its one-line summary."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ssiu.data import InMemoryPairs, PairSource, ValidationSet, make_pairs, sample_images
from ssiu.model import SSIU
from ssiu.training.settings import DEFAULT_VAL_CROP


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def evaluate(
    model: SSIU,
    val_set: ValidationSet,
    device: torch.device | None = None,
    amp: bool = False,
    with_bicubic: bool = True,
) -> dict:
    """PSNR/SSIM on Y (BT.601, border = scale) of the model, and of bicubic upscaling.

    Returns {"psnr", "ssim", ["bicubic_psnr", "bicubic_ssim"], "images": {name: {...}}},
    the means over images. Outputs are clamped and rounded to 8 bits before measuring.
    """
    from ssiu.evaluate import image_metrics

    device = device or next(model.parameters()).device
    s = val_set.scale
    was_training = model.training
    model.eval()
    per_image = {}
    try:
        for i in range(len(val_set)):
            name, lr, hr = val_set[i]
            with autocast(device, amp):
                sr = model(lr.unsqueeze(0).to(device))
            per_image[name] = image_metrics(sr.float().cpu()[0], lr, hr, s, with_bicubic)
    finally:
        model.train(was_training)
    keys = list(next(iter(per_image.values())))
    means = {k: float(np.mean([r[k] for r in per_image.values()])) for k in keys}
    return {**means, "images": per_image}


def format_metrics(m: dict) -> str:
    text = f"PSNR-Y {m['psnr']:.2f} dB, SSIM-Y {m['ssim']:.4f}"
    if "bicubic_psnr" in m:
        text += (
            f" (bicubic {m['bicubic_psnr']:.2f} dB, {m['bicubic_ssim']:.4f}; "
            f"SSIU {m['psnr'] - m['bicubic_psnr']:+.2f} dB)"
        )
    return text


def as_source(data, scale: int) -> PairSource:
    """A training/validation data set: a `ssiu.data` pair source or a dict name -> image."""
    if isinstance(data, PairSource):
        if data.scale != scale:
            raise ValueError(f"the dataset is for x{data.scale} but the model is x{scale}")
        return data
    if isinstance(data, Mapping):
        return InMemoryPairs(data, scale)
    raise TypeError(f"dataset must be a PairSource or a dict of images, got {type(data)}")


def validation_set(val_hr_dir, val_lr_dir, val_dataset, val_crop, scale) -> ValidationSet:
    if isinstance(val_dataset, ValidationSet):
        if val_dataset.scale != scale:
            raise ValueError(f"the validation set is x{val_dataset.scale}, the model x{scale}")
        return val_dataset
    if val_dataset is not None:
        return ValidationSet(as_source(val_dataset, scale), crop=val_crop)
    if val_hr_dir is not None:
        return ValidationSet(make_pairs(val_hr_dir, val_lr_dir, scale), crop=val_crop)
    if val_lr_dir is not None:
        raise ValueError("a validation LR folder needs its HR folder (val_hr_dir)")
    crop = DEFAULT_VAL_CROP if val_crop is None else val_crop
    return ValidationSet(InMemoryPairs(sample_images(), scale), crop=crop)
