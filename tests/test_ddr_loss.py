import pytest
import torch

import vpfast
from vpfast.ops import ddr_loss, ddr_loss_reference
from vpfast.ops.ddr_loss import OP
from vpfast.testing import assert_close_bounded, backend_params, non_contiguous, tolerances

BACKENDS = backend_params("ddr_loss")
SHAPES = [
    (2, 3, 1, 8, 8),  # T = 3: a single pair of differences... two rows
    (1, 10, 1, 64, 64),  # Moving-MNIST frame, batch 1
    (3, 4, 3, 5, 7),  # C > 1, non-square, D = 105 not a multiple of the vector width
    (2, 5, 2, 17, 3),
    (2, 4, 3, 23, 29),  # D = 2001: the CPU backward's chunks of 1024 elements, the last one partial
]


def _inputs(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    target = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    return pred, target


def _loss_and_grads(fn, pred, target, dtype=None):
    p = pred.detach().to(dtype or pred.dtype).requires_grad_()
    y = target.detach().to(dtype or target.dtype).requires_grad_()
    out = fn(p, y)
    return (out, *torch.autograd.grad(out, (p, y)))


def _compare(backend, pred, target, dtype, tau=0.1):
    got = _loss_and_grads(lambda p, y: ddr_loss(p, y, tau=tau, backend=backend), pred, target)
    ref = _loss_and_grads(lambda p, y: ddr_loss_reference(p, y, tau=tau), pred, target)
    if dtype == torch.float64:
        for a, b in zip(got, ref):
            # gradients are O(1/(N tau)); compare relative to their own scale
            scale = b.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(a / scale, b / scale, **tolerances(dtype))
    else:
        ref64 = _loss_and_grads(lambda p, y: ddr_loss_reference(p, y, tau=tau), pred, target, torch.float64)
        for name, a, b, c in zip(("loss", "grad_pred", "grad_target"), got, ref, ref64):
            assert_close_bounded(a, b, c, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    if backend == "triton" and shape[1] * shape[2] * shape[3] * shape[4] > 4096:
        pytest.skip("the Triton interpreter is slow; small shapes only")
    _compare(backend, *_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    pred, target = _inputs((2, 4, 3, 6, 5), torch.float64)
    pred_nc = non_contiguous(pred.detach()).requires_grad_()
    target_nc = non_contiguous(target.detach()).requires_grad_()
    assert not pred_nc.is_contiguous()
    _compare(backend, pred_nc, target_nc, torch.float64)
    # a transposed (batch, time) view is another common non-contiguous layout
    pt = pred.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    _compare(backend, pt, target, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_values_are_stable(backend, dtype):
    # |x / tau| in the thousands: a naive exp overflows; softmax must not
    pred, target = _inputs((2, 3, 1, 6, 6), dtype, scale=300.0)
    out = ddr_loss(pred, target, backend=backend)
    assert torch.isfinite(out)
    (gp,) = torch.autograd.grad(out, (pred,))
    assert torch.isfinite(gp).all()
    _compare(backend, pred, target, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    # the Triton interpreter costs ~0.1 s per launch: a smaller problem and fast mode keep it to seconds
    fast = backend == "triton"
    pred, target = _inputs((1, 3, 1, 2, 3) if fast else (2, 4, 2, 3, 5), torch.float64)
    torch.autograd.gradcheck(lambda p, y: ddr_loss(p, y, backend=backend), (pred, target), fast_mode=fast)
    torch.autograd.gradcheck(lambda p: ddr_loss(p, target.detach(), tau=0.5, backend=backend), (pred,),
                             fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_without_grad(backend):
    pred, target = _inputs((2, 4, 1, 5, 5), torch.float64)
    out = ddr_loss(pred, target.detach(), backend=backend)
    (gp,) = torch.autograd.grad(out, (pred,))
    (gr,) = torch.autograd.grad(ddr_loss_reference(pred, target.detach()), (pred,))
    torch.testing.assert_close(gp, gr)


@pytest.mark.parametrize("backend", BACKENDS + backend_params("ddr_loss", include_torch=True)[:1])
@pytest.mark.parametrize("T", [1, 2])
def test_short_sequences_give_zero(backend, T):
    pred, target = _inputs((2, T, 1, 4, 4), torch.float32)
    out = ddr_loss(pred, target, backend=backend)
    assert out.item() == 0.0
    (gp,) = torch.autograd.grad(out, (pred,))
    assert (gp == 0).all()


def test_opcheck_compiled():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    pred, target = _inputs((2, 4, 2, 3, 5), torch.float64)
    torch.library.opcheck(torch.ops.vpfast.ddr_loss_forward.default, (pred, target, 0.1, 1e-12))
    stats = torch.ops.vpfast.ddr_loss_forward(pred, target, 0.1, 1e-12)[1]
    g = torch.tensor(1.0, dtype=torch.float64)
    for need in (False, True):
        torch.library.opcheck(torch.ops.vpfast.ddr_loss_backward.default,
                              (g, pred.detach(), target.detach(), stats, 0.1, 1e-12, need))


def test_compiled_backward_rejects_short_sequences_and_bad_stats():
    """Called directly, the compiled backward refuses what the forward refuses (T < 3, where the reference's
    loss is 0; T = 1 would have no rows at all) and statistics of the wrong size, instead of reading past them."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    g = torch.tensor(1.0, dtype=torch.float64)
    pred, target = _inputs((2, 2, 1, 3, 4), torch.float64)
    with pytest.raises(RuntimeError, match="T >= 3"):
        torch.ops.vpfast.ddr_loss_backward(g, pred.detach(), target.detach(), pred.new_zeros((2, 1, 6)), 0.1,
                                           1e-12, False)
    pred, target = _inputs((2, 4, 1, 3, 4), torch.float64)
    with pytest.raises(RuntimeError, match="stats has the wrong size"):
        torch.ops.vpfast.ddr_loss_backward(g, pred.detach(), target.detach(), pred.new_zeros((2, 2, 6)), 0.1,
                                           1e-12, False)


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    pred, target = _inputs((2, 3, 1, 3, 4), torch.float32)
    torch.library.opcheck(torch.ops.vpfast.ddr_loss_forward_triton.default, (pred, target, 0.1, 1e-12))


def test_torch_compile_fullgraph():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    pred, target = _inputs((2, 4, 1, 8, 8), torch.float32)
    fn = torch.compile(lambda p, y: ddr_loss(p, y, backend="cpp"), fullgraph=True, backend="aot_eager")
    out = fn(pred, target)
    torch.testing.assert_close(out, ddr_loss_reference(pred, target), **tolerances(torch.float32))
    out.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_nan_propagates():
    pred, target = _inputs((1, 3, 1, 4, 4), torch.float32)
    pred = pred.detach().clone()
    pred[0, 1, 0, 2, 2] = float("nan")
    for backend in [b.values[0] for b in BACKENDS if not b.marks or b.values[0] == "cpp"]:
        if OP.static_reasons(backend):
            continue
        assert torch.isnan(ddr_loss(pred, target, backend=backend))


def test_module():
    pred, target = _inputs((2, 4, 1, 6, 6), torch.float32)
    mod = vpfast.nn.DDRLoss(tau=0.2)
    torch.testing.assert_close(mod(pred, target), ddr_loss_reference(pred, target, tau=0.2),
                               **tolerances(torch.float32))
    assert "tau=0.2" in repr(mod)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda p, y: (p[0], y[0]), ValueError, "pred must have 5 dimensions"),
        (lambda p, y: (p, y[:, :3]), ValueError, "same shape"),
        (lambda p, y: (p, y.double()), TypeError, "same dtype"),
        (lambda p, y: (p.long(), y.long()), TypeError, "pred must be a floating-point"),
        (lambda p, y: (p, y.to("meta")), ValueError, "same device"),
        (lambda p, y: (p.numpy(), y), TypeError, "pred must be a torch.Tensor"),
    ],
)
def test_bad_input(make, err, match):
    pred, target = (t.detach() for t in _inputs((2, 4, 1, 5, 5), torch.float32))
    with pytest.raises(err, match=match):
        ddr_loss(*make(pred, target))


@pytest.mark.parametrize("tau", [0, -0.1, float("nan")])
def test_bad_tau(tau):
    pred, target = _inputs((2, 4, 1, 5, 5), torch.float32)
    with pytest.raises(ValueError, match="tau must be a positive number"):
        ddr_loss(pred, target, tau=tau)


def test_named_backend_that_cannot_run_lists_reasons():
    pred, target = _inputs((2, 4, 1, 5, 5), torch.float32)
    with pytest.raises(vpfast.BackendUnavailable, match="backend 'cuda' cannot run") as info:
        ddr_loss(pred, target, backend="cuda")
    assert "cuda" in str(info.value)
    with pytest.raises(ValueError, match="backend must be one of"):
        ddr_loss(pred, target, backend="fortran")
