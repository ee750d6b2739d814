"""Pieces shared by the elementwise Triton kernels (stlstm, convlstm, motion_gru): one program per BLOCK
elements of a flattened index space.

Precision: every operand is widened on load (`wide`: float32 for bfloat16/float16, float64 kept) and each
result is rounded once to its output's dtype on store (`put`), so a half-precision call rounds as PyTorch's
own pointwise kernels do (they also compute in float32) rather than after every intermediate.

Limits: the grid is 1-D (x allows 2**31 - 1 programs, far more than int32 indices can address) and offsets
are int32, so the ops refuse operands of 2**31 elements or more for the triton backend (their Op checks).
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def tanh(x):
    # tl has no tanh in every Triton release this package supports
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def wide(x):
    # the branch is resolved at compile time (x.dtype is a constant of the specialisation)
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def put(ptr, value, mask):
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(max(n, 1), BLOCK),)
