"""Pieces shared by the elementwise Triton kernels (stlstm, convlstm, motion_gru): one program per BLOCK
elements of a flattened index space."""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def tanh(x):
    # tl has no tanh in every Triton release this package supports
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(max(n, 1), BLOCK),)
