"""The training loop: `train()` turns its options into a plan (`ssiu.training.plan`), then a
`Run` builds the model, optimizer, schedule and data feed, steps, logs, validates and
checkpoints, and writes the final weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ssiu import distributed
from ssiu.data import PatchBatchSampler, PatchDataset
from ssiu.devices import resolve_device
from ssiu.losses import ssiu_loss
from ssiu.model import SSIU
from ssiu.training.model_tools import EMA, peak_memory_mb, set_activation_checkpointing
from ssiu.training.plan import RunPlan, make_plan
from ssiu.training.settings import TrainConfig, amp_flag, positive_int
from ssiu.training.state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    rng_state,
    save_checkpoint,
    seed_everything,
    seed_worker,
    set_rng_state,
)
from ssiu.training.validation import autocast, evaluate, format_metrics


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


class ShardedSteps:
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


def train(hr_dir=None, lr_dir=None, *, config: TrainConfig | None = None, **options) -> TrainResult:
    """Train SSIU; returns a `TrainResult` (model, steps, history, paths).

    Options are the fields of `TrainConfig` (or give a `config`; options override it).
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
    Validation every `val_every` steps (None: 10 times per run, at least 10 steps apart;
    0: never) on `val_hr_dir`/`val_lr_dir`, `val_dataset`, or by default the embedded
    photos (centre 64x64 LR crops); `val_crop` crops LR centres. Printed against bicubic.
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
    batch split over the processes (see `ssiu.training`). num_workers: DataLoader workers
    (None: 0 on CPU, up to 8 on CUDA); cache: keep decoded images in memory.
    log: a function taking a line of text (default: print through tqdm).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **options)
    if hr_dir is not None or lr_dir is not None:
        cfg = dataclasses.replace(cfg, hr_dir=hr_dir, lr_dir=lr_dir)
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    amp = amp_flag(cfg.amp)
    run = Run(cfg, make_plan(cfg), device, amp, start_time)
    try:
        run.loop()
    finally:
        run.close()
    return run.finish()


class Run:
    """One training run: its state, and one method per job of the loop."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, device, amp: bool, start_time: float):
        self.cfg, self.plan, self.amp, self.start_time = cfg, plan, amp, start_time
        self.settings = plan.settings
        self.dist = dist = distributed.setup(device.type)
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        self.device = device
        self.global_batch = self.settings["batch_size"] * self.settings["accum"]
        dist.shard(list(range(self.settings["batch_size"])), "batch size")  # fail early
        self._build_model()
        self._build_optimizer()
        self.net = self._training_net()
        self.main = dist.is_main
        self.out = Path(cfg.out_dir) if cfg.out_dir is not None and self.main else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        stop = cfg.stop_at
        self.end = plan.total if stop is None else min(plan.total, max(stop, self.step))
        self.loader = self._loader()
        self.say = (cfg.log or _tqdm_write) if self.main else (lambda line: None)
        self.bar = _progress_bar(cfg, plan, self.step, self.main)
        if dist.enabled:
            self.say(
                f"DistributedDataParallel: {dist.world_size} processes, global batch "
                f"{self.global_batch} ({self.settings['batch_size'] // dist.world_size} "
                f"per process x {self.settings['accum']} accumulation steps)"
            )
        self.checkpoint_path = None
        self.stopped_early = False

    # -- setup

    def _build_model(self) -> None:
        ckpt, cfg = self.plan.checkpoint, self.cfg
        if ckpt is None:
            seed_everything(self.settings["seed"])
            model = cfg.model if cfg.model is not None else SSIU(self.plan.config)
        else:
            model = SSIU(self.plan.config)
            model.load_state_dict(ckpt["params"])
        self.model = model.to(self.device).set_backend(cfg.backend).train()
        decay = self.settings["ema"]
        self.ema = EMA(self.model, decay) if decay is not None else None
        if self.ema is not None and ckpt is not None and "params_ema" in ckpt:
            self.ema.model.load_state_dict(ckpt["params_ema"])

    def _build_optimizer(self) -> None:
        s, ckpt = self.settings, self.plan.checkpoint
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=s["lr"], betas=s["betas"], weight_decay=s["weight_decay"]
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.plan.total, eta_min=s["eta_min"]
        )
        self.history = {"train": [], "val": []}
        self.step, self.elapsed_before = 0, 0.0
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.step, self.elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed", 0.0))
            self.history = {k: list(ckpt["history"][k]) for k in ("train", "val")}
            set_rng_state(ckpt["rng"])

    def _training_net(self):
        """What runs the training forward: the model, checkpointed, compiled, in DDP."""
        set_activation_checkpointing(self.model, self.cfg.checkpoint_steps)
        net = self.model
        if self.cfg.compile:
            from ssiu.compile import compile_for_training

            net = compile_for_training(self.model, self.cfg.compile_backend)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # DDP around the compiled module: its gradient hooks fire after the compiled
            # backward, and the graph stays whole (no DDPOptimizer split).
            cuda = self.device.type == "cuda"
            net = DistributedDataParallel(net, device_ids=[self.device.index] if cuda else None)
        return net

    def _loader(self) -> DataLoader:
        s, cfg, cuda = self.settings, self.cfg, self.device.type == "cuda"
        workers = cfg.num_workers
        if workers is None:
            workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0
        workers = positive_int("num_workers", workers, allow_zero=True)
        patches = PatchDataset(self.plan.pairs, s["patch_size"], s["augment"], s["seed"])
        sampler = PatchBatchSampler(
            len(self.plan.pairs), self.global_batch, s["seed"], start=self.step, steps=self.end
        )
        return DataLoader(
            patches,
            batch_sampler=ShardedSteps(sampler, s["accum"], self.dist),
            num_workers=workers,
            pin_memory=cuda,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(s["seed"]),
        )

    # -- the loop

    def loop(self) -> None:
        plan = self.plan
        self.running = torch.zeros((), device=self.device)
        self.window, self.window_start = 0, time.perf_counter()
        if self.step == 0 and plan.val_set is not None and self.cfg.val_at_start and self.main:
            self.validate()
        batches = iter(self.loader)
        with self._compile_settings():
            self._steps(batches)

    def _compile_settings(self):
        """The Dynamo settings of a compiled run, restored when the loop ends."""
        if not self.cfg.compile:
            return contextlib.nullcontext()
        from ssiu.compile import recompile_limit

        return recompile_limit()

    def _steps(self, batches) -> None:
        plan = self.plan
        while self.step < self.end:
            self.train_step(batches)
            timed_out = self._timed_out()
            last = self.step == self.end or timed_out
            if self.step == 1 or self.step % plan.log_every == 0 or last:
                self.record()
            if plan.val_set is not None and self.main and (self.step % plan.val_every == 0 or last):
                self.validate()
            if self.out is not None and (
                last or (plan.save_every and self.step % plan.save_every == 0)
            ):
                self.checkpoint_path = save_checkpoint(self.out / "checkpoint.pt", self.state())
            if timed_out and self.step < self.end:
                self.stopped_early = True
                self.say(f"time limit reached after {self.step} of {plan.total} steps")
                break

    def train_step(self, batches) -> None:
        """One optimizer step over `accum` micro-batches (DDP syncs on the last one)."""
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.settings["accum"]
        for i in range(accum):
            lr_batch, hr_batch = next(batches)
            lr_batch = lr_batch.to(self.device, non_blocking=True)
            hr_batch = hr_batch.to(self.device, non_blocking=True)
            sync = i == accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with autocast(self.device, self.amp):
                    sr = self.net(lr_batch)
                loss = ssiu_loss(sr.float(), hr_batch, self.settings["freq_weight"]) / accum
                loss.backward()
            self.running += loss.detach()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.window += 1
        self.bar.update(1)

    def _timed_out(self) -> bool:
        limit = self.cfg.time_limit
        timed_out = limit is not None and time.perf_counter() - self.start_time >= limit
        if self.dist.enabled and limit is not None:  # every rank stops at the same step
            flag = torch.tensor(float(timed_out), device=self.device)
            timed_out = bool(self.dist.mean(flag).item() > 0)
        return timed_out

    def record(self) -> None:
        """The mean loss, lr, throughput and memory of the window since the last record."""
        mean = self.dist.mean(self.running).item() / self.window
        if not math.isfinite(mean):
            raise RuntimeError(
                f"the loss became {mean} at step {self.step}; lower the learning rate "
                "(or turn amp off)"
            )
        now = time.perf_counter()
        speed = self.window / max(now - self.window_start, 1e-9)
        lr_now = self.optimizer.param_groups[0]["lr"]
        img_s = speed * self.global_batch
        peak = peak_memory_mb(self.device)
        self.history["train"].append(
            {
                "step": self.step,
                "loss": mean,
                "lr": lr_now,
                "time": self.elapsed_before + now - self.start_time,
                "img_s": img_s,
                "peak_mem_mb": peak,
            }
        )
        self.bar.set_postfix(
            loss=f"{mean:.4f}", lr=f"{lr_now:.2e}", img_s=f"{img_s:.1f}", mem=f"{peak:.0f}MB"
        )
        self.running.zero_()
        self.window, self.window_start = 0, now

    def validate(self) -> None:
        evaluated = self.ema.model if self.ema is not None else self.model
        metrics = evaluate(evaluated, self.plan.val_set, self.device, self.amp)
        self.history["val"].append({"step": self.step, **metrics})
        self.say(
            f"step {self.step}/{self.plan.total}: {format_metrics(metrics)}"
            + (" (EMA weights)" if self.ema is not None else "")
        )

    def state(self) -> dict:
        """The training checkpoint (see `ssiu.training.state`)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.plan.config.to_dict(),
            "params": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step * self.global_batch // len(self.plan.pairs),
            "total_steps": self.plan.total,
            "settings": self.settings,
            "rng": rng_state(),
            "history": self.history,
            "elapsed": self.elapsed_before + time.perf_counter() - self.start_time,
        }
        if self.ema is not None:
            state["params_ema"] = self.ema.model.state_dict()
        return state

    # -- the end

    def close(self) -> None:
        self.bar.close()
        set_activation_checkpointing(self.model, False)

    def finish(self) -> TrainResult:
        """Final checkpoint, weights and history on disk; the result."""
        if self.cfg.stop_at is not None and self.step < self.plan.total:
            self.stopped_early = True
        weights = None
        final = self.ema.model if self.ema is not None else self.model
        if self.out is not None:
            if self.checkpoint_path is None:  # nothing trained (already complete)
                self.checkpoint_path = save_checkpoint(self.out / "checkpoint.pt", self.state())
            from ssiu.checkpoint import save as save_weights

            weights = self.out / f"ssiu_x{self.plan.config.scale}.safetensors"
            save_weights(final, weights)
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        self.dist.barrier()
        self.dist.cleanup()
        return TrainResult(
            model=self.model,
            step=self.step,
            total_steps=self.plan.total,
            history=self.history,
            elapsed=self.elapsed_before + time.perf_counter() - self.start_time,
            stopped_early=self.stopped_early,
            checkpoint=self.checkpoint_path,
            weights=weights,
            ema_model=self.ema.model if self.ema is not None else None,
        )


def _tqdm_write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)


def _progress_bar(cfg: TrainConfig, plan: RunPlan, step: int, main: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=plan.total,
        initial=step,
        desc=f"train x{plan.config.scale}",
        unit="it",
        dynamic_ncols=True,
        disable=not cfg.progress or not main,
        smoothing=0.05,
    )
