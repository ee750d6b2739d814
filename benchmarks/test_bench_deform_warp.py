"""deform_warp (MotionRNN's Warp): reference eager, reference under torch.compile, torchvision's
deform_conv2d (offsets interleaved per neighbour), and the compiled kernels.

Work per call: the contraction is a GEMM of 2·B·O·(C·k²)·HW flops (three of them with the backward pass);
the sampling adds about 8 flops per column entry forward and 30 backward. Bytes: what must be read and
written at least (inputs, outputs, gradients), not the column buffer.

"-tiny" cases scale x by 1e-38, around float32's smallest normal number (1.18e-38): products with the weights
are denormal, the case whose speed must not depend on the data (the kernels flush denormals, see
csrc/cpu/denormals.h).
"""
import pytest
import torch

from vpfast.bench import providers
from vpfast.ops import deform_warp, deform_warp_reference
from vpfast.ops.deform_warp import OP

# (B, C, H, W), k; MotionRNN's Moving-MNIST warp runs at 16 channels on 8x8 (16x16 before the stride-2
# encoder); the shapes are these two
SHAPES = {"mmnist": ((16, 32, 8, 8), 3), "mmnist-tiny": ((16, 32, 8, 8), 3), "large": ((8, 64, 64, 64), 3)}
_compiled = torch.compile(deform_warp_reference)


def _interleave(off, k):
    N = k * k
    B, _, H, W = off.shape
    return torch.stack([off[:, :N], off[:, N:]], dim=2).reshape(B, 2 * N, H, W)


def _providers():
    try:
        import torchvision  # noqa: F401
        peer = pytest.param("torchvision", id="torchvision")
    except ImportError:
        peer = pytest.param("torchvision", id="torchvision", marks=pytest.mark.skip(reason="no torchvision"))
    out = providers(OP)
    return out[:2] + [peer] + out[2:]


def _fn(provider, k):
    if provider == "eager":
        return deform_warp_reference
    if provider == "compile":
        return _compiled
    if provider == "torchvision":
        import torchvision
        return lambda x, off, m, w: torchvision.ops.deform_conv2d(x, _interleave(off, k), w, padding=k // 2, mask=m)
    return lambda x, off, m, w: deform_warp(x, off, m, w, backend=provider)


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_deform_warp(record, benchmark, provider, mode, shape):
    (B, C, H, W), k = SHAPES[shape]
    if benchmark.disabled and shape == "large" and provider in ("eager", "compile", "torchvision"):
        pytest.skip("seconds per call at the large shape: only timed with benchmarks enabled")
    N, O = k * k, C
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    x = record.to(torch.randn(B, C, H, W, generator=g) * (1e-38 if shape.endswith("-tiny") else 1.0), grad)
    off = record.to(torch.randn(B, 2 * N, H, W, generator=g) * 1.5, grad)
    mask = record.to(torch.rand(B, N, H, W, generator=g), grad)
    w = record.to(torch.randn(O, C, k, k, generator=g) / (C * k), grad)
    fn = _fn(provider, k)
    benchmark.group = f"deform_warp {shape} {(B, C, H, W)} k={k} {mode}"
    gemm = 2 * B * O * C * N * H * W
    col = B * C * N * H * W
    io = (x.numel() + off.numel() + mask.numel() + w.numel() + B * O * H * W) * x.element_size()

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, off, mask, w)
        gflops, gbytes = (gemm + 8 * col) / 1e9, io / 1e9
    else:
        def step():
            for t in (x, off, mask, w):
                t.grad = None
            fn(x, off, mask, w).backward(torch.ones(B, O, H, W, device=x.device, dtype=x.dtype))
        gflops, gbytes = (3 * gemm + 38 * col) / 1e9, 2 * io / 1e9
    record(provider, step, gbytes=gbytes, gflops=gflops)
