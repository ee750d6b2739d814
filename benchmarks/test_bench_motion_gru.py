"""motion_gru: MotionGRU's state update (three 3x3 convolutions + pointwise work), reference eager, reference
under torch.compile, and the fused path (update and reset as one convolution, two fused pointwise kernels).
Flops: the three convolutions, 2·B·M·(Cin+M)·9·HW each (three times that with the backward pass).
"-saturated": inputs and states 100x larger, so that the gates saturate and exp(-|x|) inside sigmoid and tanh
is denormal or underflows (the kernels flush denormals, csrc/cpu/denormals.h)."""
import pytest
import torch

from vpfast.bench import providers
from vpfast.ops import motion_gru, motion_gru_reference
from vpfast.ops.motion_gru import OP

# MotionRNN on Moving MNIST: 64x64 frames, patch 4 -> 16x16, stride-2 encoder -> 8x8, nh/4 = 16 channels;
# and thuml's Human3.6M-like setting at a larger map
SHAPES = {"mmnist": (16, 16, 18, 8, 8), "mmnist-saturated": (16, 16, 18, 8, 8), "large": (8, 16, 18, 32, 32)}
_compiled = torch.compile(motion_gru_reference)


def _fn(provider):
    if provider == "eager":
        return motion_gru_reference
    if provider == "compile":
        return _compiled
    return lambda *a: motion_gru(*a, backend=provider)


@pytest.mark.parametrize("provider", providers(OP))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_motion_gru(record, benchmark, provider, mode, shape):
    B, Cin, M, H, W = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    r = lambda *s, sc=1.0: record.to(torch.randn(*s, generator=g) * sc, grad)
    big = 100.0 if shape.endswith("-saturated") else 1.0
    ins = [r(B, Cin, H, W, sc=big), r(B, M, H, W, sc=big), r(B, M, H, W, sc=big)]
    for _ in range(3):
        ins += [r(M, Cin + M, 3, 3, sc=0.05), r(M, sc=0.1)]
    fn = _fn(provider)
    benchmark.group = f"motion_gru {shape} {(B, Cin, M, H, W)} {mode}"
    conv = 3 * 2 * B * M * (Cin + M) * 9 * H * W

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*ins)
        gflops = conv / 1e9
    else:
        def step():
            for t in ins:
                t.grad = None
            f, d = fn(*ins)
            (f.sum() + d.sum()).backward()
        gflops = 3 * conv / 1e9
    record(provider, step, gflops=gflops)
