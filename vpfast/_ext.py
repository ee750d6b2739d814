"""The compiled extension vpfast._C and Triton: both optional.

Without them every op still works through its torch reference; `vpfast.info` says what is missing and why.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import warnings

import torch

_C = None
LOAD_ERROR: str | None = None
_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the source tree (several minutes: it "
               "compiles C++, and CUDA where nvcc is found; VPFAST_SKIP_CUDA=1 for a CPU-only build)")


def _missing_extension_message(pkg_dir: str, msg: str) -> str:
    # When no vpfast/_C*.so exists, `from . import _C` falls back to an attribute of the half-imported package
    # and Python blames "a circular import"; say what is really wrong instead.
    names = sorted(f for f in os.listdir(pkg_dir) if f.startswith("_C.") or f.startswith("_C-")) \
        if os.path.isdir(pkg_dir) else []
    want = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    if want in names:  # present, but its import was blocked (sys.modules["vpfast._C"] = None, as tests do)
        return f"vpfast._C could not be imported although {pkg_dir}/{want} exists ({msg}); {_BUILD_HINT}"
    if names:  # a build for another Python (e.g. _C.cpython-310-...so under 3.11)
        return (f"vpfast._C is not built for this Python: {pkg_dir} has {', '.join(names)} but this interpreter "
                f"loads {want}; {_BUILD_HINT}")
    return f"vpfast._C is not built: {pkg_dir} has no {want}; {_BUILD_HINT}"


try:
    from . import _C  # noqa: F811  (registers the torch.ops.vpfast kernels as a side effect)
except ImportError as e:  # not built, built for another Python, or built against another torch
    msg = str(e)
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec(f"{__package__}._C") is None:
        LOAD_ERROR = _missing_extension_message(pkg_dir, msg)
    elif "undefined symbol" in msg or "version" in msg.lower():
        LOAD_ERROR = (f"vpfast._C was built for another torch than {torch.__version__} ({msg}); "
                      "rebuild with `pip install --no-build-isolation -e .`")
    else:
        LOAD_ERROR = f"vpfast._C could not be loaded ({msg}); {_BUILD_HINT}"


def build_info() -> dict:
    """Metadata recorded by setup.py when the extension was compiled ({} if it is not loaded)."""
    return json.loads(_C.build_info()) if _C is not None else {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `vpfast::<op>` for a dispatch key ("CPU" or "CUDA")."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"vpfast::{op}", dispatch_key)
    except RuntimeError:
        return False


def built_with_cuda() -> bool:
    return bool(_C is not None and _C.with_cuda)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked by sys.modules[name] = None
        return False


TRITON_INSTALLED = _has_module("triton")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_warned = False


def warn_once() -> None:
    """One warning at import when a part is missing; the torch reference serves in its place."""
    global _warned
    if _warned:
        return
    _warned = True
    missing = []
    if LOAD_ERROR:
        missing.append(LOAD_ERROR)
    if not TRITON_INSTALLED and torch.cuda.is_available():
        missing.append("Triton is not installed, so the triton backend is unavailable")
    if missing and os.environ.get("VPFAST_QUIET", "0") != "1":
        warnings.warn("vpfast: " + "; ".join(missing) + ". The torch reference implementations serve instead "
                      "(see `python -m vpfast.info`).", RuntimeWarning, stacklevel=3)


def output_cache_info() -> dict:
    """The CPU output cache (csrc/cpu/output_cache.h): limit_bytes, cached_bytes, cached_blocks, hits, misses.

    Compiled CPU kernels take their large outputs (>= 1 MiB) from blocks that earlier outputs of the same size
    freed, so a training loop does not page-fault every output in afresh each step. {} without the extension.
    """
    return dict(_C.output_cache_stats()) if _C is not None else {}


def set_output_cache_limit(mb: int) -> None:
    """Keep at most `mb` MiB of freed output blocks (0 turns the cache off); the start value is
    $VPFAST_CPU_OUTPUT_CACHE_MB or 256."""
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
        raise ValueError(f"mb must be an int >= 0, got {mb!r}")
    if _C is not None:
        _C.output_cache_set_limit(mb << 20)


def empty_output_cache() -> None:
    """Free every cached output block (tensors still alive are untouched)."""
    if _C is not None:
        _C.output_cache_clear()
