"""From the options of a run (`TrainConfig`) to what it will do (`RunPlan`): the recipe and
model configuration (the checkpoint's when resuming, checked against what was given), the
training data, the run length, and how often to validate, save and log."""

from __future__ import annotations

import dataclasses
import math

from ssiu.config import SSIUConfig
from ssiu.data import PairSource, ValidationSet, make_pairs
from ssiu.model import SSIU
from ssiu.training.settings import (
    DEFAULT_EPOCHS,
    DEFAULT_SCALE,
    RECIPE,
    TrainConfig,
    check_settings,
    default_val_every,
    positive_float,
    positive_int,
)
from ssiu.training.state import load_checkpoint
from ssiu.training.validation import as_source, validation_set


@dataclasses.dataclass
class RunPlan:
    config: SSIUConfig  # the model's
    settings: dict  # the recipe, plus the data folders (stored in the checkpoint)
    checkpoint: dict | None  # the one resumed from
    pairs: PairSource
    total: int  # steps of the whole run (the cosine schedule's length)
    val_every: int  # 0: never
    save_every: int  # 0: only at the end
    log_every: int
    val_set: ValidationSet | None


def make_plan(cfg: TrainConfig) -> RunPlan:
    ckpt = load_checkpoint(cfg.resume) if cfg.resume is not None else None
    if ckpt is not None:
        settings, config = _resumed_recipe(cfg, ckpt)
        if cfg.hr_dir is None and cfg.dataset is None and settings.get("hr_dir"):
            cfg = dataclasses.replace(cfg, hr_dir=settings["hr_dir"], lr_dir=settings.get("lr_dir"))
    else:
        settings = {k: (RECIPE[k] if v is None else v) for k, v in cfg.recipe().items()}
        config = _new_model_config(cfg)
    settings = check_settings(settings)
    pairs = _training_pairs(cfg, config.scale)
    settings["hr_dir"] = str(cfg.hr_dir) if cfg.hr_dir is not None else None
    settings["lr_dir"] = str(cfg.lr_dir) if cfg.lr_dir is not None else None
    total = _run_length(cfg, ckpt, len(pairs), settings)
    if cfg.stop_at is not None:
        positive_int("stop_at", cfg.stop_at)
    if cfg.time_limit is not None:
        positive_float("time_limit", cfg.time_limit)
    val_every = default_val_every(total) if cfg.val_every is None else cfg.val_every
    save_every = val_every if cfg.save_every is None else cfg.save_every
    positive_int("val_every", val_every, allow_zero=True)
    positive_int("save_every", save_every, allow_zero=True)
    val_set = None
    if val_every:
        val_set = validation_set(
            cfg.val_hr_dir, cfg.val_lr_dir, cfg.val_dataset, cfg.val_crop, config.scale
        )
    return RunPlan(
        config=config,
        settings=settings,
        checkpoint=ckpt,
        pairs=pairs,
        total=total,
        val_every=val_every,
        save_every=save_every,
        log_every=positive_int("log_every", cfg.log_every),
        val_set=val_set,
    )


def _resumed_recipe(cfg: TrainConfig, ckpt: dict) -> tuple[dict, SSIUConfig]:
    """The checkpoint's recipe and model; a given value that differs is an error."""
    if cfg.model is not None:
        raise ValueError("give either resume or model, not both")
    settings = {"accum": 1, "ema": None, **ckpt["settings"]}
    for key, value in cfg.recipe().items():
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
    if cfg.scale is not None and cfg.scale != config.scale:
        raise ValueError(f"resume: scale={cfg.scale} but the checkpoint is x{config.scale}")
    for key, value in (cfg.model_options or {}).items():
        if getattr(config, key, value) != value:
            raise ValueError(
                f"resume: {key}={value!r} but the checkpoint's model has "
                f"{key}={getattr(config, key)!r}"
            )
    return settings, config


def _new_model_config(cfg: TrainConfig) -> SSIUConfig:
    model = cfg.model
    if model is None:
        scale = DEFAULT_SCALE if cfg.scale is None else cfg.scale
        return SSIUConfig(scale=scale, **(cfg.model_options or {}))
    if not isinstance(model, SSIU):
        raise TypeError(f"model must be an ssiu.SSIU, got {type(model).__name__}")
    if cfg.model_options:
        raise ValueError("give either model or model_options, not both")
    if cfg.scale is not None and cfg.scale != model.config.scale:
        raise ValueError(f"scale={cfg.scale} but the model is x{model.config.scale}")
    return model.config


def _training_pairs(cfg: TrainConfig, scale: int) -> PairSource:
    if cfg.dataset is not None and (cfg.hr_dir is not None or cfg.lr_dir is not None):
        raise ValueError("give either dataset or hr_dir/lr_dir, not both")
    if cfg.dataset is not None:
        pairs = as_source(cfg.dataset, scale)
    elif cfg.hr_dir is not None or cfg.lr_dir is not None:
        pairs = make_pairs(cfg.hr_dir, cfg.lr_dir, scale, cache=cfg.cache)
    else:
        raise ValueError("no training data: give hr_dir (and optionally lr_dir) or dataset")
    if cfg.cache and hasattr(pairs, "preload"):
        pairs.preload()
    return pairs


def _run_length(cfg: TrainConfig, ckpt: dict | None, n_images: int, settings: dict) -> int:
    if ckpt is not None:
        total = int(ckpt["total_steps"])
        if cfg.iterations is not None and cfg.iterations != total:
            raise ValueError(f"resume: iterations={cfg.iterations} but the run has {total} steps")
        if cfg.epochs is not None:
            raise ValueError("resume: the run length is fixed by the checkpoint; drop epochs")
        return total
    if cfg.iterations is not None:
        if cfg.epochs is not None:
            raise ValueError("give iterations or epochs, not both")
        return positive_int("iterations", cfg.iterations)
    epochs = DEFAULT_EPOCHS if cfg.epochs is None else positive_float("epochs", cfg.epochs)
    return max(1, math.ceil(epochs * n_images / (settings["batch_size"] * settings["accum"])))
