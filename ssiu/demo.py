"""`ssiu demo`: train SSIU briefly on embedded photos and show what it learned.

Trains on six photographs shipped with scikit-image and evaluates on two it never sees
(`DEMO_HELD_OUT`), whole images, PSNR/SSIM on Y (border = scale) against bicubic
upscaling, before and after training. Writes into the output folder:

    comparison.png   bicubic | SSIU | ground truth, a detailed crop of each held-out photo
    sr_<name>.png    SSIU's full output for each held-out photo
    report.md        config, steps, time, loss, metrics before/after, verdict
    report.json      the same numbers, machine-readable
    ssiu_x<s>.safetensors, checkpoint.pt, history.json   (from `ssiu.training.train`)

`--minutes` is the wall-clock budget of the whole demo: the number of training steps is
set from a short timing probe so that the cosine schedule ends inside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ssiu.config import SSIUConfig
from ssiu.data import (
    InMemoryPairs,
    PatchBatchSampler,
    PatchDataset,
    ValidationSet,
    bicubic_upsample,
    sample_images,
    to_uint8,
)
from ssiu.devices import resolve_device
from ssiu.losses import ssiu_loss
from ssiu.model import SSIU, count_parameters
from ssiu.training import (
    evaluate,
    format_metrics,
    seed_everything,
    train,
)

DEMO_TRAIN = (
    "coffee", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry", "retina",
)  # fmt: skip
DEMO_HELD_OUT = ("astronaut", "chelsea")

# Released model, and the reduced one the demo trains on a CPU: a few minutes of a 2-core
# CPU buy about 4x more steps of it than of the full model, which learns more in that time.
PRESETS = {
    "full": {},
    "small": {"channels": 32, "steps": 3},
}
# Per device type: (preset, batch size, LR patch side, minutes).
DEVICE_DEFAULTS = {
    "cpu": ("small", 8, 32, 3.0),
    "cuda": ("full", 40, 64, 5.0),
}
CROP = 128  # HR side of each tile of comparison.png (shown zoomed 2x)


def _defaults(device: torch.device) -> tuple[str, int, int, float]:
    return DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


def time_steps(model: SSIU, patches: PatchDataset, batch_size: int, device, steps: int = 3,
               compile: bool = False):  # fmt: skip
    """Seconds per training step, timed on a throwaway copy of the model (warm-up excluded).

    compile: time the torch.compile'd step (the warm-up step compiles; Inductor's caches
    then make the training run's own compilation of the same graph quick).
    """
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=0.0)
    if compile:
        from ssiu.compile import compile_for_training

        probe = compile_for_training(probe)
    sampler = PatchBatchSampler(len(patches), batch_size, seed=12345)
    times = []
    for i in range(steps + 1):
        keys = sampler.batch(i)
        lr = torch.stack([patches[k][0] for k in keys]).to(device)
        hr = torch.stack([patches[k][1] for k in keys]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss = ssiu_loss(probe(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def _detail_crop(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the size x size window (on a grid) with the most gradient energy."""
    g = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
    h, w = g.shape
    size = min(size, h - 1, w - 1)
    best, where = -1.0, (0, 0)
    step = max(size // 4, 1)
    for top in range(0, h - size, step):
        for left in range(0, w - size, step):
            e = float(energy[top : top + size, left : left + size].mean())
            if e > best:
                best, where = e, (top, left)
    return where


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def comparison_image(rows: list[dict], scale: int, crop: int = CROP, zoom: int = 2) -> Image.Image:
    """rows: {"name", "bicubic", "sr", "hr": (3, H, W) tensors, "labels": 3 strings}."""
    tile, label_h, pad = crop * zoom, 24, 6
    width = 3 * tile + 4 * pad
    height = len(rows) * (tile + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    y = pad
    for row in rows:
        hr = to_uint8(row["hr"])
        top, left = _detail_crop(hr, crop)
        size = min(crop, hr.shape[0] - 1, hr.shape[1] - 1)
        for col, (key, label) in enumerate(
            zip(("bicubic", "sr", "hr"), row["labels"], strict=True)
        ):
            array = to_uint8(row[key])[top : top + size, left : left + size]
            image = Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST)
            x = pad + col * (tile + pad)
            draw.text((x, y + 3), label, fill=(0, 0, 0), font=font)
            canvas.paste(image, (x, y + label_h))
        y += tile + label_h + pad
    return canvas


def _fmt_row(name: str, bic: dict, before: dict, after: dict) -> str:
    return (
        f"| {name} | {bic['bicubic_psnr']:.2f} / {bic['bicubic_ssim']:.4f} "
        f"| {before['psnr']:.2f} / {before['ssim']:.4f} "
        f"| {after['psnr']:.2f} / {after['ssim']:.4f} "
        f"| {after['psnr'] - bic['bicubic_psnr']:+.2f} dB |"
    )


def verdict(before: dict, after: dict, first_loss: float, last_loss: float) -> str:
    gain = after["psnr"] - before["psnr"]
    vs_bicubic = after["psnr"] - after["bicubic_psnr"]
    text = [
        f"The training loss went from {first_loss:.4f} to {last_loss:.4f} "
        f"({'down' if last_loss < first_loss else 'NOT down'}), and PSNR-Y on the held-out "
        f"photos from {before['psnr']:.2f} to {after['psnr']:.2f} dB ({gain:+.2f} dB)."
    ]
    if vs_bicubic > 0:
        text.append(
            f"After training SSIU beats bicubic upscaling by {vs_bicubic:.2f} dB PSNR-Y "
            f"(SSIM-Y {after['ssim']:.4f} vs {after['bicubic_ssim']:.4f})."
        )
    else:
        text.append(
            f"After this short training SSIU is still {-vs_bicubic:.2f} dB BELOW bicubic "
            f"upscaling (SSIM-Y {after['ssim']:.4f} vs {after['bicubic_ssim']:.4f}): a few "
            "minutes on a handful of photos is far from the released training (290 epochs "
            "of DF2K); give it more --minutes or a GPU."
        )
    if gain <= 0:
        text.append("PSNR did not improve over the untrained model: this run did not learn.")
    return " ".join(text)


def demo(
    out_dir: str | os.PathLike = "demo_out",
    minutes: float | None = None,
    iterations: int | None = None,
    scale: int = 4,
    preset: str | None = None,
    batch_size: int | None = None,
    patch_size: int | None = None,
    device: str | torch.device = "auto",
    backend: str = "auto",
    seed: int = 2024,
    eval_crop: int | None = None,
    progress: bool = True,
    log=print,
    compile: bool | None = None,
) -> dict:
    """Run the demo; returns the report dict (also written to out_dir/report.json).

    minutes: wall-clock budget of the whole demo (default 3 on CPU, 5 on CUDA);
    iterations: fix the number of training steps instead (still capped by `minutes` if
    given). eval_crop: evaluate on LR centre crops of this side instead of whole photos
    (faster; for tests). preset: "small" (32 channels, 3 steps: default on CPU) or "full"
    (the released model: default on CUDA). compile: torch.compile the training step
    (None: on CUDA, where backend "auto" also picks the fused kernels; off on CPU).
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    d_preset, d_batch, d_patch, d_minutes = _defaults(device)
    preset = preset or d_preset
    if compile is None:
        compile = device.type == "cuda"
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    batch_size = batch_size or d_batch
    patch_size = patch_size or d_patch
    if minutes is None and iterations is None:
        minutes = d_minutes
    if minutes is not None and (not math.isfinite(minutes) or minutes <= 0):
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    if iterations is not None and (isinstance(iterations, bool) or iterations < 1):
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = SSIUConfig(scale=scale, **PRESETS[preset])

    photos = sample_images(DEMO_TRAIN + DEMO_HELD_OUT)
    train_pairs = InMemoryPairs({k: photos[k] for k in DEMO_TRAIN}, scale)
    held_out = InMemoryPairs({k: photos[k] for k in DEMO_HELD_OUT}, scale)
    val_set = ValidationSet(held_out, crop=eval_crop)
    patches = PatchDataset(train_pairs, patch_size, seed=seed)

    seed_everything(seed)
    model = SSIU(config).to(device).set_backend(backend)
    n_params = count_parameters(model)
    log(f"ssiu demo: x{scale} SSIU ({preset} preset, {n_params:,} parameters) on {device}, "
        f"backend {backend}{', compiled' if compile else ''}; training on "
        f"{', '.join(DEMO_TRAIN)}; held out: {', '.join(DEMO_HELD_OUT)}")  # fmt: skip

    threads = torch.get_num_threads()
    try:
        step_s = time_steps(model, patches, batch_size, device, compile=compile)
        if device.type == "cpu" and threads > 1 and not compile:
            # On a busy CPU one intra-op thread can be several times faster than the default.
            torch.set_num_threads(1)
            single_s = time_steps(model, patches, batch_size, device)
            if single_s < step_s:
                log(f"using 1 CPU thread: {single_s:.3f} s/step vs {step_s:.3f} with {threads}")
                step_s = single_s
            else:
                torch.set_num_threads(threads)

        t = time.perf_counter()
        before = evaluate(model, val_set, device)
        eval_s = time.perf_counter() - t
        log(f"before training: {format_metrics(before)}")

        n_val = 3  # validations during training: at 1/3, 2/3 and the end
        if minutes is not None:
            spent = time.perf_counter() - t0
            budget = minutes * 60 - spent - (n_val + 1) * eval_s - 3.0
            planned = max(int(budget / step_s), 10)
            if iterations is not None:
                planned = min(planned, iterations)
            time_limit = max(minutes * 60 - spent - 2 * eval_s, 1.0)
        else:
            planned, time_limit = iterations, None
        log(f"timing probe: {step_s:.3f} s/step at batch {batch_size} of {patch_size}x{patch_size}"
            f" LR patches -> {planned} steps")  # fmt: skip

        result = train(
            dataset=train_pairs, model=model, iterations=planned, time_limit=time_limit,
            batch_size=batch_size, patch_size=patch_size, seed=seed, val_dataset=val_set,
            val_every=max(1, math.ceil(planned / n_val)), val_at_start=False, save_every=0,
            log_every=max(1, planned // 50), out_dir=out, device=device, backend=backend,
            num_workers=0, progress=progress, compile=compile,
        )  # fmt: skip
        after = result.history["val"][-1]
        train_s = result.history["train"][-1]["time"]

        rows, per_image = [], []
        model.eval()
        with torch.no_grad():
            for i in range(len(val_set)):
                name, lr, hr = val_set[i]
                sr = model(lr.unsqueeze(0).to(device)).float().clamp(0, 1).cpu()[0]
                bic = bicubic_upsample(lr, scale)
                Image.fromarray(to_uint8(sr)).save(out / f"sr_{name}.png")
                b, a = before["images"][name], after["images"][name]
                rows.append({
                    "name": name, "bicubic": bic, "sr": sr, "hr": hr,
                    "labels": (f"bicubic  {a['bicubic_psnr']:.2f} dB",
                               f"SSIU  {a['psnr']:.2f} dB", f"ground truth ({name})"),
                })  # fmt: skip
                per_image.append(_fmt_row(name, a, b, a))
        comparison = out / "comparison.png"
        comparison_image(rows, scale).save(comparison)

        first, last = result.first_loss, result.last_loss
        total_s = time.perf_counter() - t0
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "backend": backend,
            "compiled": bool(compile),
            "torch": torch.__version__,
            "config": config.to_dict(),
            "preset": preset,
            "parameters": n_params,
            "train_photos": list(DEMO_TRAIN),
            "held_out_photos": list(DEMO_HELD_OUT),
            "batch_size": batch_size,
            "patch_size": patch_size,
            "eval_crop": eval_crop,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "steps": result.step,
            "planned_steps": planned,
            "stopped_early": result.stopped_early,
            "train_seconds": train_s,
            "total_seconds": total_s,
            "loss_first": first,
            "loss_last": last,
            "before": {k: v for k, v in before.items()},
            "after": {k: v for k, v in after.items()},
            "validation": [
                {k: v for k, v in e.items() if k != "images"} for e in result.history["val"]
            ],
            "verdict": verdict(before, after, first, last),
        }
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(_markdown(report, per_image))
        log(f"after {result.step} steps ({train_s:.0f} s of training): {format_metrics(after)}")
        log(report["verdict"])
        log(f"outputs in {out.resolve()}: comparison.png, report.md, report.json, sr_*.png, "
            f"ssiu_x{scale}.safetensors (total {total_s:.0f} s)")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return report


def _markdown(r: dict, per_image: list[str]) -> str:
    c = r["config"]
    reduced = r["preset"] != "full"
    model_line = (
        f"SSIU x{c['scale']}, {c['channels']} channels, {c['steps']} unfolding steps, "
        f"{c['heads']} heads: {r['parameters']:,} parameters"
        + (" (a REDUCED model: the released one has 64 channels and 9 steps; "
           "use `--preset full` for it)" if reduced else " (the released architecture)")
    )  # fmt: skip
    b, a = r["before"], r["after"]
    lines = [
        f"# SSIU demo, x{c['scale']}",
        "",
        f"{r['date']}, {r['device']}"
        + (f" ({r['cpu_threads']} thread(s))" if r["cpu_threads"] else "")
        + f", backend {r['backend']}"
        + (" (torch.compile)" if r.get("compiled") else "")
        + f", torch {r['torch']}.",
        "",
        "## Setup",
        "",
        f"- Model: {model_line}.",
        f"- Training photos (scikit-image): {', '.join(r['train_photos'])}; LR made by "
        "bicubic downsampling (Pillow, MATLAB-like antialiased bicubic).",
        f"- Held-out photos (never trained on): {', '.join(r['held_out_photos'])}, "
        + ("whole images" if r["eval_crop"] is None else f"LR centre crops of {r['eval_crop']}")
        + f"; PSNR/SSIM on Y (BT.601), {c['scale']}-pixel border cropped, 8-bit outputs.",
        f"- Recipe: L1 + 0.01 FFT-L1, AdamW lr 1e-3 betas (0.9, 0.99) wd 1e-4, cosine to "
        f"1e-6 over {r['planned_steps']} steps, batch {r['batch_size']} of "
        f"{r['patch_size']}x{r['patch_size']} LR patches with flips/transposes.",
        "",
        "## Training",
        "",
        f"- Steps: {r['steps']} of {r['planned_steps']} planned"
        + (" (stopped by the time budget)" if r["stopped_early"] else "")
        + f"; {r['train_seconds']:.0f} s of training, {r['total_seconds']:.0f} s in all.",
        f"- Loss: {r['loss_first']:.4f} at the first step, {r['loss_last']:.4f} at the end.",
        "",
        "| step | SSIU PSNR-Y | SSIU SSIM-Y |",
        "|---|---|---|",
        f"| 0 (untrained) | {b['psnr']:.2f} | {b['ssim']:.4f} |",
        *(f"| {e['step']} | {e['psnr']:.2f} | {e['ssim']:.4f} |" for e in r["validation"]),
        "",
        "## Held-out photos: PSNR-Y (dB) / SSIM-Y",
        "",
        "| photo | bicubic | SSIU untrained | SSIU trained | trained vs bicubic |",
        "|---|---|---|---|---|",
        *per_image,
        _fmt_row("**mean**", a, b, a),
        "",
        "## Verdict",
        "",
        r["verdict"],
        "",
        "![bicubic | SSIU | ground truth](comparison.png)",
        "",
        f"Weights: `ssiu_x{c['scale']}.safetensors` (try `ssiu upscale IN.png OUT.png "
        f"--weights ssiu_x{c['scale']}.safetensors`); full outputs: `sr_*.png`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train briefly on embedded photos, compare with bicubic on held-out ones",
        description=(
            "Train SSIU for a few minutes on photographs shipped with scikit-image, then "
            "measure PSNR/SSIM-Y against bicubic on two held-out photos and write a "
            "side-by-side PNG and a report. On a CPU it trains a reduced model "
            "(32 channels, 3 steps) for 3 minutes; on CUDA the released x4 model for 5."
        ),
    )
    p.add_argument("--minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget of the demo (default 3 on CPU, 5 on CUDA)")  # fmt: skip
    p.add_argument("--iters", type=int, default=None, metavar="N",
                   help="train exactly N steps (capped by --minutes if also given)")  # fmt: skip
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=4, help="default 4")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="small (default on CPU) or full (released, default on CUDA)")  # fmt: skip
    p.add_argument("--batch-size", type=int, metavar="N", help="default 8 on CPU, 40 on CUDA")
    p.add_argument("--patch", type=int, default=None, metavar="P",
                   help="LR patch side (default 32 on CPU, 64 on CUDA)")  # fmt: skip
    p.add_argument("--out", default="demo_out", metavar="DIR", help="default ./demo_out")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="auto: fused Triton kernels on CUDA, reference elsewhere")  # fmt: skip
    p.add_argument("--seed", type=int, default=2024, metavar="S", help="default 2024")
    p.add_argument("--eval-crop", type=int, default=None, metavar="N",
                   help="evaluate on N x N LR centre crops (default: whole photos)")  # fmt: skip
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step (auto: on CUDA)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    demo(
        out_dir=args.out, minutes=args.minutes, iterations=args.iters, scale=args.scale,
        preset=args.preset, batch_size=args.batch_size, patch_size=args.patch,
        device=args.device, backend=args.backend, seed=args.seed, eval_crop=args.eval_crop,
        progress=not args.no_progress, log=lambda text: print(text, flush=True),
        compile={"auto": None, "on": True, "off": False}[args.compile],
    )  # fmt: skip
    return 0
