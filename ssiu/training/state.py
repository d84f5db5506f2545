"""Checkpointing a run: the training checkpoint file, the RNG states, seeding.

The checkpoint (`checkpoint.pt`, `torch.save`, loadable with weights_only=True):
{"format": "ssiu-train", "version", "config", "params", "optimizer", "scheduler", "step",
"epoch", "total_steps", "settings", "rng", "history", "elapsed"}, plus "params_ema" when
an EMA of the weights is kept.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "ssiu-train"
CHECKPOINT_VERSION = 1


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


def rng_state() -> dict:
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


def set_rng_state(state: dict) -> None:
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


def seed_worker(worker_id: int) -> None:
    # Patches do not use these generators (they are keyed by sample number); seeding them
    # keeps any other randomness in a worker repeatable too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
