"""Backend selection shared by every op.

Each op owns an `Op` with one implementation per backend. A backend states why it cannot run (extension not
built, wrong device, unsupported dtype or shape ...). `backend=None` means $VPFAST_BACKEND or "auto"; auto
takes the first backend in the op's preference for the inputs' device (`Op.prefer`, default `AUTO_ORDER`)
that can run; a backend asked for by name that cannot run raises `BackendUnavailable` with every reason.

Preferences are per op and per device because the torch path is a different program on each: on the CPU
eager PyTorch is often slow (generic loops), on a GPU it is cuDNN and fused ATen kernels, so a fused kernel
that wins on the CPU can lose on the GPU. Each op declares its preference where it is defined, next to the
measurements that justify it; `python -m vpfast.info` prints them.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from . import _ext

BACKENDS = ("torch", "cpp", "cuda", "triton")
AUTO_ORDER = ("cuda", "cpp", "triton", "torch")
DEFAULT_DTYPES = (torch.float32, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_FLOAT = DEFAULT_DTYPES + LOW_PRECISION
# what a compiled or Triton kernel takes unless its op says otherwise: the GPU backends accumulate in float32
# and take the half types; the CPU kernels are float32/float64 (bf16 on the CPU goes to torch's own path)
DEFAULT_BACKEND_DTYPES = {"cpp": DEFAULT_DTYPES, "cuda": ALL_FLOAT, "triton": ALL_FLOAT}
# auto's order by the inputs' device, unless the op declares its own (Op(prefer=...))
DEFAULT_PREFER = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}
# autocast policies (Op(autocast=...)), applied by `autocast_inputs` before the argument checks:
#   "lower":   floating inputs cast to autocast's dtype, as autocast does for F.conv2d / matmul
#   "float32": floating inputs cast to float32, as autocast does for group_norm / softmax / grid_sample
#   "promote": floating inputs cast to their widest dtype, as PyTorch's type promotion does for pointwise ops
#              (a bf16 convolution output added to a float32 state is float32)
# Outside autocast nothing is cast: inputs of different dtypes are refused by the argument checks.
# A policy may differ by device, because autocast's own op lists do: group_norm and softmax run in float32
# under CUDA autocast but keep bf16 under CPU autocast; grid_sample is float32 on the CPU and promotes on CUDA.
# Give a dict {"cpu": ..., "cuda": ...} then.
AUTOCAST_POLICIES = ("lower", "float32", "promote")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run these inputs."""


def resolve(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("VPFAST_BACKEND", "auto")
    name = (name or "auto").strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)} or None, got {name!r}")
    return name


def machine_reasons(backend: str) -> list[str]:
    """Why `backend` cannot run any op on this machine as it is (what is built, installed and present), or []
    when it can: no op, input or device choice later would make it run."""
    if backend in ("torch", "auto"):
        return []
    if backend in ("cpp", "cuda"):
        if _ext.LOAD_ERROR:
            return [_ext.LOAD_ERROR]
        if backend == "cuda" and not _ext.built_with_cuda():
            why = _ext.build_info().get("cuda_skipped", "no nvcc or a CPU-only torch at build time")
            return [f"vpfast._C was built without CUDA ({why})"]
        if backend == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is available"]
        return []
    if backend == "triton":
        if not _ext.TRITON_INSTALLED:
            return ["Triton is not installed (pip install triton)"]
        if not torch.cuda.is_available() and not _ext.triton_interpret():
            return ["no CUDA device for Triton, and TRITON_INTERPRET=1 is not set"]
    return []


def require_backend(backend: str | None, where: str = "backend") -> str:
    """The resolved name of `backend` (None: $VPFAST_BACKEND or auto), or BackendUnavailable naming `where`
    when a backend asked for by name cannot run on this machine at all: a model or layer built for it would
    otherwise fail only at its first forward pass."""
    name = resolve(backend)
    why = machine_reasons(name)
    if why:
        src = f"{where}={backend!r}" if backend is not None else f"$VPFAST_BACKEND={name!r}"
        raise BackendUnavailable(f"{src} cannot run here: {'; '.join(why)}. Use backend='auto' (the fastest "
                                 "that runs) or 'torch'")
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
                 dtypes: dict | tuple | None = None, prefer: dict | None = None, autocast: str | dict = "promote"):
        self.name = name
        self.kernel = kernel
        self.check = check
        if dtypes is None:
            dtypes = DEFAULT_BACKEND_DTYPES
        if not isinstance(dtypes, dict):
            dtypes = {b: tuple(dtypes) for b in ("cpp", "cuda", "triton")}
        self.dtypes = {b: tuple(dtypes.get(b, DEFAULT_BACKEND_DTYPES[b])) for b in ("cpp", "cuda", "triton")}
        self.prefer = {**DEFAULT_PREFER, **(prefer or {})}
        for dev, order in self.prefer.items():
            assert set(order) <= set(BACKENDS) and "torch" in order, (name, dev, order)
        pol = autocast if isinstance(autocast, dict) else {"cpu": autocast, "cuda": autocast}
        assert set(pol.values()) <= set(AUTOCAST_POLICIES), autocast
        self.autocast = pol
        self.impls: dict[str, Callable] = {}
        self._static: dict[str, list[str]] = {}
        self._selected: dict = {}  # select's answers by input signature (see _signature)
        REGISTRY[name] = self

    def register(self, backend: str, fn: Callable) -> Callable:
        assert backend in BACKENDS, backend
        self.impls[backend] = fn
        self._static.clear()
        self._selected.clear()
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
        why = machine_reasons(backend)
        if why or backend not in ("cpp", "cuda"):
            return why
        if self.kernel and not _ext.has_kernel(self.kernel, "CPU" if backend == "cpp" else "CUDA"):
            return [f"vpfast._C has no {backend} kernel for vpfast::{self.kernel} (rebuild the extension)"]
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
        ok = self.dtypes.get(backend, ALL_FLOAT)
        bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in ok})
        if bad:
            why.append(f"{backend} supports {[str(d) for d in ok]}, got {bad}")
        if self.check is not None:
            why.extend(self.check(backend, *args, **kwargs))
        return why

    def select(self, backend: str | None, *args, **kwargs) -> tuple[str, Callable]:
        name = resolve(backend)
        key = _signature(args, kwargs)
        if key is not None:
            # Cached by what the reasons can depend on: the resolved name, each tensor's device type, dtype and
            # shape, the other arguments' values, the check function and the Triton interpreter switch (which
            # decides where Triton runs). Selecting anew cost ~10-17 us a call (building the tensor lists, the
            # reasons and the check), paid by every fused op call: ~250 calls in a PredRNN++ training step.
            key = (name, self.check, _ext.triton_interpret()) + key
            hit = self._selected.get(key)
            if hit is None:
                hit = self._select(name, args, kwargs)
                if len(self._selected) >= _SELECT_CACHE_SIZE:  # shapes vary without bound in some programs
                    self._selected.clear()
                self._selected[key] = hit
        else:
            hit = self._select(name, args, kwargs)
        chosen, why = hit
        if why:
            raise BackendUnavailable(f"vpfast.{self.name}: backend {name!r} cannot run: " + "; ".join(why))
        return chosen, self.impls[chosen]

    def _select(self, name: str, args: tuple, kwargs: dict) -> tuple[str, tuple]:
        """(the backend that runs, ()) or (name, reasons) when the backend asked for by name cannot run."""
        if name != "auto":
            return name, tuple(self.reasons(name, args, kwargs))
        for cand in self.auto_order(args, kwargs):
            if cand in self.impls and not self.reasons(cand, args, kwargs, auto=True):
                return cand, ()
        return "torch", ()

    def auto_order(self, args: tuple = (), kwargs: dict | None = None, device: str | None = None) -> tuple:
        """auto's candidates, best first, for inputs on `device` (default: the inputs' device type)."""
        if device is None:
            devs = {t.device.type for t in _tensors(list(args) + list((kwargs or {}).values()))}
            device = devs.pop() if len(devs) == 1 else "cpu"
        return self.prefer.get(device, AUTO_ORDER)

    def __call__(self, *args, backend: str | None = None, **kwargs):
        name, fn = self.select(backend, *args, **kwargs)
        if name == "torch":
            return fn(*args, **kwargs)
        # A fused kernel does its own dtype handling (the public function cast its inputs by the op's autocast
        # policy already); autocast must not rewrite the torch ops that wrap a kernel (views, reductions of
        # partial sums), so it is off inside.
        dev = _device_type(args, kwargs)
        if dev is not None and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    def cast_inputs(self, *tensors):
        """The op's autocast policy applied to its floating-point tensor arguments (None passes through).

        Public functions call this before checking their arguments, so that every backend, the torch
        reference included, sees what autocast would hand PyTorch's own layers.
        """
        return autocast_inputs(self.autocast, *tensors)


_SELECT_CACHE_SIZE = 1024
_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _signature(args, kwargs):
    """A hashable summary of an op call's arguments for select's cache: (device type, dtype, shape) of each
    tensor, (type, value) of each scalar (so 1, 1.0 and True differ), sequences element by element; None when an
    argument is of another kind (select then runs uncached). Every Op check here depends on no more than that
    (shapes, element counts and scalar arguments); a check reading tensor values or strides would need its op
    to opt out of the cache."""
    # one pass, no call per tensor: this runs on every fused op call (~1 us per tensor here)
    key = [(a.device.type, a.dtype, a.shape) if isinstance(a, torch.Tensor) else _arg_signature(a) for a in args]
    if kwargs:
        key += [(n, _arg_signature(kwargs[n])) for n in sorted(kwargs)]
        if any(k[1] is None for k in key[len(args):]):
            return None
    if None in key:
        return None
    return tuple(key)


def _arg_signature(a):
    if isinstance(a, torch.Tensor):
        return (a.device.type, a.dtype, a.shape)
    if isinstance(a, _SCALARS):
        return (type(a), a)
    if isinstance(a, (tuple, list)):
        parts = tuple(_arg_signature(x) for x in a)
        return None if None in parts else (type(a), parts)
    return None


def _device_type(args, kwargs) -> str | None:
    for t in _tensors(list(args) + list(kwargs.values())):
        return t.device.type
    return None


def autocast_inputs(policy: str | dict, *tensors):
    """Cast the floating-point tensors by an autocast policy (see AUTOCAST_POLICIES, or a dict of them by device
    type); other arguments pass through. Returns the arguments as a tuple."""
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return tensors
    dev = floats[0].device.type
    if isinstance(policy, dict):
        policy = policy.get(dev, "promote")
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors  # outside autocast, mixed dtypes stay an error of the argument checks, as for F.conv2d
    target = None
    if policy != "promote":
        target = torch.get_autocast_dtype(dev) if policy == "lower" else torch.float32
    elif len({t.dtype for t in floats}) > 1:
        target = floats[0].dtype
        for t in floats[1:]:
            target = torch.promote_types(target, t.dtype)
    if target is None:
        return tensors
    return tuple(t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != target
                 else t for t in tensors)


REGISTRY: dict[str, Op] = {}
