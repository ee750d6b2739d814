"""flow_warp: grid construction + grid_sample (the reference, eager and under torch.compile) vs the compiled
kernels, which build no grid. Bytes: x and flow read, the output written (forward); the backward pass reads
the output gradient, x and flow again and writes the gradients of x and flow.

"-tiny" cases scale x by 1e-38, around float32's smallest normal number (1.18e-38): products with the weights
are denormal, the case whose speed must not depend on the data (the kernels flush denormals, see
csrc/cpu/denormals.h).
"""
import pytest
import torch

from vpfast.bench import providers
from vpfast.ops import flow_warp, flow_warp_reference
from vpfast.ops.flow_warp import OP

SHAPES = {"b16c64": (16, 64, 64, 64), "b16c64-tiny": (16, 64, 64, 64)}
_compiled = torch.compile(flow_warp_reference)


def _fn(provider):
    if provider == "eager":
        return flow_warp_reference
    if provider == "compile":
        return _compiled
    return lambda x, f, pm: flow_warp(x, f, pm, backend=provider)


@pytest.mark.parametrize("provider", providers(OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_flow_warp(record, benchmark, provider, mode, padding, shape):
    B, C, H, W = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    x = record.to(torch.randn(B, C, H, W, generator=g) * (1e-38 if shape.endswith("-tiny") else 1.0), grad)
    flow = record.to(torch.randn(B, 2, H, W, generator=g) * 3, grad)
    fn = _fn(provider)
    benchmark.group = f"flow_warp {shape} {(B, C, H, W)} {padding} {mode}"
    nx, nf = x.numel() * x.element_size(), flow.numel() * flow.element_size()

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, flow, padding)
        gbytes = (2 * nx + nf) / 1e9
    else:
        def step():
            x.grad = flow.grad = None
            fn(x, flow, padding).backward(torch.ones(B, C, H, W, device=x.device, dtype=x.dtype))
        gbytes = (5 * nx + 3 * nf) / 1e9
    record(provider, step, gbytes=gbytes)
