"""ConvLSTM step (OpenSTL cell): reference eager, reference under torch.compile, and the fused path.

Groups: one cell step forward+backward and the pointwise part alone (on given conv_x / conv_h outputs).
Providers: eager, compile, cpp (fused kernel + merged convolution), cpp_sep (fused kernel, separate convs).
With --benchmark-disable the shapes shrink so that the suite only checks that everything runs.
A "-saturated" pointwise case scales the convolution outputs by 100: saturated gates, whose exp(-|x|) inside
sigmoid and tanh is denormal or underflows (the kernels flush denormals, csrc/cpu/denormals.h).
"""
import importlib

import pytest
import torch

from vpfast.bench import backend_of, grad_step, providers
from vpfast.nn import ConvLSTMCell

CL = importlib.import_module("vpfast.ops.convlstm")
SHAPES = {"C64": (16, 64, 16, 16, 5), "C128": (16, 128, 16, 16, 5)}
TINY = (2, 8, 6, 6, 3)


def _providers(with_sep=True):
    # eager, compile, then each fused backend (and its separate-convolutions variant "<backend>_sep")
    return providers(CL.OP, sep=with_sep)


def _shape(request, name):
    name = name.split("-")[0]  # "C64-saturated": the C64 shape with other inputs
    if request.config.getoption("benchmark_disable"):
        if name != "C64":
            pytest.skip("--benchmark-disable: one tiny shape stands for all")
        return TINY
    return SHAPES[name]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", _providers())
def test_cell_step_fwdbwd(benchmark, record, request, provider, shape):
    B, C, H, W, k = _shape(request, shape)
    benchmark.group = f"convlstm cell step {shape} B{B} C{C} {H}x{W} k{k} fwdbwd"
    torch.manual_seed(0)
    backend = backend_of(provider)
    cell = ConvLSTMCell(C, C, H, W, k, 1, False, backend=backend,
                        merge_convs=backend != "torch" and not provider.endswith("_sep")).to(record.device, record.dtype)
    step = torch.compile(cell._forward_reference) if provider == "compile" else cell
    g = torch.Generator().manual_seed(1)
    x, h, c = [record.to(torch.randn(B, C, H, W, generator=g) * 0.5, True) for _ in range(3)]

    def fn():
        hn, cn = step(x, h, c)
        (hn.sum() + cn.sum()).backward()

    record(provider, fn, gflops=3 * 2 * B * H * W * k * k * 8 * C * C / 1e9)


def _ref(x_g, h_g, c):
    return CL.convlstm_reference(x_g, h_g, c)


_compiled = torch.compile(_ref)


@pytest.mark.parametrize("shape", list(SHAPES) + ["C64-saturated"])
@pytest.mark.parametrize("provider", _providers(with_sep=False))
def test_pointwise_fwdbwd(benchmark, record, request, provider, shape):
    B, C, H, W, _ = _shape(request, shape)
    benchmark.group = f"convlstm pointwise {shape} B{B} C{C} {H}x{W} fwdbwd"
    g = torch.Generator().manual_seed(2)
    sc = 100.0 if shape.endswith("-saturated") else 1.0
    args = [record.to(torch.randn(B, n * C, H, W, generator=g) * sc, True) for n in (4, 4, 1)]
    f = {"eager": _ref, "compile": _compiled, "cpp": CL._compiled}.get(
        provider, lambda *a: CL.convlstm(*a, backend=provider))

    fn = grad_step(f, args)
    # forward reads 9C writes 2C (+4C saved gates); backward reads 8C, writes 9C
    record(provider, fn, gbytes=B * C * H * W * args[0].element_size() * (9 + 2 + 4 + 8 + 9) / 1e9)
