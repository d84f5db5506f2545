"""ssiu: the SSIU super-resolution network with fused Triton kernels.

`ssiu.build(scale=4)` makes the released architecture, `ssiu.load(path)` reads the
authors' checkpoints or ours, `model.set_backend("triton")` switches to the fused
kernels (parameters unchanged), `ssiu.train(...)` trains with the released recipe.

The names below load on first use (PEP 562), so `import ssiu` and `ssiu --help` do not
import torch.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "SSIU": "ssiu.model",
    "build": "ssiu.model",
    "count_parameters": "ssiu.model",
    "CheckpointError": "ssiu.checkpoint",
    "load": "ssiu.checkpoint",
    "save": "ssiu.checkpoint",
    "SSIUConfig": "ssiu.config",
    "train": "ssiu.training",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"ssiu.{name}") is not None:
        value = importlib.import_module(f"ssiu.{name}")  # `ssiu.data` etc. after `import ssiu`
    else:
        raise AttributeError(f"module 'ssiu' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
