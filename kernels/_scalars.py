"""Float scalars for float64 Triton kernels.

A Python float argument reaches a compiled Triton kernel as float32 (the interpreter passes float64, so CPU
tests never show it), which would round tau or eps in a float64 kernel. Such scalars travel as a float32
(hi, lo) pair with hi + lo = v to about 2^-48, and the kernel adds them back together in its accumulator type.
"""
import torch
import triton
import triton.language as tl


def split_float(v: float) -> tuple[float, float]:
    """v as a float32 pair (hi, lo), hi + lo = v to about 2^-48."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


@triton.jit
def join(hi, lo, ACC: tl.constexpr):
    # a pair from split_float, summed in ACC
    return (tl.zeros([], ACC) + hi) + lo
