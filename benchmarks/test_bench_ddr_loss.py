"""DDR loss: reference eager, reference under torch.compile, and the fused kernels.

Bytes per call: the forward pass reads pred and target once (the row stays in cache across its sweeps); the
backward pass reads them again and writes grad_pred.

Inputs: frames in [0, 1] (the usual case), and "-randn" frames from torch.randn: with tau = 0.1 the softmax of
their differences has tails below float32's smallest normal number, the denormal case a CPU kernel must not
slow down on (TAU's loss sees such inputs as predictions and targets drift apart).
"""
import pytest
import torch

from vpfast.bench import grad_step, providers
from vpfast.ops import ddr_loss, ddr_loss_reference
from vpfast.ops.ddr_loss import OP

SHAPES = {"mmnist": (16, 10, 1, 64, 64), "mmnist-randn": (16, 10, 1, 64, 64), "large": (16, 10, 3, 128, 128)}
_compiled = torch.compile(ddr_loss_reference)


def _fn(provider):
    if provider == "eager":
        return ddr_loss_reference
    if provider == "compile":
        return _compiled
    return lambda p, y: ddr_loss(p, y, backend=provider)


@pytest.mark.parametrize("provider", providers(OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_ddr_loss(record, benchmark, provider, mode, shape):
    size = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    draw = torch.randn if shape.endswith("-randn") else torch.rand
    pred = record.to(draw(size, generator=g), mode != "fwd")
    target = record.to(draw(size, generator=g))
    fn = _fn(provider)
    benchmark.group = f"ddr_loss {shape} {tuple(size)} {mode}"
    nbytes = pred.numel() * pred.element_size()

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(pred, target)
        gbytes = 2 * nbytes / 1e9
    else:
        # autograd.grad with a fixed incoming gradient, as the other suites: a step that cleared and refilled
        # pred.grad freed the previous gradient first, so its peak extra memory read 0
        step = grad_step(fn, (pred, target))
        gbytes = 5 * nbytes / 1e9
    record(provider, step, gbytes=gbytes)
