import pytest
import torch

from vpfast.ops import deform_warp, deform_warp_reference
from vpfast.ops.deform_warp import OP
from vpfast.testing import assert_close_bounded, backend_params, non_contiguous, tolerances

BACKENDS = backend_params("deform_warp")
NAMES = ("out", "grad_x", "grad_offset", "grad_mask", "grad_weight")


def _inputs(B, C, H, W, O, k, scale, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    off = torch.randn(B, 2 * k * k, H, W, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, k * k, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C, k, k, generator=g, dtype=torch.float64) / (C * k)
    return [t.to(dtype).requires_grad_() for t in (x, off, mask, w)]


def _run(fn, inputs, dtype=None, seed=1):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, ins, g))


def _compare(backend, inputs, dtype):
    got = _run(lambda *a: deform_warp(*a, backend=backend), inputs)
    ref = _run(deform_warp_reference, inputs)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, **tolerances(dtype), msg=name)
    else:
        ref64 = _run(deform_warp_reference, inputs, torch.float64)
        for name, a, b, c in zip(NAMES, got, ref, ref64):
            assert_close_bounded(a, b, c, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0, 10.0])
def test_matches_reference(backend, dtype, k, scale):
    if backend == "triton" and (scale, dtype) not in ((0.0, torch.float64), (3.0, torch.float64), (10.0, torch.float32)):
        pytest.skip("the Triton interpreter is slow: a subset of the cases")
    # batch 1 and a non-square map whose sizes are not multiples of the vector width
    shape = (1, 3, 5, 7, 4) if backend == "triton" else (2, 5, 9, 13, 6)
    _compare(backend, _inputs(*shape, k, scale, dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_motionrnn_shape(backend):
    shape = (1, 8, 6, 6, 8) if backend == "triton" else (4, 16, 16, 16, 16)
    _compare(backend, _inputs(*shape, 3, 1.5, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + backend_params("deform_warp", include_torch=True)[:1])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_torchvision(backend, k):
    tv = pytest.importorskip("torchvision")
    N = k * k

    def peer(x, off, mask, w):
        B, _, H, W = off.shape
        inter = torch.stack([off[:, :N], off[:, N:]], dim=2).reshape(B, 2 * N, H, W)  # (dy_n, dx_n) pairs
        return tv.ops.deform_conv2d(x, inter, w, padding=k // 2, mask=mask)

    # away from integer positions (the one-sided derivative conventions differ on the line y = -1)
    inputs = _inputs(1 if backend == "triton" else 2, 3, 6, 7, 4, k, 2.3)
    got = _run(lambda *a: deform_warp(*a, backend=backend), inputs)
    ref = _run(peer, inputs)
    for name, a, b in zip(NAMES, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    inputs = _inputs(2, 3, 5, 6, 4, 3, 1.3)
    nc = [non_contiguous(t.detach()).requires_grad_() for t in inputs]
    assert not any(t.is_contiguous() for t in nc)
    _compare(backend, nc, torch.float64)
    if backend == "triton":
        return
    # channels-last input
    x = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _compare(backend, [x] + inputs[1:], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck(backend, k):
    # offsets 0.25 + n/2 + small noise: no sample position is near an integer (the derivative's kinks)
    x, off, mask, w = _inputs(1, 2, 3, 4, 2, k, 0.02)
    off = (off.detach() + 0.25 + 0.5 * torch.randint(-4, 4, off.shape, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda *a: deform_warp(*a, backend=backend), (x, off, mask, w),
                             fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend):
    if backend == "triton":
        pytest.skip("the Triton backward always computes every gradient")
    x, off, mask, w = _inputs(2, 3, 5, 6, 4, 3, 1.3)
    ref = _run(deform_warp_reference, (x, off, mask, w))
    for i in range(4):
        ins = [t.detach().requires_grad_(j == i) for j, t in enumerate((x, off, mask, w))]
        out = deform_warp(*ins, backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (gi,) = torch.autograd.grad(out, ins[i], g)
        torch.testing.assert_close(gi, ref[i + 1], **tolerances(torch.float64))


def test_backward_is_deterministic():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, off, mask, w = (t.detach() for t in _inputs(3, 8, 12, 10, 8, 3, 2.0, torch.float32))
    g = torch.randn(3, 8, 12, 10)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            outs.append(torch.ops.vpfast.deform_warp_backward(g, x, off, mask, w, [True] * 4))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    for a, b in zip(outs[0], outs[2]):
        assert torch.equal(a, b)


def test_opcheck_compiled():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, off, mask, w = _inputs(2, 3, 4, 5, 2, 3, 1.3)
    torch.library.opcheck(torch.ops.vpfast.deform_warp_forward.default, (x, off, mask, w))
    g = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    for needs in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(torch.ops.vpfast.deform_warp_backward.default,
                              (g, x.detach(), off.detach(), mask.detach(), w.detach(), needs))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    x, off, mask, w = _inputs(1, 2, 3, 4, 2, 3, 1.3, torch.float32)
    torch.library.opcheck(torch.ops.vpfast.deform_warp_forward_triton.default, (x, off, mask, w))


def test_torch_compile_fullgraph():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, off, mask, w = _inputs(2, 3, 5, 6, 4, 3, 1.3, torch.float32)
    fn = torch.compile(lambda *a: deform_warp(*a, backend="cpp"), fullgraph=True, backend="aot_eager")
    out = fn(x, off, mask, w)
    torch.testing.assert_close(out, deform_warp_reference(x, off, mask, w), **tolerances(torch.float32))
    out.sum().backward()
    assert all(t.grad is not None for t in (x, off, mask, w))


def test_empty_batch():
    x, off, mask, w = (t.detach()[:0] if i < 3 else t.detach()
                       for i, t in enumerate(_inputs(2, 3, 5, 6, 4, 3, 1.0)))
    for backend in ("torch", "cpp"):
        if OP.static_reasons(backend):
            continue
        assert deform_warp(x, off, mask, w, backend=backend).shape == (0, 4, 5, 6)


def _bad(B=2, C=3, H=5, W=6, O=4, k=3):
    return [t.detach() for t in _inputs(B, C, H, W, O, k, 1.0, torch.float32)]


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda x, o, m, w: (x, o[:, :9], m, w), ValueError, r"offset must be \[B, 2k², H, W\]"),
        (lambda x, o, m, w: (x, o, m[:, :4], w), ValueError, r"mask must be \[B, k², H, W\]"),
        (lambda x, o, m, w: (x, o, m, w[:, :, :2, :2]), ValueError, "odd k"),
        (lambda x, o, m, w: (x, o, m, w[:, :2]), ValueError, "input channels"),
        (lambda x, o, m, w: (x, o[:, :, :4], m, w), ValueError, "offset must be"),
        (lambda x, o, m, w: (x[0], o, m, w), ValueError, "x must have 4 dimensions"),
        (lambda x, o, m, w: (x, o.double(), m, w), TypeError, "same dtype"),
        (lambda x, o, m, w: (x, o, m.to("meta"), w), ValueError, "same device"),
        (lambda x, o, m, w: (x.long(), o, m, w), TypeError, "x must be a floating-point"),
        (lambda x, o, m, w: (x, o.numpy(), m, w), TypeError, "offset must be a torch.Tensor"),
    ],
)
def test_bad_input(make, err, match):
    with pytest.raises(err, match=match):
        deform_warp(*make(*_bad()))
