"""Helpers for tests of vpfast ops (and of code built on them): backends as pytest parameters."""
from __future__ import annotations

import contextlib

import torch

from ._dispatch import REGISTRY


def private_compile_cache() -> str:
    """Point torch.compile's on-disk caches at a fresh directory for this process; returns it.

    Inductor keys its cached graphs by torch's version and the graph, not by the fake (meta) kernels of custom
    ops, so a graph compiled against another vpfast build would be reused with that build's output shapes.
    Test and benchmark sessions call this so that they never read such a stale entry. A directory set in
    $TORCHINDUCTOR_CACHE_DIR is kept as it is; one made here is removed when the process exits.
    """
    import atexit
    import os
    import shutil
    import tempfile

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="vpfast-inductor-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def backend_params(op: str, include_torch: bool = False):
    """pytest parameters for every backend of `op`; those that cannot run here are skipped with the reason."""
    import pytest

    out = []
    for name in ("torch", "cpp", "cuda", "triton"):
        if name == "torch" and not include_torch:
            continue
        why = REGISTRY[op].static_reasons(name)
        marks = [pytest.mark.skip(reason="; ".join(why))] if why else []
        if name == "triton":
            marks.append(pytest.mark.triton)
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def device_for(backend: str) -> str:
    """The device whose tensors `backend` takes in this process: "cuda" for the cuda backend, and for triton
    when a GPU runs it (TRITON_INTERPRET unset); "cpu" otherwise (cpp, torch, Triton's interpreter)."""
    from . import _ext

    if backend == "cuda":
        return "cuda"
    if backend == "triton" and torch.cuda.is_available() and not _ext.triton_interpret():
        return "cuda"
    return "cpu"


def low_precision_params(op: str, backends=("cuda", "triton")):
    """pytest parameters (backend, dtype) for the half types each GPU backend of `op` declares; skipped with the
    reason where the backend cannot run here or runs only under the interpreter (which has no bf16 math)."""
    import pytest

    out = []
    for name in backends:
        why = REGISTRY[op].static_reasons(name)
        if name == "triton" and not why and device_for("triton") != "cuda":
            why = ["Triton's half-precision kernels are checked on a GPU (the interpreter runs them on numpy)"]
        for dt in (torch.bfloat16, torch.float16):
            if dt not in REGISTRY[op].dtypes.get(name, ()):
                continue
            marks = [pytest.mark.skip(reason="; ".join(why))] if why else []
            if name == "triton":
                marks.append(pytest.mark.triton)
            out.append(pytest.param(name, dt, id=f"{name}-{str(dt).split('.')[-1]}", marks=marks))
    return out


@contextlib.contextmanager
def exact_float32():
    """float32 convolutions and matmuls without TF32 inside the block (CUDA uses TF32 for convolutions by
    default, ~1e-3 relative error), so GPU references in float32 are comparable with fused kernels."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def tolerances(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a fused kernel with the reference at this dtype."""
    return {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-6)}[dtype]


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as x, laid out with a stride gap in the last dimension."""
    y = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)[..., ::2]
    y.copy_(x)
    return y.requires_grad_(x.requires_grad)


def assert_close_bounded(out: torch.Tensor, ref_same: torch.Tensor, ref_f64: torch.Tensor, factor: float = 8.0,
                         floor: float = 1e-6, name: str = "output") -> None:
    """Check a low-precision result by the reference's own error at that precision.

    out and ref_same are computed at the same (low) precision, ref_f64 in float64 from the same inputs.
    Passes if |out - ref_f64| <= factor * |ref_same - ref_f64| + floor * max|ref_f64| everywhere that
    matters (in max norm): a fused kernel may round differently, but not much worse than PyTorch does.
    """
    ref = ref_f64.double()
    scale = ref.abs().max().clamp_min(1e-12)  # an all-zero reference still allows float32 dust
    err = (out.double() - ref).abs().max()
    base = (ref_same.double() - ref).abs().max()
    bound = factor * base + floor * scale
    assert err <= bound, (f"{name}: max error {err.item():.3e} vs float64 reference exceeds {factor} x the "
                          f"reference's own error {base.item():.3e} + {floor} x scale {scale.item():.3e}")


# ---- denormals -------------------------------------------------------------------------------------------
def flush_pattern(n: int = 1 << 18) -> torch.Tensor:
    """Which elements of n float32 denormals PyTorch's own multi-threaded multiply turns into 0: the
    flush-to-zero state of the calling thread and of at::parallel_for's workers, as PyTorch code sees it.

    -> Tensor[n] (bool; all False where no thread flushes, all True after torch.set_flush_denormal(True) in
    every thread)
    """
    x = torch.full((n,), 1e-39, dtype=torch.float32)  # below float32's smallest normal number, 1.18e-38
    return x * 0.5 == 0


def assert_keeps_fp_state(fn) -> None:
    """Run fn() once with denormals kept and once with torch.set_flush_denormal(True) (where the CPU has the
    mode), and check that every thread's flush-to-zero state afterwards is what it was before: the CPU kernels
    flush denormals inside their own scope only (csrc/cpu/denormals.h). The caller's setting is restored."""
    original = bool(flush_pattern(1)[0])
    try:
        for flush in (False, True):
            if not torch.set_flush_denormal(flush):
                continue  # no flush-to-zero on this CPU
            before = flush_pattern()
            fn()
            after = flush_pattern()
            assert torch.equal(before, after), (
                f"the op changed the caller's denormal handling (torch.set_flush_denormal({flush})): "
                f"{int((before != after).sum())} of {before.numel()} elements differ")
    finally:
        torch.set_flush_denormal(original)
