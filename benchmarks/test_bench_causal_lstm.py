"""Causal LSTM step (PredRNN++'s cell): reference eager, reference under torch.compile, and the fused path.

Groups: the pointwise part alone (the three fused stages on given convolution outputs, separate-convolution
layout), one cell step forward / forward+backward, and a 10-step unrolled training step of PredRNN++'s first
two layers (cell, GHU, cell; its peak_mb is the memory target).
Providers: eager, compile (the reference under torch.compile), cpp (fused kernels + merged convolutions),
cpp_sep (fused kernels, the reference's separate convolutions), and the GPU backends likewise.
Shapes: the `small` preset (C=16, k=3) at B=4 and the Moving-MNIST one (C=128, k=5) at B=16, 16x16 patches.
With --benchmark-disable the shapes shrink so that the suite only checks that everything runs.
"""
import importlib

import pytest
import torch

from vpfast.bench import backend_of, op_step, providers
from vpfast.nn import GHU, CausalLSTMCell

S = importlib.import_module("vpfast.ops.causal_lstm")
SHAPES = {"small": (4, 16, 16, 16, 3), "mmnist": (16, 128, 16, 16, 5)}  # B, C, H, W, k (Cin = C)
TINY = (2, 8, 6, 6, 3)


def _shape(request, name):
    if request.config.getoption("benchmark_disable"):
        if name != "small":
            pytest.skip("--benchmark-disable: one tiny shape stands for all")
        return TINY
    return SHAPES[name]


def _cell_gflop(B, C, H, W, k, train):
    macs = B * H * W * (k * k * (7 * C * C + 4 * C * C + 3 * C * C + 3 * C * C + 4 * C * C + C * C) + 2 * C * C)
    return 2 * macs * (3 if train else 1) / 1e9


def _modules(provider, C, H, W, k, record, ghu=False):
    torch.manual_seed(0)
    backend = backend_of(provider)
    merge = backend != "torch" and not provider.endswith("_sep")
    mods = [CausalLSTMCell(C, C, H, W, k, 1, False, backend=backend, merge_convs=merge)]
    if ghu:
        mods += [GHU(C, C, H, W, k, 1, False, backend=backend, merge_convs=merge),
                 CausalLSTMCell(C, C, H, W, k, 1, False, backend=backend, merge_convs=merge)]
    return [m.to(record.device, record.dtype) for m in mods]


def _step(provider, cell):
    return torch.compile(cell._forward_reference) if provider == "compile" else cell


def _states(B, C, H, W, grad, record):
    g = torch.Generator().manual_seed(1)
    return [record.to(torch.randn(B, C, H, W, generator=g) * 0.5, grad) for _ in range(4)]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", providers(S.CELL, sep=True))
def test_cell_step(benchmark, record, request, provider, shape, mode):
    B, C, H, W, k = _shape(request, shape)
    benchmark.group = f"causal_lstm cell step {shape} B{B} C{C} {H}x{W} k{k} {mode}"
    step = _step(provider, _modules(provider, C, H, W, k, record)[0])
    train = mode == "fwdbwd"
    x, h, c, m = _states(B, C, H, W, train, record)

    def fn():
        if not train:
            with torch.no_grad():
                return step(x, h, c, m)
        hn, cn, mn = step(x, h, c, m)
        (hn.sum() + cn.sum() + mn.sum()).backward()

    record(provider, fn, gflops=_cell_gflop(B, C, H, W, k, train))


def _pointwise_ref(x_g, h_g, c_g, c, m_g, c2m_g, o_m, last):
    c_new, carry = S.causal_lstm_cell_reference(x_g, h_g, c_g, c)
    m_new, o_part = S.causal_lstm_memory_reference(carry, m_g, c2m_g)
    return c_new, m_new, S.causal_lstm_output_reference(o_part, o_m, last)


_pointwise_compiled = torch.compile(_pointwise_ref)


def _pointwise_backend(x_g, h_g, c_g, c, m_g, c2m_g, o_m, last, backend):
    c_new, carry = S.causal_lstm_cell(x_g, h_g, c_g, c, backend=backend)
    m_new, o_part = S.causal_lstm_memory(carry, m_g, c2m_g, backend=backend)
    return c_new, m_new, S.causal_lstm_output(o_part, o_m, last, backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", providers(S.CELL))
def test_pointwise(benchmark, record, request, provider, shape, mode):
    """The three fused stages on the separate-convolution layout (conv_x, conv_h, conv_c, conv_m, conv_c2m,
    conv_om and conv_last outputs given)."""
    B, C, H, W, _ = _shape(request, shape)
    benchmark.group = f"causal_lstm pointwise {shape} B{B} C{C} {H}x{W} {mode}"
    fn_ = {"eager": _pointwise_ref, "compile": _pointwise_compiled}.get(
        provider, lambda *a: _pointwise_backend(*a, backend=provider))
    train = mode == "fwdbwd"
    g = torch.Generator().manual_seed(2)
    args = [record.to(torch.randn(B, n * C, H, W, generator=g), train) for n in (7, 4, 3, 1, 3, 4, 1, 1)]
    n = B * C * H * W * args[0].element_size() / 1e9  # GB per [B, C, H, W] tensor
    # minimum traffic: forward reads 7C+4C+3C+C, 4C carry, 3C+4C, 3C: 29C, writes C+4C+2C (+2C saved), 2C+C (+3C
    # saved), 3C: 18C; backward reads about 14C and writes 22C (7C+4C+3C+C, 4C, 3C+4C less the carry reuse)
    gbytes = n * (29 + 13 + ((5 + 14 + 22) if train else 0))

    record(provider, op_step(fn_, args, train), gbytes=gbytes)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", providers(S.CELL, sep=True))
def test_unroll10_train(benchmark, record, request, provider, shape):
    """A 10-step unrolled training step of PredRNN++'s first two layers (its peak_mb is the memory target)."""
    B, C, H, W, k = _shape(request, shape)
    benchmark.group = f"causal_lstm 10-step unroll {shape} B{B} C{C} {H}x{W} k{k} fwdbwd"
    cell0, ghu, cell1 = _modules(provider, C, H, W, k, record, ghu=True)
    steps = (_step(provider, cell0), ghu, _step(provider, cell1))
    xs = record.to(torch.randn(10, B, C, H, W, generator=torch.Generator().manual_seed(3)))

    def fn():
        h0 = c0 = h1 = c1 = m = z = xs.new_zeros(B, C, H, W)
        loss = 0
        with cell0.unroll(), ghu.unroll(), cell1.unroll():
            for t in range(10):
                h0, c0, m = steps[0](xs[t], h0, c0, m)
                z = steps[1](h0, z)
                h1, c1, m = steps[2](z, h1, c1, m)
                loss = loss + h1.square().mean()
        loss.backward()

    record(provider, fn, gflops=10 * 2 * _cell_gflop(B, C, H, W, k, True))
