"""GroupNorm + SiLU: reference eager, reference under torch.compile, and the fused kernels.

Bytes per call: the forward pass reads x and writes y (2 maps); forward+backward adds the backward pass's
reads of grad and x and its write of grad_x (5 maps in all). mean/rstd and the parameters are negligible.

"-saturated": weights of 100, so that SiLU sees pre-activations in the hundreds, whose negative half gives
results and gradients below float32's smallest normal number (the kernels flush those, csrc/cpu/denormals.h).
"""
import pytest
import torch

from vpfast.bench import providers
from vpfast.ops import group_norm_silu, group_norm_silu_reference
from vpfast.ops.group_norm_silu import OP

# SimVP/TAU's encoder on Moving MNIST: B*T = 16*10 frames of GroupNorm(2, 16) over 64x64 (and 32x32)
SHAPES = {
    "simvp_cl": ((160, 16, 64, 64), 2, torch.channels_last),
    "simvp_cl-saturated": ((160, 16, 64, 64), 2, torch.channels_last),
    "simvp_nchw": ((160, 16, 64, 64), 2, torch.contiguous_format),
    "simvp32_cl": ((160, 16, 32, 32), 2, torch.channels_last),
}
_compiled = torch.compile(group_norm_silu_reference)


def _fn(provider):
    if provider == "eager":
        return group_norm_silu_reference
    if provider == "compile":
        return _compiled
    return lambda x, g, w, b: group_norm_silu(x, g, w, b, backend=provider)


@pytest.mark.parametrize("provider", providers(OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_group_norm_silu(record, benchmark, provider, mode, shape):
    size, groups, fmt = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = record.to(torch.randn(size, generator=g).contiguous(memory_format=fmt), mode != "fwd")
    w = record.to((1 + 0.1 * torch.randn(size[1], generator=g)) * (100 if shape.endswith("-saturated") else 1),
                  mode != "fwd")
    b = record.to(0.1 * torch.randn(size[1], generator=g), mode != "fwd")
    gy = record.to(torch.randn(size, generator=g).contiguous(memory_format=fmt))
    fn = _fn(provider)
    benchmark.group = f"group_norm_silu {shape} {tuple(size)} {mode}"
    nbytes = x.numel() * x.element_size()

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, groups, w, b)
        gbytes = 2 * nbytes / 1e9
    else:
        def step():
            x.grad = w.grad = b.grad = None
            fn(x, groups, w, b).backward(gy)
        gbytes = 5 * nbytes / 1e9
    record(provider, step, gbytes=gbytes)
