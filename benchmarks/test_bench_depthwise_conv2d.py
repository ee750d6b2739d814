"""Depthwise convolution and large-kernel attention's fused depthwise pair: reference eager (oneDNN),
reference under torch.compile, and the compiled kernels; forward and forward+backward.

Shapes from issue 4: TAU's Moving-MNIST translator (B=16, C=512, 16x16) for the 5x5, the 7x7 dilation 3 and
the fused pair; 21x21 and 31x31 at (B=8, C=128, 64x64). gflops counts the nominal multiply-adds of every tap
(2 per tap and output; the backward pass is twice the forward), including taps that fall into the padding.
With --benchmark-disable (CI's smoke run) every case runs once on a shrunken batch/channel count.

"-tiny" cases scale x by 1e-38, around float32's smallest normal number (1.18e-38): products with the weights
are denormal, the case whose speed must not depend on the data (the kernels flush denormals, see
csrc/cpu/denormals.h).
"""
import pytest
import torch

from vpfast.bench import grad_step, providers
from vpfast.ops import (depthwise_conv2d, depthwise_conv2d_reference, large_kernel_attention,
                        large_kernel_attention_reference)
from vpfast.ops.depthwise_conv2d import OP as DW_OP
from vpfast.ops.large_kernel_attention import OP as LKA_OP

CONV = {  # name: (B, C, H, W, k, dilation)
    "tau_5x5": (16, 512, 16, 16, 5, 1),
    "tau_5x5-tiny": (16, 512, 16, 16, 5, 1),
    "tau_7x7_d3": (16, 512, 16, 16, 7, 3),
    "21x21": (8, 128, 64, 64, 21, 1),
    "31x31": (8, 128, 64, 64, 31, 1),
}
PAIR = {"tau_5x5_7x7_d3": (16, 512, 16, 16, 5, 7, 3), "tau_5x5_7x7_d3-tiny": (16, 512, 16, 16, 5, 7, 3)}

_dw_compiled = torch.compile(depthwise_conv2d_reference)
_lka_compiled = torch.compile(large_kernel_attention_reference)


def _step(fn, args, mode):
    if mode != "fwd":
        return grad_step(fn, args)

    def step():
        with torch.no_grad():
            return fn(*args)
    return step


@pytest.mark.parametrize("provider", providers(DW_OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(CONV), ids=list(CONV))
def test_depthwise_conv2d(record, benchmark, provider, mode, shape):
    B, C, H, W, k, d = CONV[shape]
    if benchmark.disabled:
        B, C = 1, 4
    g = torch.Generator().manual_seed(0)
    x = record.to(torch.randn(B, C, H, W, generator=g) * (1e-38 if shape.endswith("-tiny") else 1.0), mode != "fwd")
    w = record.to(torch.randn(C, 1, k, k, generator=g), mode != "fwd")
    b = record.to(torch.randn(C, generator=g), mode != "fwd")
    fn = {"eager": lambda *a: depthwise_conv2d_reference(*a, dilation=d),
          "compile": lambda *a: _dw_compiled(*a, dilation=d)}.get(
        provider, lambda *a: depthwise_conv2d(*a, dilation=d, backend=provider))
    benchmark.group = f"depthwise_conv2d {shape} {(B, C, H, W)} k{k} d{d} {mode}"
    flops = 2 * B * C * H * W * k * k * (1 if mode == "fwd" else 3)
    nbytes = x.numel() * x.element_size()
    record(provider, _step(fn, (x, w, b), mode), gflops=flops / 1e9,
           gbytes=(2 if mode == "fwd" else 6) * nbytes / 1e9)


@pytest.mark.parametrize("provider", providers(LKA_OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(PAIR), ids=list(PAIR))
def test_large_kernel_attention_pair(record, benchmark, provider, mode, shape):
    B, C, H, W, k0, k1, d = PAIR[shape]
    if benchmark.disabled:
        B, C = 1, 4
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: record.to(torch.randn(*s, generator=g), mode != "fwd")  # noqa: E731
    args = (mk(B, C, H, W), mk(C, 1, k0, k0), mk(C), mk(C, 1, k1, k1), mk(C))
    if shape.endswith("-tiny"):
        args = (record.to(args[0].detach() * 1e-38, mode != "fwd"),) + args[1:]
    fn = {"eager": lambda *a: large_kernel_attention_reference(*a, dilation=d),
          "compile": lambda *a: _lka_compiled(*a, dilation=d)}.get(
        provider, lambda *a: large_kernel_attention(*a, dilation=d, backend=provider))
    benchmark.group = f"large_kernel_attention {shape} {(B, C, H, W)} {mode}"
    flops = 2 * B * C * H * W * (k0 * k0 + k1 * k1) * (1 if mode == "fwd" else 3)
    nbytes = B * C * H * W * args[0].element_size()
    record(provider, _step(fn, args, mode), gflops=flops / 1e9,
           gbytes=(2 if mode == "fwd" else 6) * nbytes / 1e9)
