"""ssiu: the SSIU super-resolution network with fused Triton kernels.

    model = ssiu.build(scale=4)          # fresh, released architecture
    model = ssiu.load("SSIU_x4.pt")      # the authors' checkpoint or ours
    model.set_backend("triton")          # fused kernels (parameters unchanged)
"""

from ssiu.checkpoint import CheckpointError, load, save
from ssiu.config import SSIUConfig
from ssiu.model import SSIU, build, count_parameters

__version__ = "0.1.0"
__all__ = [
    "SSIU",
    "CheckpointError",
    "SSIUConfig",
    "build",
    "count_parameters",
    "load",
    "save",
    "__version__",
]
