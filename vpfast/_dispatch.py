"""Backend selection shared by every op.

Each op owns an `Op` with one implementation per backend. A backend states why it cannot run (extension not
built, wrong device, unsupported dtype or shape ...). `backend=None` means $VPFAST_BACKEND or "auto"; auto
takes the first backend in `AUTO_ORDER` that can run; a backend asked for by name that cannot run raises
`BackendUnavailable` with every reason.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from . import _ext

BACKENDS = ("torch", "cpp", "cuda", "triton")
AUTO_ORDER = ("cuda", "cpp", "triton", "torch")
DEFAULT_DTYPES = (torch.float32, torch.float64)


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run these inputs."""


def resolve(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("VPFAST_BACKEND", "auto")
    name = (name or "auto").strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)} or None, got {name!r}")
    return name


def _tensors(args: Iterable) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


class Op:
    """The backends of one op.

    name: the op's basename (vpfast/ops/<name>.py); kernel: the schema name of its compiled op under
    torch.ops.vpfast (the cpp/cuda backends need it registered); check: optional callable(*args, **kwargs)
    -> list of reasons the fused kernels cannot take these inputs (shape limits etc.); dtypes: what the
    compiled and Triton kernels accept.
    """

    def __init__(self, name: str, kernel: str | None = None, check: Callable | None = None,
                 dtypes=DEFAULT_DTYPES):
        self.name = name
        self.kernel = kernel
        self.check = check
        self.dtypes = tuple(dtypes)
        self.impls: dict[str, Callable] = {}
        self._static: dict[str, list[str]] = {}
        REGISTRY[name] = self

    def register(self, backend: str, fn: Callable) -> Callable:
        assert backend in BACKENDS, backend
        self.impls[backend] = fn
        self._static.clear()
        return fn

    # ---- why a backend cannot run -------------------------------------------------------------------
    def static_reasons(self, backend: str) -> list[str]:
        """Reasons independent of the inputs (what is built and installed)."""
        if not self._static:
            # computed once, eagerly: torch.compile then sees plain constants when it traces a dispatch
            self._static.update({b: self._compute_static(b) for b in BACKENDS})
        return list(self._static[backend])

    def _compute_static(self, backend: str) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        if backend == "torch":
            return []
        if backend in ("cpp", "cuda"):
            if _ext.LOAD_ERROR:
                return [_ext.LOAD_ERROR]
            if backend == "cuda" and not _ext.built_with_cuda():
                why = _ext.build_info().get("cuda_skipped", "no nvcc or a CPU-only torch at build time")
                return [f"vpfast._C was built without CUDA ({why})"]
            if self.kernel and not _ext.has_kernel(self.kernel, "CPU" if backend == "cpp" else "CUDA"):
                return [f"vpfast._C has no {backend} kernel for vpfast::{self.kernel} (rebuild the extension)"]
            if backend == "cuda" and not torch.cuda.is_available():
                return ["no CUDA device is available"]
            return []
        if backend == "triton":
            if not _ext.TRITON_INSTALLED:
                return ["Triton is not installed (pip install triton)"]
            if not torch.cuda.is_available() and not _ext.triton_interpret():
                return ["no CUDA device for Triton, and TRITON_INTERPRET=1 is not set"]
        return []

    def reasons(self, backend: str, args: tuple, kwargs: dict, auto: bool = False) -> list[str]:
        why = self.static_reasons(backend)
        if backend == "torch" or (why and backend not in self.impls):
            return why
        tensors = _tensors(list(args) + list(kwargs.values()))
        devices = {t.device.type for t in tensors}
        want = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
        if backend == "triton":
            want = "cuda" if torch.cuda.is_available() and not _ext.triton_interpret() else "cpu"
            if auto and want == "cpu":
                why.append("auto never picks the Triton interpreter (it is for testing)")
        if want and devices - {want}:
            why.append(f"{backend} needs {want} tensors, got {sorted(devices)}")
        bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in self.dtypes})
        if bad:
            why.append(f"{backend} supports {[str(d) for d in self.dtypes]}, got {bad}")
        if self.check is not None:
            why.extend(self.check(backend, *args, **kwargs))
        return why

    def select(self, backend: str | None, *args, **kwargs) -> tuple[str, Callable]:
        name = resolve(backend)
        if name != "auto":
            why = self.reasons(name, args, kwargs)
            if why:
                raise BackendUnavailable(f"vpfast.{self.name}: backend {name!r} cannot run: " + "; ".join(why))
            return name, self.impls[name]
        for cand in AUTO_ORDER:
            if cand in self.impls and not self.reasons(cand, args, kwargs, auto=True):
                return cand, self.impls[cand]
        return "torch", self.impls["torch"]

    def __call__(self, *args, backend: str | None = None, **kwargs):
        return self.select(backend, *args, **kwargs)[1](*args, **kwargs)


REGISTRY: dict[str, Op] = {}
