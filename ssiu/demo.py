"""`ssiu demo`: train SSIU briefly on embedded photos and show what it learned.

Trains on six photographs shipped with scikit-image and evaluates on two it never sees
(`DEMO_HELD_OUT`), whole images, PSNR/SSIM on Y (border = scale) against bicubic
upscaling, before and after training. Writes into the output folder:

    comparison.png   bicubic | SSIU | ground truth, a detailed crop of each held-out photo
    sr_<name>.png    SSIU's full output for each held-out photo
    report.md        config, steps, time, loss, metrics before/after, verdict
    report.json      the same numbers (and the loss and validation history)
    ssiu_x<s>.safetensors   the trained weights (`ssiu upscale ... --weights`)

Reproducible: a fixed number of steps (`DEVICE_DEFAULTS`, or `iterations`), one seed for
the weights and the patches, and on a CPU a fixed thread count (1 by default: the same
numbers on every run and any load; several threads on a shared CPU can run many times
slower). The wall time is reported, and estimated after the first steps.

Short-run recipe (what the field does for short runs; the released recipe is in
`ssiu.training`): the last convolution of the tail starts at zero, so the untrained
network is exactly its bilinear skip and training only adds detail (the released
model's initialisation is PyTorch's default; architecture and state dict are the
released ones); AdamW with a linear warm-up over the first `WARMUP` of the steps, then
cosine decay to 0; patches with texture (`PatchDataset(min_std=...)`).
"""

from __future__ import annotations

import argparse
import contextlib
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
from ssiu.training import evaluate, format_metrics, seed_everything

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
# Per device type: (preset, batch size, LR patch side, training steps).
DEVICE_DEFAULTS = {
    "cpu": ("small", 8, 32, 600),
    "cuda": ("full", 40, 64, 3000),
}
CPU_THREADS = 1  # default intra-op threads on a CPU (see the module docstring)
PEAK_LR = 2e-3
WARMUP = 0.05  # fraction of the steps
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 1e-4
MIN_STD = 8.0  # flat-patch rejection threshold (LR standard deviation, 0..255 scale)
N_VAL = 3  # validations during training: at 1/3, 2/3 and the end
CROP = 128  # HR side of each tile of comparison.png (shown zoomed 2x)


def zero_residual_(model: SSIU) -> SSIU:
    """Zero the tail's last convolution (weight and bias): the network then outputs its
    bilinear skip exactly, and training starts from there instead of from noise on top.
    Changes values only, not the architecture or the state dict's keys."""
    with torch.no_grad():
        model.tail.to_rgb.weight.zero_()
        model.tail.to_rgb.bias.zero_()
    return model


def lr_factor(step: int, total: int, warmup: float = WARMUP) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`: linear warm-up
    over the first `warmup` of the run, then cosine decay to 0 at the end."""
    n_warm = max(1, round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with `n` intra-op threads (None: unchanged), restoring the count afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _defaults(device: torch.device) -> tuple[str, int, int, int]:
    return DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


def train_steps(model, net, patches: PatchDataset, val_set, *, steps, batch_size, device,
                progress, log) -> dict:  # fmt: skip
    """The demo's training loop: `steps` AdamW steps of `net` (the model, maybe compiled).

    Returns {"loss": per-step losses, "val": validations, "train_seconds",
    "step_seconds": the median of steps 2-4 (the first compiles or warms caches)}.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps))
    sampler = PatchBatchSampler(len(patches), batch_size, seed=patches.seed, steps=steps)
    val_at = {math.ceil(steps * k / N_VAL) for k in range(1, N_VAL + 1)}
    losses, val, times = [], [], []
    start = time.perf_counter()
    model.train()
    for step, keys in enumerate(tqdm(sampler, desc="demo", unit="step", disable=not progress)):
        t = time.perf_counter()
        lr = torch.stack([patches[k][0] for k in keys]).to(device)
        hr = torch.stack([patches[k][1] for k in keys]).to(device)
        loss = ssiu_loss(net(lr), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())  # syncs: the step is done when timed
        times.append(time.perf_counter() - t)
        if step == 3 and steps > 4:
            per_step = float(np.median(times[1:4]))
            log(f"{per_step:.2f} s/step: about {per_step * (steps - 4) / 60:.1f} min of "
                "training to go")  # fmt: skip
        if step + 1 in val_at:
            metrics = evaluate(model, val_set, device)
            model.train()
            val.append({"step": step + 1, **{k: v for k, v in metrics.items()}})
            log(f"step {step + 1}/{steps}: {format_metrics(metrics)}")
    return {
        "loss": losses,
        "val": val,
        "train_seconds": time.perf_counter() - start,
        "step_seconds": float(np.median(times[1:4] or times)),
    }


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
            "of DF2K); give it more --iters or a GPU."
        )
    if gain <= 0:
        text.append("PSNR did not improve over the untrained model: this run did not learn.")
    return " ".join(text)


def demo(
    out_dir: str | os.PathLike = "demo_out",
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
    threads: int | None = None,
) -> dict:
    """Run the demo; returns the report dict (also written to out_dir/report.json).

    iterations: training steps (default 600 on CPU, 3000 on CUDA). eval_crop: evaluate on
    LR centre crops of this side instead of whole photos (faster; for tests). preset:
    "small" (32 channels, 3 steps: default on CPU) or "full" (the released model: default
    on CUDA). compile: torch.compile the training step (None: on CUDA, where backend
    "auto" also picks the fused kernels; off on CPU). threads: CPU intra-op threads
    (default 1; the numbers are reproducible for a given count).
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    d_preset, d_batch, d_patch, d_steps = _defaults(device)
    preset = preset or d_preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if compile is None:
        compile = device.type == "cuda"
    steps = d_steps if iterations is None else iterations
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    if device.type == "cpu" and threads is None:
        threads = CPU_THREADS
    batch_size = batch_size or d_batch
    patch_size = patch_size or d_patch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = SSIUConfig(scale=scale, **PRESETS[preset])

    photos = sample_images(DEMO_TRAIN + DEMO_HELD_OUT)
    train_pairs = InMemoryPairs({k: photos[k] for k in DEMO_TRAIN}, scale)
    held_out = InMemoryPairs({k: photos[k] for k in DEMO_HELD_OUT}, scale)
    val_set = ValidationSet(held_out, crop=eval_crop)
    patches = PatchDataset(train_pairs, patch_size, seed=seed, min_std=MIN_STD)

    with cpu_threads(threads if device.type == "cpu" else None):
        seed_everything(seed)
        model = zero_residual_(SSIU(config)).to(device).set_backend(backend)
        n_params = count_parameters(model)
        log(f"ssiu demo: x{scale} SSIU ({preset} preset, {n_params:,} parameters) on {device}"
            + (f" ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else "")
            + f", backend {backend}{', compiled' if compile else ''}; {steps} steps of "
            f"{batch_size} {patch_size}x{patch_size} patches from {', '.join(DEMO_TRAIN)}; "
            f"held out: {', '.join(DEMO_HELD_OUT)}")  # fmt: skip
        if device.type == "cpu" and (steps, batch_size, patch_size, preset) == (
            d_steps,
            d_batch,
            d_patch,
            d_preset,
        ):
            log("expected: about 3 minutes on an idle 2-core CPU (more on a busy one)")
        net = model
        if compile:
            from ssiu.compile import compile_for_training

            net = compile_for_training(model)
        before = evaluate(model, val_set, device)
        log(f"before training: {format_metrics(before)}")
        result = train_steps(model, net, patches, val_set, steps=steps, batch_size=batch_size,
                             device=device, progress=progress, log=log)  # fmt: skip
        after = result["val"][-1]

        from ssiu.checkpoint import save

        save(model, out / f"ssiu_x{scale}.safetensors")
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
        comparison_image(rows, scale).save(out / "comparison.png")

    losses = result["loss"]
    window = max(1, len(losses) // 20)
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
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
        "init": "tail.to_rgb zeroed (the untrained network is its bilinear skip)",
        "recipe": {
            "peak_lr": PEAK_LR,
            "warmup": WARMUP,
            "betas": list(BETAS),
            "weight_decay": WEIGHT_DECAY,
            "min_std": MIN_STD,
        },  # fmt: skip
        "train_photos": list(DEMO_TRAIN),
        "held_out_photos": list(DEMO_HELD_OUT),
        "seed": seed,
        "batch_size": batch_size,
        "patch_size": patch_size,
        "eval_crop": eval_crop,
        "cpu_threads": threads if device.type == "cpu" else None,
        "steps": steps,
        "seconds_per_step": result["step_seconds"],
        "train_seconds": result["train_seconds"],
        "total_seconds": total_s,
        "loss_window": window,
        "loss_first": first,
        "loss_last": last,
        "loss": losses,
        "before": before,
        "after": after,
        "validation": [{k: v for k, v in e.items() if k != "images"} for e in result["val"]],
        "verdict": verdict(before, after, first, last),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report, per_image))
    log(f"after {steps} steps ({result['train_seconds']:.0f} s of training): "
        f"{format_metrics(after)}")  # fmt: skip
    log(report["verdict"])
    log(f"outputs in {out.resolve()}: comparison.png, report.md, report.json, sr_*.png, "
        f"ssiu_x{scale}.safetensors (wall time {total_s:.0f} s)")  # fmt: skip
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
        f"- Recipe (short-run, not the released one): L1 + 0.01 FFT-L1, AdamW peak lr "
        f"{r['recipe']['peak_lr']:g}, betas (0.9, 0.99), wd 1e-4, linear warm-up over "
        f"{r['recipe']['warmup']:.0%} of the {r['steps']} steps then cosine to 0, batch "
        f"{r['batch_size']} of {r['patch_size']}x{r['patch_size']} LR patches with "
        f"flips/transposes, flat patches (LR std < {r['recipe']['min_std']:g}) redrawn, "
        f"seed {r['seed']}.",
        "- Initialisation: the tail's last convolution starts at zero, so the untrained "
        "network equals its bilinear skip (the released training uses PyTorch's default "
        "initialisation; the architecture and state dict are the released ones).",
        "",
        "## Training",
        "",
        f"- Steps: {r['steps']} (fixed: the numbers repeat on every run"
        + (f" with {r['cpu_threads']} CPU thread(s)" if r["cpu_threads"] else "")
        + f"); {r['train_seconds']:.0f} s of training ({r['seconds_per_step']:.2f} s/step), "
        f"{r['total_seconds']:.0f} s in all.",
        f"- Loss (mean of {r['loss_window']} steps): {r['loss_first']:.4f} at the start, "
        f"{r['loss_last']:.4f} at the end.",
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
            "Train SSIU for a fixed number of steps on photographs shipped with "
            "scikit-image, then measure PSNR/SSIM-Y against bicubic on two held-out photos "
            "and write a side-by-side PNG and a report. On a CPU it trains a reduced model "
            "(32 channels, 3 steps) for 600 steps on 1 thread, about 3 minutes on an idle "
            "2-core CPU, with the same numbers on every run; on CUDA the released x4 model."
        ),
    )
    p.add_argument("--iters", type=int, default=None, metavar="N",
                   help="training steps (default 600 on CPU, 3000 on CUDA)")  # fmt: skip
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=4, help="default 4")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="small (default on CPU) or full (released, default on CUDA)")  # fmt: skip
    p.add_argument("--batch-size", type=int, metavar="N", help="default 8 on CPU, 40 on CUDA")
    p.add_argument("--patch", type=int, default=None, metavar="P",
                   help="LR patch side (default 32 on CPU, 64 on CUDA)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="CPU threads (default 1: reproducible, safe on a shared CPU)")  # fmt: skip
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
        out_dir=args.out, iterations=args.iters, scale=args.scale, preset=args.preset,
        batch_size=args.batch_size, patch_size=args.patch, device=args.device,
        backend=args.backend, seed=args.seed, eval_crop=args.eval_crop,
        progress=not args.no_progress, log=lambda text: print(text, flush=True),
        compile={"auto": None, "on": True, "off": False}[args.compile], threads=args.threads,
    )  # fmt: skip
    return 0
