"""ssiu: the SSIU super-resolution network with fused Triton kernels.

`ssiu.build(scale=4)` makes the released architecture, `ssiu.load(path)` reads the
authors' checkpoints or ours, `model.set_backend("triton")` switches to the fused
kernels (parameters unchanged), `ssiu.train(...)` trains with the released recipe.
"""

from ssiu.checkpoint import CheckpointError, load, save
from ssiu.config import SSIUConfig
from ssiu.model import SSIU, build, count_parameters
from ssiu.training import train

__version__ = "0.1.0"
__all__ = [
    "SSIU",
    "CheckpointError",
    "SSIUConfig",
    "build",
    "count_parameters",
    "load",
    "save",
    "train",
    "__version__",
]
