import pytest
import torch

from vpfast.ops import flow_warp, flow_warp_reference
from vpfast.ops.flow_warp import OP
from vpfast.testing import assert_close_bounded, backend_params, non_contiguous, tolerances

BACKENDS = backend_params("flow_warp")
NAMES = ("out", "grad_x", "grad_flow")
MODES = [("zeros", True), ("zeros", False), ("border", True), ("border", False)]


def _inputs(B, C, H, W, scale, dtype=torch.float64, seed=0, off_integer=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    flow = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * scale
    if off_integer:  # keep positions clear of integers, where the reference's grid rounding picks a side
        flow = flow.round() + 0.1 + 0.8 * torch.rand(flow.shape, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, flow)]


def _run(fn, inputs, dtype=None):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, ins, g))


def _compare(backend, inputs, mode, dtype):
    got = _run(lambda x, f: flow_warp(x, f, *mode, backend=backend), inputs)
    ref = _run(lambda x, f: flow_warp_reference(x, f, *mode), inputs)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, **tolerances(dtype), msg=name)
    else:
        ref64 = _run(lambda x, f: flow_warp_reference(x, f, *mode), inputs, torch.float64)
        for name, a, b, c in zip(NAMES, got, ref, ref64):
            assert_close_bounded(a, b, c, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_matches_grid_sample(backend, dtype, mode, scale):
    if backend == "triton" and (scale, dtype) not in ((3.0, torch.float64), (0.5, torch.float32)):
        pytest.skip("the Triton interpreter is slow: a subset of the cases")
    shape = (1, 3, 5, 7) if backend == "triton" else (2, 5, 9, 13)
    _compare(backend, _inputs(*shape, scale, dtype), mode, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_zero_flow_is_identity(backend, mode):
    x, flow = _inputs(2, 3, 6, 5, 0.0, off_integer=False)
    out = flow_warp(x, flow, *mode, backend=backend)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(out, flow_warp_reference(x, flow, *mode), **tolerances(torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_size_one_maps(backend, mode):
    for shape in ((1, 2, 1, 5), (2, 2, 4, 1)):
        _compare(backend, _inputs(*shape, 1.0), mode, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    x, flow = _inputs(2, 3, 5, 6, 2.0)
    nc = [non_contiguous(t.detach()).requires_grad_() for t in (x, flow)]
    _compare(backend, nc, ("zeros", True), torch.float64)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _compare(backend, [x_cl, flow], ("border", True), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_gradcheck(backend, mode):
    x, flow = _inputs(1, 2, 4, 5, 2.0)
    torch.autograd.gradcheck(lambda a, f: flow_warp(a, f, *mode, backend=backend), (x, flow),
                             fast_mode=backend == "triton")


def test_backward_is_deterministic():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, flow = (t.detach() for t in _inputs(3, 8, 20, 17, 3.0, torch.float32))
    g = torch.randn(3, 8, 20, 17)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (threads, 1):
            torch.set_num_threads(n)
            outs.append(torch.ops.vpfast.flow_warp_backward(g, x, flow, False, True, True, True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_opcheck_compiled():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, flow = _inputs(2, 3, 4, 5, 2.0)
    for border in (False, True):
        torch.library.opcheck(torch.ops.vpfast.flow_warp_forward.default, (x, flow, border, True))
        g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        for nx, nf in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.vpfast.flow_warp_backward.default,
                                  (g, x.detach(), flow.detach(), border, True, nx, nf))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    x, flow = _inputs(1, 2, 3, 4, 2.0, torch.float32)
    torch.library.opcheck(torch.ops.vpfast.flow_warp_forward_triton.default, (x, flow, False, True))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda x, f: (x, f[:, :1]), ValueError, r"flow must be \[B, 2, H, W\]"),
        (lambda x, f: (x, f[:, :, :3]), ValueError, r"flow must be \[B, 2, H, W\]"),
        (lambda x, f: (x, f.double()), TypeError, "same dtype"),
        (lambda x, f: (x[0], f), ValueError, "x must have 4 dimensions"),
        (lambda x, f: (x, f.to("meta")), ValueError, "same device"),
    ],
)
def test_bad_input(make, err, match):
    x, flow = (t.detach() for t in _inputs(2, 3, 5, 6, 1.0, torch.float32))
    with pytest.raises(err, match=match):
        flow_warp(*make(x, flow))


def test_bad_options():
    x, flow = (t.detach() for t in _inputs(2, 3, 5, 6, 1.0, torch.float32))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        flow_warp(x, flow, padding_mode="reflection")
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        flow_warp(x, flow, align_corners=1)
