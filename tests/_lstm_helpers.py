"""Backend parametrisation shared by tests/test_stlstm.py and tests/test_convlstm.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/conftest.py does the same; Triton reads it when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAST = ("cpp", "cuda", "triton")


def backend_params(op):
    """pytest params for every non-reference backend, skipped (with the dispatcher's reasons) when unavailable."""
    out = []
    for b in FAST:
        why = op.static_reasons(b)
        if b == "cuda" and not why and not torch.cuda.is_available():
            why = ["no CUDA device"]
        marks = [pytest.mark.skipif(bool(why), reason="; ".join(why) or "available")]
        if b == "triton":
            marks.append(pytest.mark.triton)
        out.append(pytest.param(b, marks=marks, id=b))
    return out


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def tol(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
