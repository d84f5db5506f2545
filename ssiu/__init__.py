"""ssiu: the SSIU super-resolution network with fused Triton kernels."""

from ssiu.config import SSIUConfig
from ssiu.model import SSIU, build, count_parameters

__version__ = "0.1.0"
__all__ = ["SSIU", "SSIUConfig", "build", "count_parameters", "__version__"]
