"""vpfast: fast kernels, layers and models for spatiotemporal video prediction."""
from . import _ext

__version__ = "0.1.0"

_ext.warn_once()

from . import ops, nn, models  # noqa: E402,F401
from ._dispatch import BackendUnavailable  # noqa: E402,F401
from ._ext import empty_output_cache, output_cache_info, set_output_cache_limit  # noqa: E402,F401
from .accelerate import AccelerateReport, accelerate  # noqa: E402,F401
