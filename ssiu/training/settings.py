"""What a training run is asked to do: `TrainConfig` (every option of `ssiu.train`), the
released recipe (`RECIPE`) and the checks of the values."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

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
# Validations per run when val_every is not given; a run shorter than this many steps
# times MIN_STEPS_PER_VAL validates less often (a tiny run validated after every step).
VALIDATIONS_PER_RUN = 10
MIN_STEPS_PER_VAL = 10
AMP_MODES = ("off", "bf16")


@dataclasses.dataclass
class TrainConfig:
    """Every option of `ssiu.train` (its docstring says what each does).

    The recipe fields (batch_size ... ema, see `RECIPE`) left at None take the released
    values, or the checkpoint's when resuming.
    """

    # data
    hr_dir: str | os.PathLike | None = None
    lr_dir: str | os.PathLike | None = None
    dataset: object = None
    scale: int | None = None
    cache: bool = False
    num_workers: int | None = None
    # length
    iterations: int | None = None
    epochs: float | None = None
    stop_at: int | None = None
    time_limit: float | None = None
    # recipe
    batch_size: int | None = None
    patch_size: int | None = None
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eta_min: float | None = None
    freq_weight: float | None = None
    seed: int | None = None
    augment: bool | None = None
    accum: int | None = None
    ema: float | None = None
    # validation and output
    val_hr_dir: str | os.PathLike | None = None
    val_lr_dir: str | os.PathLike | None = None
    val_dataset: object = None
    val_crop: int | None = None
    val_every: int | None = None
    val_at_start: bool = True
    save_every: int | None = None
    log_every: int = 50
    out_dir: str | os.PathLike | None = "runs/ssiu"
    resume: str | os.PathLike | None = None
    # model and execution
    model: object = None
    model_options: dict | None = None
    device: str | torch.device = "auto"
    backend: str = "auto"
    amp: bool | str = False
    compile: bool = False
    compile_backend: str | None = None
    checkpoint_steps: bool = False
    progress: bool = True
    log: object = None

    def recipe(self) -> dict:
        """The recipe fields as given (None where left to the default)."""
        return {key: getattr(self, key) for key in RECIPE}


def amp_flag(amp) -> bool:
    """amp: False/None/"off" (fp32) or True/"bf16" (bf16 autocast)."""
    if amp is None or amp is False or amp == "off":
        return False
    if amp is True or amp == "bf16":
        return True
    raise ValueError(f"amp must be one of {AMP_MODES} (or a bool), got {amp!r}")


def positive_int(name: str, value, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def positive_float(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def check_settings(s: dict) -> dict:
    """The recipe values checked (and normalised: floats, a betas tuple)."""
    positive_int("batch_size", s["batch_size"])
    positive_int("patch_size", s["patch_size"])
    positive_float("lr", s["lr"])
    positive_float("weight_decay", s["weight_decay"], allow_zero=True)
    positive_float("eta_min", s["eta_min"], allow_zero=True)
    positive_float("freq_weight", s["freq_weight"], allow_zero=True)
    positive_int("seed", s["seed"], allow_zero=True)
    positive_int("accum", s["accum"])
    if s["ema"] is not None:
        ema = positive_float("ema", s["ema"])
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


def default_val_every(total: int) -> int:
    """VALIDATIONS_PER_RUN validations, at least MIN_STEPS_PER_VAL steps apart (one at the
    end of a run shorter than that)."""
    return min(total, max(MIN_STEPS_PER_VAL, total // VALIDATIONS_PER_RUN))
