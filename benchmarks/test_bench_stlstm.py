"""ST-LSTM step (PredRNN cell): reference eager, reference under torch.compile, and the fused path.

Groups: one cell step forward / forward+backward, the pointwise part alone (both fused stages on given
convolution outputs), and a 10-step unrolled training step (its peak_mb is the memory target).
Providers: eager, compile (the reference under torch.compile), cpp (fused kernels + merged convolutions),
cpp_sep (fused kernels, the reference's separate convolutions).
With --benchmark-disable the shapes shrink so that the suite only checks that everything runs.
A "-saturated" pointwise case scales the convolution outputs by 100: saturated gates, whose exp(-|x|) inside
sigmoid and tanh is denormal or underflows (the kernels flush denormals, csrc/cpu/denormals.h).
"""
import importlib

import pytest
import torch

from vpfast.bench import backend_of, op_step, providers
from vpfast.nn import SpatioTemporalLSTMCell

S = importlib.import_module("vpfast.ops.stlstm")
SHAPES = {"C64": (16, 64, 16, 16, 5), "C128": (16, 128, 16, 16, 5)}  # B, C, H, W, k (Cin = C)
TINY = (2, 8, 6, 6, 3)


def _providers(with_sep=True):
    # eager, compile, then each fused backend (and its separate-convolutions variant "<backend>_sep")
    return providers(S.GATES, sep=with_sep)


def _shape(request, name):
    name = name.split("-")[0]  # "C64-saturated": the C64 shape with other inputs
    if request.config.getoption("benchmark_disable"):
        if name != "C64":
            pytest.skip("--benchmark-disable: one tiny shape stands for all")
        return TINY
    return SHAPES[name]


def _cell_gflop(B, C, H, W, k, train):
    macs = B * H * W * (k * k * (C * 7 * C + C * 4 * C + C * 3 * C + 2 * C * C) + 2 * C * C)
    return 2 * macs * (3 if train else 1) / 1e9


def _cell(provider, B, C, H, W, k, record):
    torch.manual_seed(0)
    backend = backend_of(provider)
    cell = SpatioTemporalLSTMCell(C, C, H, W, k, 1, False, backend=backend,
                                  merge_convs=backend != "torch" and not provider.endswith("_sep"))
    cell = cell.to(record.device, record.dtype)
    if provider == "compile":
        return cell, torch.compile(cell._forward_reference)
    return cell, lambda x, h, c, m, hw: cell(x, h, c, m)


def _states(B, C, H, W, grad, record):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(B, C, H, W, generator=g) * 0.5 for _ in range(4)]
    return [record.to(t, grad) for t in ts]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", _providers())
def test_cell_step(benchmark, record, request, provider, shape, mode):
    B, C, H, W, k = _shape(request, shape)
    benchmark.group = f"stlstm cell step {shape} B{B} C{C} {H}x{W} k{k} {mode}"
    cell, step = _cell(provider, B, C, H, W, k, record)
    train = mode == "fwdbwd"
    x, h, c, m = _states(B, C, H, W, train, record)

    def fn():
        if not train:
            with torch.no_grad():
                return step(x, h, c, m, None)
        hn, cn, mn = step(x, h, c, m, None)
        (hn.sum() + cn.sum() + mn.sum()).backward()

    record(provider, fn, gflops=_cell_gflop(B, C, H, W, k, train))


def _pointwise_inputs(B, C, H, W, grad, record, sc=1.0):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: record.to(torch.randn(*s, generator=g) * sc, grad)  # noqa: E731
    return r(B, 7 * C, H, W), r(B, 4 * C, H, W), r(B, 3 * C, H, W), r(B, C, H, W), r(B, C, H, W), \
        r(B, C, H, W), r(B, C, H, W)


def _pointwise_ref(x_g, h_g, m_g, c, m, o_m, last):
    cm, o_part, _ = S.stlstm_gates_reference(x_g, h_g, m_g, c, m, 1.0, False)
    return cm, S.stlstm_output_reference(o_part, o_m, last)


_pointwise_compiled = torch.compile(_pointwise_ref)


def _pointwise_cpp(x_g, h_g, m_g, c, m, o_m, last):
    cm, o_part, _ = S._gates_compiled(x_g, h_g, m_g, c, m, 1.0, False)
    return cm, S._output_compiled(o_part, o_m, last)


def _pointwise_backend(x_g, h_g, m_g, c, m, o_m, last, backend):
    cm, o_part, _ = S.stlstm_gates(x_g, h_g, m_g, c, m, 1.0, False, backend=backend)
    return cm, S.stlstm_output(o_part, o_m, last, backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES) + ["C64-saturated"])
@pytest.mark.parametrize("provider", _providers(with_sep=False))
def test_pointwise(benchmark, record, request, provider, shape, mode):
    """Both fused stages on the separate-convolution layout (conv_x, conv_h, conv_m outputs given)."""
    B, C, H, W, _ = _shape(request, shape)
    benchmark.group = f"stlstm pointwise {shape} B{B} C{C} {H}x{W} {mode}"
    fn_ = {"eager": _pointwise_ref, "compile": _pointwise_compiled, "cpp": _pointwise_cpp}.get(
        provider, lambda *a: _pointwise_backend(*a, backend=provider))
    train = mode == "fwdbwd"
    args = _pointwise_inputs(B, C, H, W, train, record, 100.0 if shape.endswith("-saturated") else 1.0)
    n = B * C * H * W * args[0].element_size() / 1e9  # GB per [B, C, H, W] tensor
    # minimum traffic: forward reads 7C+4C+3C+2C, writes 2C+C (+4C saved gates +C saved o for training);
    # stage 2 reads 3C, writes C; backward reads ~11C (incoming gradients 3C, gates 4C, c_t, m_t and their
    # predecessors 4C) and writes ~16C
    gbytes = n * ((16 + 3 + 3 + 1) + ((4 + 1) + 27 if train else 0))

    record(provider, op_step(fn_, args, train), gbytes=gbytes)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", _providers())
def test_unroll10_train(benchmark, record, request, provider, shape):
    """A 10-step unrolled training step of one cell (its peak_mb is the memory target)."""
    B, C, H, W, k = _shape(request, shape)
    benchmark.group = f"stlstm 10-step unroll {shape} B{B} C{C} {H}x{W} k{k} fwdbwd"
    cell, step = _cell(provider, B, C, H, W, k, record)
    xs = record.to(torch.randn(10, B, C, H, W, generator=torch.Generator().manual_seed(3)))

    def fn():
        h = c = m = xs.new_zeros(B, C, H, W)
        loss = 0
        with cell.unroll():
            for t in range(10):
                h, c, m = step(xs[t], h, c, m, None)
                loss = loss + h.square().mean()
        loss.backward()

    record(provider, fn, gflops=10 * _cell_gflop(B, C, H, W, k, True))
