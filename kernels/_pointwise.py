"""Pieces shared by the elementwise Triton kernels (stlstm, convlstm, motion_gru): one program per BLOCK
elements of a flattened index space, and their launcher.

Gate operands: the recurrent cells' kernels index a [B, C, H, W] state and [B, K*C, H, W] gate operands
(K gates of C channels per sample, e.g. the four LSTM gates); gate j of flat state index idx = (b, ch, p) sits
at (b*K + j)*C*HW + ch*HW + p, which `gate_index`, `load_gate` and `put_gate` compute once.

Precision: every operand is widened on load (`wide`: float32 for bfloat16/float16, float64 kept) and each
result is rounded once to its output's dtype on store (`put`), so a half-precision call rounds as PyTorch's
own pointwise kernels do (they also compute in float32) rather than after every intermediate.

Limits: the grid is 1-D (x allows 2**31 - 1 programs, far more than int32 indices can address) and offsets
are int32, so the ops refuse operands of 2**31 elements or more for the triton backend (their Op checks).
"""
from __future__ import annotations

import torch
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


@triton.jit
def gate_index(N, CHW, BLOCK: tl.constexpr):
    """This program's flat indices into a [B, C, H, W] state with N elements and CHW = C*H*W: (idx, mask, b,
    rest), where b is the sample and rest = ch*HW + p the offset inside the sample."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < N, idx // CHW, idx % CHW


@triton.jit
def load_gate(ptr, b, K: tl.constexpr, j: tl.constexpr, CHW, rest, mask):
    # gate j of a [B, K*C, H, W] operand, widened (see wide)
    return wide(tl.load(ptr + (b * K + j) * CHW + rest, mask=mask))


@triton.jit
def put_gate(ptr, b, K: tl.constexpr, j: tl.constexpr, CHW, rest, value, mask):
    put(ptr + (b * K + j) * CHW + rest, value, mask)


@triton.jit
def load_gates4(ptr, b, K: tl.constexpr, j: tl.constexpr, CHW, rest, mask):
    # gates j .. j+3 of a [B, K*C, H, W] operand (an LSTM's i, f, g, o), widened
    return (load_gate(ptr, b, K, j, CHW, rest, mask), load_gate(ptr, b, K, j + 1, CHW, rest, mask),
            load_gate(ptr, b, K, j + 2, CHW, rest, mask), load_gate(ptr, b, K, j + 3, CHW, rest, mask))


@triton.jit
def put_gates4(ptr, b, K: tl.constexpr, j: tl.constexpr, CHW, rest, v0, v1, v2, v3, mask):
    put_gate(ptr, b, K, j, CHW, rest, v0, mask)
    put_gate(ptr, b, K, j + 1, CHW, rest, v1, mask)
    put_gate(ptr, b, K, j + 2, CHW, rest, v2, mask)
    put_gate(ptr, b, K, j + 3, CHW, rest, v3, mask)


def contiguous(*tensors):
    """Each tensor made contiguous (the kernels index flat memory); None, an absent operand, stays None."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def launch(kernel, n: int, *args, **constexprs) -> None:
    """Run an elementwise kernel over n elements with one program per BLOCK; nothing for n == 0 (Triton cannot
    launch an empty grid). An argument given as None is an absent optional operand that the kernel's flag keeps
    unread; Triton still needs a pointer there, so the first tensor argument stands in for it."""
    if not n:
        return
    stand_in = next(a for a in args if isinstance(a, torch.Tensor))
    kernel[grid(n)](*(stand_in if a is None else a for a in args), **constexprs, BLOCK=BLOCK)
