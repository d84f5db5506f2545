"""Training SSIU with the released recipe (SSIU.md, "Their training recipe"), and `ssiu train`.

    result = ssiu.train("DIV2K_train_HR", "DIV2K_train_LR_bicubic/X4", scale=4,
                              iterations=100_000, out_dir="runs/x4")

Recipe defaults (`RECIPE`): 64x64 LR patches (HR 64*s) with random h/v flips and
transpose, batch 40, loss L1 + 0.01 * L1 of the rfft2 spectra, AdamW lr 1e-3 betas
(0.9, 0.99) weight decay 1e-4, cosine annealing to 1e-6 over the whole run (stepped every
iteration), seed 2024, 290 epochs. An epoch here is one patch from every training image
(len(images) / batch iterations); give `iterations` to fix the length directly.

Determinism: the model is initialised from `seed`; every patch (image, position, flips)
is a function of (seed, sample number) only (`ssiu.data.PatchBatchSampler`), whatever the
number of DataLoader workers; and a checkpoint holds model, optimizer, scheduler, step and
the RNG states. So on CPU a run repeats bit for bit, and resuming from step k gives the
same weights as the uninterrupted run (GPU kernels may not be deterministic).

The training checkpoint (`checkpoint.pt`, `torch.save`, loadable with weights_only=True):
{"format": "ssiu-train", "version", "config", "params", "optimizer", "scheduler", "step",
"epoch", "total_steps", "settings", "rng", "history", "elapsed"}, plus "params_ema" (the
exponential moving average of the weights, as BasicSR names it) when `ema` is on.
`ssiu.load` reads its "params_ema" when present, else "params"; the final weights are
also written as safetensors with `ssiu.save`: the EMA weights when `ema` is on, else the
trained ones.

Speed and scale (issue 6):
- `compile=True`: the training forward/backward runs through
  `torch.compile(model, fullgraph=True, dynamic=False)` (`ssiu.compile`); patches are a
  fixed size, so one static graph; validation runs the eager model (other sizes).
- `amp="bf16"`: bf16 autocast for the forward pass, fp32 master weights (parameters,
  gradients and the optimizer stay fp32; the loss is computed in fp32). The fused custom
  ops take the bf16 activations and cast their fp32 weights to bf16 inside the kernels,
  returning weight gradients in fp32.
- `accum=N`: gradient accumulation; a step's global batch is batch_size * N patches,
  exactly the batch one step of batch_size * N would draw, and the loss (each micro-batch
  mean divided by N) is that of the big batch.
- `ema=decay`: EMA of the weights after every optimizer step, validated instead of the
  raw weights.
- `checkpoint_steps=True`: activation checkpointing of every SS-ReM step
  (torch.utils.checkpoint, use_reentrant=False): the same gradients, less memory.
- Multi-process: under `torchrun --nproc_per_node N -m ssiu train ...` the model is
  wrapped in DistributedDataParallel and every micro-batch is split over the processes
  (`ssiu.distributed`): the global batch, the loss curve and the checkpoint do not depend
  on N, and a checkpoint resumes on any process count. Rank 0 alone logs, validates and
  writes files.
- The log (history["train"]) records throughput "img_s" (training images per second
  over the logging window, all processes) and "peak_mem_mb": torch.cuda.max_memory_allocated
  on CUDA, the process's peak resident memory (getrusage) on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssiu import distributed
from ssiu.config import SSIUConfig
from ssiu.data import (
    InMemoryPairs,
    PairSource,
    PatchBatchSampler,
    PatchDataset,
    ValidationSet,
    bicubic_upsample,
    make_pairs,
    sample_images,
)
from ssiu.devices import resolve_device
from ssiu.losses import ssiu_loss
from ssiu.model import SSIU

CHECKPOINT_FORMAT = "ssiu-train"
CHECKPOINT_VERSION = 1

# The released recipe; `train` arguments left at None take these values (or, when
# resuming, the checkpoint's).
RECIPE: dict[str, object] = {
    "batch_size": 40,
    "patch_size": 64,
    "lr": 1e-3,
    "betas": (0.9, 0.99),
    "weight_decay": 1e-4,
    "eta_min": 1e-6,
    "freq_weight": 0.01,
    "seed": 2024,
    "augment": True,
    "accum": 1,
    "ema": None,
}
DEFAULT_EPOCHS = 290
DEFAULT_SCALE = 4
# Validation when none is given: the embedded photos, centre LR crops of this side.
DEFAULT_VAL_CROP = 64


@dataclasses.dataclass
class TrainResult:
    """What `train` returns. history: {"train": [{"step", "loss", "lr", "time"}, ...],
    "val": [{"step", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim"}, ...]}."""

    model: SSIU
    step: int
    total_steps: int
    history: dict
    elapsed: float
    stopped_early: bool
    checkpoint: Path | None = None
    weights: Path | None = None
    ema_model: SSIU | None = None

    @property
    def first_loss(self) -> float | None:
        train = self.history["train"]
        return train[0]["loss"] if train else None

    @property
    def last_loss(self) -> float | None:
        train = self.history["train"]
        return train[-1]["loss"] if train else None


# ---------------------------------------------------------------------------------------------
# Small helpers


AMP_MODES = ("off", "bf16")


def _amp_flag(amp) -> bool:
    """amp: False/None/"off" (fp32) or True/"bf16" (bf16 autocast)."""
    if amp is None or amp is False or amp == "off":
        return False
    if amp is True or amp == "bf16":
        return True
    raise ValueError(f"amp must be one of {AMP_MODES} (or a bool), got {amp!r}")


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


class EMA:
    """Exponential moving average of a model's weights: ema = decay * ema + (1 - decay) * w.

    Updated after every optimizer step; `model` is an eval-mode copy with no gradients.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def set_activation_checkpointing(model: SSIU, enabled: bool) -> SSIU:
    """Recompute every SS-ReM step in backward (torch.utils.checkpoint, use_reentrant=False).

    Patches each step's `forward` on the instance (no new module, so the state dict is
    unchanged); `enabled=False` restores it. Gradients are identical: nothing in a step
    is random.
    """
    from torch.utils.checkpoint import checkpoint

    for step in model.steps:
        step.__dict__.pop("forward", None)
        if enabled:
            inner = step.forward
            step.forward = lambda a, y, _f=inner: checkpoint(_f, a, y, use_reentrant=False)
    return model


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _ShardedSteps:
    """Batch sampler: per step, `accum` micro-batches of this rank's share of the keys.

    The step's keys are `PatchBatchSampler(batch_size * accum)`'s batch, cut into `accum`
    micro-batches of batch_size; each micro-batch is split over the ranks.
    """

    def __init__(self, steps: PatchBatchSampler, accum: int, dist: distributed.Dist):
        self.steps, self.accum, self.dist = steps, accum, dist

    def __iter__(self):
        per = self.steps.batch_size // self.accum
        for keys in self.steps:
            for i in range(self.accum):
                yield self.dist.shard(keys[i * per : (i + 1) * per], "batch size")

    def __len__(self) -> int:
        return len(self.steps) * self.accum


def _rng_state() -> dict:
    """RNG states in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Patches do not use these generators (they are keyed by sample number); seeding them
    # keeps any other randomness in a worker repeatable too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _positive_int(name: str, value, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _check_settings(s: dict) -> dict:
    _positive_int("batch_size", s["batch_size"])
    _positive_int("patch_size", s["patch_size"])
    _positive_float("lr", s["lr"])
    _positive_float("weight_decay", s["weight_decay"], allow_zero=True)
    _positive_float("eta_min", s["eta_min"], allow_zero=True)
    _positive_float("freq_weight", s["freq_weight"], allow_zero=True)
    _positive_int("seed", s["seed"], allow_zero=True)
    _positive_int("accum", s["accum"])
    if s["ema"] is not None:
        ema = _positive_float("ema", s["ema"])
        if not 0 < ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1), e.g. 0.999, got {ema!r}")
        s["ema"] = ema
    betas = tuple(float(b) for b in s["betas"])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {s['betas']!r}")
    s["betas"] = betas
    if s["patch_size"] < 9:
        raise ValueError(f"patch_size {s['patch_size']} is below the model's minimum input 9")
    return s


# ---------------------------------------------------------------------------------------------
# Evaluation


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
    from ssiu.metrics import psnr_y, ssim_y

    device = device or next(model.parameters()).device
    s = val_set.scale
    was_training = model.training
    model.eval()
    per_image = {}
    try:
        for i in range(len(val_set)):
            name, lr, hr = val_set[i]
            with _autocast(device, amp):
                sr = model(lr.unsqueeze(0).to(device))
            sr = sr.float().cpu()[0]
            row = {"psnr": psnr_y(sr, hr, s), "ssim": ssim_y(sr, hr, s)}
            if with_bicubic:
                bic = bicubic_upsample(lr, s)
                row.update(bicubic_psnr=psnr_y(bic, hr, s), bicubic_ssim=ssim_y(bic, hr, s))
            per_image[name] = row
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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable training checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an ssiu training checkpoint (format {CHECKPOINT_FORMAT!r}); "
            "to start from weights only, use --init (CLI) or model=ssiu.load(path)"
        )
    return ckpt


# ---------------------------------------------------------------------------------------------
# The training loop


def _as_source(data, scale: int) -> PairSource:
    if isinstance(data, PairSource):
        if data.scale != scale:
            raise ValueError(f"the dataset is for x{data.scale} but the model is x{scale}")
        return data
    if isinstance(data, Mapping):
        return InMemoryPairs(data, scale)
    raise TypeError(f"dataset must be a PairSource or a dict of images, got {type(data)}")


def _validation_set(val_hr_dir, val_lr_dir, val_dataset, val_crop, scale) -> ValidationSet:
    if isinstance(val_dataset, ValidationSet):
        if val_dataset.scale != scale:
            raise ValueError(f"the validation set is x{val_dataset.scale}, the model x{scale}")
        return val_dataset
    if val_dataset is not None:
        return ValidationSet(_as_source(val_dataset, scale), crop=val_crop)
    if val_hr_dir is not None:
        return ValidationSet(make_pairs(val_hr_dir, val_lr_dir, scale), crop=val_crop)
    if val_lr_dir is not None:
        raise ValueError("a validation LR folder needs its HR folder (val_hr_dir)")
    crop = DEFAULT_VAL_CROP if val_crop is None else val_crop
    return ValidationSet(InMemoryPairs(sample_images(), scale), crop=crop)


def train(
    hr_dir: str | os.PathLike | None = None,
    lr_dir: str | os.PathLike | None = None,
    *,
    scale: int | None = None,
    dataset=None,
    out_dir: str | os.PathLike | None = "runs/ssiu",
    iterations: int | None = None,
    epochs: float | None = None,
    stop_at: int | None = None,
    time_limit: float | None = None,
    batch_size: int | None = None,
    patch_size: int | None = None,
    lr: float | None = None,
    betas: tuple[float, float] | None = None,
    weight_decay: float | None = None,
    eta_min: float | None = None,
    freq_weight: float | None = None,
    seed: int | None = None,
    augment: bool | None = None,
    val_hr_dir: str | os.PathLike | None = None,
    val_lr_dir: str | os.PathLike | None = None,
    val_dataset=None,
    val_crop: int | None = None,
    val_every: int | None = None,
    val_at_start: bool = True,
    save_every: int | None = None,
    log_every: int = 50,
    resume: str | os.PathLike | None = None,
    model: SSIU | None = None,
    model_options: dict | None = None,
    device: str | torch.device = "auto",
    backend: str = "auto",
    amp: bool | str = False,
    accum: int | None = None,
    ema: float | None = None,
    compile: bool = False,
    compile_backend: str | None = None,
    checkpoint_steps: bool = False,
    num_workers: int | None = None,
    cache: bool = False,
    progress: bool = True,
    log=None,
) -> TrainResult:
    """Train SSIU; returns a `TrainResult` (model, steps, history, paths).

    Data (one of): `hr_dir` (LR made on the fly by bicubic) with optional `lr_dir` (DIV2K
    layout, `0001x4.png` or same names), or `dataset` (a `ssiu.data` pair source or a dict
    name -> HR image, e.g. `ssiu.data.sample_images()`).
    Length: `iterations`, or `epochs` (one patch per image each; default 290). The cosine
    schedule spans the whole length; `stop_at` (a step count) and `time_limit` (seconds)
    stop early with a checkpoint, and `resume` carries on.
    Recipe (None = `RECIPE`, or the checkpoint's when resuming; a value that differs from
    the checkpoint's is an error): batch_size, patch_size, lr, betas, weight_decay,
    eta_min, freq_weight, seed, augment, accum, ema.
    Model: `scale` (default 4) and `model_options` (SSIUConfig fields: channels, steps,
    heads, attn_topk, moe_topk...), or a ready `model` (its weights are the start).
    Validation every `val_every` steps (None: 10 times per run; 0: never) on
    `val_hr_dir`/`val_lr_dir`, `val_dataset`, or by default the embedded photos (centre
    64x64 LR crops); `val_crop` crops LR centres. Printed against bicubic.
    `val_at_start`: also validate before the first step (history's step-0 entry).
    Output in `out_dir` (None: write nothing): `checkpoint.pt` every `save_every` steps
    (None: as validation) and at the end, `ssiu_x{scale}.safetensors`, `history.json`.
    device: "auto" (cuda if available) or a torch device; backend: "auto", "torch",
    "triton"; amp: "bf16" (or True) for bf16 autocast of the forward pass, fp32 master
    weights; accum: gradient accumulation steps (global batch = batch_size * accum); ema:
    EMA decay of the weights (e.g. 0.999; None: off); compile: torch.compile the training
    step (fullgraph, static shapes; `compile_backend` picks the compiler, default
    Inductor); checkpoint_steps: activation checkpointing per SS-ReM step (less memory,
    same gradients). Under torchrun (WORLD_SIZE > 1): DistributedDataParallel, the global
    batch split over the processes (see the module docstring). num_workers: DataLoader workers
    (None: 0 on CPU, up to 8 on CUDA); cache: keep decoded images in memory.
    log: a function taking a line of text (default: print through tqdm).
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    device = resolve_device(device)
    amp = _amp_flag(amp)
    given = {
        "batch_size": batch_size, "patch_size": patch_size, "lr": lr, "betas": betas,
        "weight_decay": weight_decay, "eta_min": eta_min, "freq_weight": freq_weight,
        "seed": seed, "augment": augment, "accum": accum, "ema": ema,
    }  # fmt: skip
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        if model is not None:
            raise ValueError("give either resume or model, not both")
        settings = {"accum": 1, "ema": None, **ckpt["settings"]}
        for key, value in given.items():
            if value is None:
                continue
            stored = settings[key]
            same = tuple(value) == tuple(stored) if key == "betas" else value == stored
            if not same:
                raise ValueError(
                    f"resume: {key}={value!r} but the checkpoint was trained with {stored!r}; "
                    "a resumed run keeps its recipe (leave it unset)"
                )
        config = SSIUConfig.from_dict(ckpt["config"])
        if scale is not None and scale != config.scale:
            raise ValueError(f"resume: scale={scale} but the checkpoint is x{config.scale}")
        for key, value in (model_options or {}).items():
            if getattr(config, key, value) != value:
                raise ValueError(
                    f"resume: {key}={value!r} but the checkpoint's model has "
                    f"{key}={getattr(config, key)!r}"
                )
        if hr_dir is None and dataset is None and settings.get("hr_dir"):
            hr_dir, lr_dir = settings["hr_dir"], settings.get("lr_dir")
    else:
        settings = {k: (RECIPE[k] if v is None else v) for k, v in given.items()}
        if model is not None:
            if not isinstance(model, SSIU):
                raise TypeError(f"model must be an ssiu.SSIU, got {type(model).__name__}")
            if model_options:
                raise ValueError("give either model or model_options, not both")
            if scale is not None and scale != model.config.scale:
                raise ValueError(f"scale={scale} but the model is x{model.config.scale}")
            config = model.config
        else:
            config = SSIUConfig(scale=DEFAULT_SCALE if scale is None else scale,
                                **(model_options or {}))  # fmt: skip
    settings = _check_settings(settings)
    s = config.scale

    # Data.
    if dataset is not None and (hr_dir is not None or lr_dir is not None):
        raise ValueError("give either dataset or hr_dir/lr_dir, not both")
    if dataset is not None:
        pairs = _as_source(dataset, s)
    elif hr_dir is not None or lr_dir is not None:
        pairs = make_pairs(hr_dir, lr_dir, s, cache=cache)
    else:
        raise ValueError("no training data: give hr_dir (and optionally lr_dir) or dataset")
    if cache and hasattr(pairs, "preload"):
        pairs.preload()
    patches = PatchDataset(pairs, settings["patch_size"], settings["augment"], settings["seed"])
    settings["hr_dir"] = str(hr_dir) if hr_dir is not None else None
    settings["lr_dir"] = str(lr_dir) if lr_dir is not None else None

    # Length of the run.
    if ckpt is not None:
        total = int(ckpt["total_steps"])
        if iterations is not None and iterations != total:
            raise ValueError(f"resume: iterations={iterations} but the run has {total} steps")
        if epochs is not None:
            raise ValueError("resume: the run length is fixed by the checkpoint; drop epochs")
    elif iterations is not None:
        if epochs is not None:
            raise ValueError("give iterations or epochs, not both")
        total = _positive_int("iterations", iterations)
    else:
        epochs = DEFAULT_EPOCHS if epochs is None else _positive_float("epochs", epochs)
        total = max(
            1, math.ceil(epochs * len(pairs) / (settings["batch_size"] * settings["accum"]))
        )
    if stop_at is not None:
        _positive_int("stop_at", stop_at)
    if time_limit is not None:
        _positive_float("time_limit", time_limit)
    log_every = _positive_int("log_every", log_every)
    val_every = max(1, total // 10) if val_every is None else val_every
    save_every = val_every if save_every is None else save_every
    _positive_int("val_every", val_every, allow_zero=True)
    _positive_int("save_every", save_every, allow_zero=True)
    val_set = None
    if val_every:
        val_set = _validation_set(val_hr_dir, val_lr_dir, val_dataset, val_crop, s)

    # Processes (torchrun), model, optimizer, schedule.
    dist = distributed.setup(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    global_batch = settings["batch_size"] * settings["accum"]
    dist.shard(list(range(settings["batch_size"])), "batch size")  # fail early if uneven
    if ckpt is None:
        seed_everything(settings["seed"])
        if model is None:
            model = SSIU(config)
    else:
        model = SSIU(config)
        model.load_state_dict(ckpt["params"])
    model.to(device).set_backend(backend).train()
    ema_state = EMA(model, settings["ema"]) if settings["ema"] is not None else None
    if ema_state is not None and ckpt is not None and "params_ema" in ckpt:
        ema_state.model.load_state_dict(ckpt["params_ema"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings["lr"], betas=settings["betas"],
        weight_decay=settings["weight_decay"],
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total, eta_min=settings["eta_min"]
    )
    history = {"train": [], "val": []}
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed", 0.0))
        history = {"train": list(ckpt["history"]["train"]), "val": list(ckpt["history"]["val"])}
        _set_rng_state(ckpt["rng"])
    # What runs the training forward: the model, with checkpointed steps, compiled, in DDP.
    set_activation_checkpointing(model, checkpoint_steps)
    net = model
    if compile:
        from ssiu.compile import compile_for_training

        net = compile_for_training(model, compile_backend)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # DDP around the compiled module: its gradient hooks fire after the compiled
        # backward, and the graph stays whole (no DDPOptimizer split).
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    main = dist.is_main

    out = Path(out_dir) if out_dir is not None and main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    end = total if stop_at is None else min(total, max(stop_at, step))
    if num_workers is None:
        num_workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0
    num_workers = _positive_int("num_workers", num_workers, allow_zero=True)
    sampler = PatchBatchSampler(len(pairs), global_batch, settings["seed"], start=step, steps=end)
    loader = DataLoader(
        patches, batch_sampler=_ShardedSteps(sampler, settings["accum"], dist),
        num_workers=num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(settings["seed"]),
    )  # fmt: skip

    bar = tqdm(total=total, initial=step, desc=f"train x{s}", unit="it", dynamic_ncols=True,
               disable=not progress or not main, smoothing=0.05)  # fmt: skip
    say = (log or tqdm.write) if main else (lambda line: None)
    if dist.enabled:
        say(f"DistributedDataParallel: {dist.world_size} processes, global batch "
            f"{global_batch} ({settings['batch_size'] // dist.world_size} per process "
            f"x {settings['accum']} accumulation steps)")  # fmt: skip

    def checkpoint_state() -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": config.to_dict(),
            "params": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": step * global_batch // len(pairs),
            "total_steps": total,
            "settings": settings,
            "rng": _rng_state(),
            "history": history,
            "elapsed": elapsed_before + time.perf_counter() - start_time,
        }
        if ema_state is not None:
            state["params_ema"] = ema_state.model.state_dict()
        return state

    def validate() -> None:
        evaluated = ema_state.model if ema_state is not None else model
        metrics = evaluate(evaluated, val_set, device, amp)
        entry = {"step": step, **metrics}
        history["val"].append(entry)
        say(f"step {step}/{total}: {format_metrics(metrics)}"
            + (" (EMA weights)" if ema_state is not None else ""))  # fmt: skip

    checkpoint_path = None
    running = torch.zeros((), device=device)
    window, window_start = 0, time.perf_counter()
    stopped_early = False
    if step == 0 and val_set is not None and val_at_start and main:
        validate()
    accum_n = settings["accum"]
    batches = iter(loader)
    try:
        while step < end:
            optimizer.zero_grad(set_to_none=True)
            for i in range(accum_n):
                lr_batch, hr_batch = next(batches)
                lr_batch = lr_batch.to(device, non_blocking=True)
                hr_batch = hr_batch.to(device, non_blocking=True)
                sync = i == accum_n - 1 or not dist.enabled
                with contextlib.nullcontext() if sync else net.no_sync():
                    with _autocast(device, amp):
                        sr = net(lr_batch)
                    loss = ssiu_loss(sr.float(), hr_batch, settings["freq_weight"]) / accum_n
                    loss.backward()
                running += loss.detach()
            optimizer.step()
            scheduler.step()
            if ema_state is not None:
                ema_state.update(model)
            step += 1
            window += 1
            bar.update(1)
            timed_out = time_limit is not None and time.perf_counter() - start_time >= time_limit
            if dist.enabled and time_limit is not None:  # every rank stops at the same step
                flag = torch.tensor(float(timed_out), device=device)
                timed_out = bool(dist.mean(flag).item() > 0)
            last = step == end or timed_out
            if step == 1 or step % log_every == 0 or last:
                mean = dist.mean(running).item() / window
                if not math.isfinite(mean):
                    raise RuntimeError(
                        f"the loss became {mean} at step {step}; lower the learning rate "
                        "(or turn amp off)"
                    )
                now = time.perf_counter()
                speed = window / max(now - window_start, 1e-9)
                lr_now = optimizer.param_groups[0]["lr"]
                img_s = speed * global_batch
                peak = peak_memory_mb(device)
                history["train"].append({
                    "step": step, "loss": mean, "lr": lr_now,
                    "time": elapsed_before + now - start_time,
                    "img_s": img_s, "peak_mem_mb": peak,
                })  # fmt: skip
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_now:.2e}", img_s=f"{img_s:.1f}",
                                mem=f"{peak:.0f}MB")  # fmt: skip
                running.zero_()
                window, window_start = 0, now
            if val_set is not None and main and (step % val_every == 0 or last):
                validate()
            if out is not None and (last or (save_every and step % save_every == 0)):
                checkpoint_path = save_checkpoint(out / "checkpoint.pt", checkpoint_state())
            if timed_out and step < end:
                stopped_early = True
                say(f"time limit reached after {step} of {total} steps")
                break
    finally:
        bar.close()
        set_activation_checkpointing(model, False)
    if stop_at is not None and step < total and not stopped_early:
        stopped_early = True
    weights = None
    if out is not None:
        if checkpoint_path is None:  # nothing trained (already complete): still write one
            checkpoint_path = save_checkpoint(out / "checkpoint.pt", checkpoint_state())
        from ssiu.checkpoint import save as save_weights

        weights = out / f"ssiu_x{s}.safetensors"
        save_weights(ema_state.model if ema_state is not None else model, weights)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    dist.barrier()
    dist.cleanup()
    return TrainResult(
        model=model, step=step, total_steps=total, history=history,
        elapsed=elapsed_before + time.perf_counter() - start_time,
        stopped_early=stopped_early, checkpoint=checkpoint_path, weights=weights,
        ema_model=ema_state.model if ema_state is not None else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SSIU (released recipe by default)",
        description=(
            "Train SSIU on HR images (LR made by bicubic downsampling) or DIV2K-style HR/LR "
            "folder pairs, with the released recipe as defaults: 64x64 LR patches, batch "
            "40, flips/transposes, L1 + 0.01 FFT-L1, AdamW 1e-3, cosine to 1e-6, seed 2024."
        ),
    )
    data = p.add_argument_group("data")
    data.add_argument("--hr", metavar="DIR", help="folder of HR training images")
    data.add_argument("--lr", metavar="DIR",
                      help="folder of matching LR images (DIV2K: 0001x4.png or same names); "
                           "default: made from HR by bicubic")  # fmt: skip
    data.add_argument("--scale", type=int, choices=(2, 3, 4), default=None,
                      help=f"upscaling factor (default {DEFAULT_SCALE})")  # fmt: skip
    data.add_argument("--patch", type=int, default=None, metavar="P",
                      help="LR patch side (default 64; HR patch P*scale)")  # fmt: skip
    data.add_argument("--no-augment", action="store_true", help="no flips/transposes")
    data.add_argument("--cache", action="store_true", help="keep decoded images in memory")
    data.add_argument("--workers", type=int, default=None, metavar="N",
                      help="DataLoader workers (default: 0 on CPU, up to 8 on CUDA)")  # fmt: skip
    length = p.add_argument_group("length").add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, metavar="N", help="training steps")
    length.add_argument("--epochs", type=float, default=None, metavar="E",
                        help=f"passes, one patch per image (default {DEFAULT_EPOCHS})")  # fmt: skip
    run_group = p.add_argument_group("run")
    run_group.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                           help="stop after STEP steps (same schedule); resume later")  # fmt: skip
    run_group.add_argument("--minutes", type=float, default=None, metavar="M",
                           help="stop (with a checkpoint) after this many minutes")  # fmt: skip
    run_group.add_argument("--out", default="runs/ssiu", metavar="DIR",
                           help="output folder (default runs/ssiu)")  # fmt: skip
    run_group.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint.pt")
    run_group.add_argument("--init", metavar="WEIGHTS",
                           help="start a new run from weights (ours or the authors')")  # fmt: skip
    run_group.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    run_group.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                           help="auto: Triton kernels on CUDA, reference elsewhere")  # fmt: skip
    run_group.add_argument("--amp", nargs="?", const="bf16", default="off", choices=AMP_MODES,
                           help="bf16: bf16 autocast forward, fp32 master weights (--amp "
                                "alone means bf16; default off)")  # fmt: skip
    run_group.add_argument("--compile", action="store_true",
                           help="torch.compile the training step (fullgraph, one static "
                                "graph; worth it for long runs)")  # fmt: skip
    run_group.add_argument("--checkpoint-steps", action="store_true",
                           help="activation checkpointing per SS-ReM step: less memory, "
                                "same gradients; each step's forward runs twice")  # fmt: skip
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_group.add_argument("--log-every", type=int, default=50, metavar="N",
                           help="record the mean loss every N steps (default 50)")  # fmt: skip
    recipe = p.add_argument_group("recipe (defaults: the released one)")
    recipe.add_argument("--batch-size", type=int, default=None, metavar="N", help="default 40")
    recipe.add_argument("--learning-rate", type=float, metavar="LR", help="default 1e-3")
    recipe.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="0.9 0.99")
    recipe.add_argument("--weight-decay", type=float, metavar="WD", help="default 1e-4")
    recipe.add_argument("--eta-min", type=float, metavar="LR", help="final lr, default 1e-6")
    recipe.add_argument("--freq-weight", type=float, default=None, metavar="W",
                        help="weight of the FFT L1 term, default 0.01")  # fmt: skip
    recipe.add_argument("--seed", type=int, default=None, metavar="S", help="default 2024")
    recipe.add_argument("--accum", type=int, default=None, metavar="N",
                        help="gradient accumulation: global batch = batch size x N "
                             "(default 1)")  # fmt: skip
    recipe.add_argument("--ema", type=float, default=None, metavar="DECAY",
                        help="keep an EMA of the weights (e.g. 0.999): validated, saved as "
                             "params_ema and as the final weights (default off)")  # fmt: skip
    model = p.add_argument_group("model (defaults: the released one)")
    model.add_argument("--channels", type=int, metavar="C", help="feature channels (64)")
    model.add_argument("--unfold-steps", type=int, metavar="N", help="SS-ReM steps (9)")
    model.add_argument("--heads", type=int, metavar="H", help="ESAM heads (4)")
    model.add_argument("--attn-topk", type=int, metavar="K", help="keys kept per query")
    model.add_argument("--moe-topk", type=int, metavar="K", help="experts kept (3)")
    val = p.add_argument_group("validation")
    val.add_argument("--val-hr", metavar="DIR",
                     help="HR validation images (default: the embedded photos, 64x64 LR "
                          "centre crops)")  # fmt: skip
    val.add_argument("--val-lr", metavar="DIR", help="matching LR validation images")
    val.add_argument("--val-crop", type=int, default=None, metavar="N",
                     help="validate on N x N LR centre crops (default: whole images)")  # fmt: skip
    val.add_argument("--val-every", type=int, default=None, metavar="N",
                     help="validate every N steps (default: 10 per run; 0: never)")  # fmt: skip
    val.add_argument("--save-every", type=int, default=None, metavar="N",
                     help="write checkpoint.pt every N steps (default: --val-every)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hr is None and args.resume is None:
        raise ValueError("give --hr DIR (training images) or --resume CKPT; "
                         "`ssiu demo` trains on embedded photos")  # fmt: skip
    options = {
        key: value
        for key, value in (
            ("channels", args.channels), ("steps", args.unfold_steps), ("heads", args.heads),
            ("attn_topk", args.attn_topk), ("moe_topk", args.moe_topk),
        )
        if value is not None
    }  # fmt: skip
    model = None
    if args.init is not None:
        if args.resume is not None:
            raise ValueError("give --init or --resume, not both")
        if options:
            raise ValueError("--init takes the model's shape from the weights; drop "
                             f"{', '.join(sorted(options))}")  # fmt: skip
        from ssiu.checkpoint import load

        model = load(args.init, map_location="cpu", backend=args.backend).train()
    result = train(
        args.hr, args.lr, scale=args.scale, model=model, out_dir=args.out, iterations=args.iters,
        epochs=args.epochs, stop_at=args.stop_at,
        time_limit=None if args.minutes is None else args.minutes * 60,
        batch_size=args.batch_size, patch_size=args.patch, lr=args.learning_rate,
        betas=tuple(args.betas) if args.betas else None, weight_decay=args.weight_decay,
        eta_min=args.eta_min, freq_weight=args.freq_weight, seed=args.seed,
        augment=False if args.no_augment else None,
        val_hr_dir=args.val_hr, val_lr_dir=args.val_lr, val_crop=args.val_crop,
        val_every=args.val_every, save_every=args.save_every, log_every=args.log_every,
        resume=args.resume, model_options=options or None, device=args.device,
        backend=args.backend, amp=args.amp, accum=args.accum, ema=args.ema,
        compile=args.compile, checkpoint_steps=args.checkpoint_steps,
        num_workers=args.workers, cache=args.cache,
        progress=not args.no_progress,
    )  # fmt: skip
    if result.weights is None:  # not rank 0 of a multi-process run
        return 0
    state = "stopped early" if result.stopped_early else "done"
    print(f"{state}: {result.step}/{result.total_steps} steps in {result.elapsed:.0f} s, "
          f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
          if result.history["train"] else f"{state}: {result.step} steps")  # fmt: skip
    if result.history["val"]:
        v = result.history["val"][-1]
        print(f"last validation (step {v['step']}): {format_metrics(v)}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"weights:    {result.weights}" + (" (EMA)" if result.ema_model is not None else ""))
    e = result.history["train"][-1] if result.history["train"] else {}
    if "img_s" in e:
        print(f"throughput: {e['img_s']:.1f} img/s; peak memory {e['peak_mem_mb']:.0f} MB "
              + ("(CUDA allocator)" if "cuda" in str(next(result.model.parameters()).device)
                 else "(CPU peak resident set)"))  # fmt: skip
    if result.stopped_early:
        print(f"continue with: ssiu train --resume {result.checkpoint}")
    return 0
