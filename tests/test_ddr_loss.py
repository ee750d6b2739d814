import pytest
import torch

import vpfast
from vpfast.ops import ddr_loss, ddr_loss_reference
from vpfast.ops.ddr_loss import OP, stat_dtype
from vpfast.testing import (assert_close_bounded, assert_keeps_fp_state, backend_params, device_for,
                            low_precision_params, non_contiguous, tolerances)

BACKENDS = backend_params("ddr_loss")
LOW = low_precision_params("ddr_loss")
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
GPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("cuda", "triton")]


def _interpreted(backend):
    """True where `backend` runs on the CPU through the Triton interpreter (slow: small shapes only)."""
    return backend == "triton" and device_for(backend) == "cpu"
SHAPES = [
    (2, 3, 1, 8, 8),  # T = 3: a single pair of differences... two rows
    (1, 10, 1, 64, 64),  # Moving-MNIST frame, batch 1
    (3, 4, 3, 5, 7),  # C > 1, non-square, D = 105 not a multiple of the vector width
    (2, 5, 2, 17, 3),
    (2, 4, 3, 23, 29),  # D = 2001: the CPU backward's chunks of 1024 elements, the last one partial
]


def _inputs(shape, dtype, scale=1.0, seed=0, device="cpu"):
    """(pred, target), both requiring grad, drawn on the CPU with a seeded generator, then moved to `device`"""
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
    target = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
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
    if _interpreted(backend) and shape[1] * shape[2] * shape[3] * shape[4] > 4096:
        pytest.skip("the Triton interpreter is slow; small shapes only")
    _compare(backend, *_inputs(shape, dtype, device=device_for(backend)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.3, 0.07])
def test_tau_not_float32(backend, tau):
    # 1/tau and the gradient scale not representable in float32: a float64 kernel must not see them rounded (a
    # compiled Triton kernel receives Python floats as float32; the interpreter does not show it)
    _compare(backend, *_inputs((2, 4, 3, 5, 7), torch.float64, device=device_for(backend)), torch.float64, tau=tau)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    pred, target = _inputs((2, 4, 3, 6, 5), torch.float64, device=device_for(backend))
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
    pred, target = _inputs((2, 3, 1, 6, 6), dtype, scale=300.0, device=device_for(backend))
    out = ddr_loss(pred, target, backend=backend)
    assert torch.isfinite(out)
    (gp,) = torch.autograd.grad(out, (pred,))
    assert torch.isfinite(gp).all()
    _compare(backend, pred, target, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    # the Triton interpreter costs ~0.1 s per launch: a smaller problem and fast mode keep it to seconds
    fast = _interpreted(backend)
    pred, target = _inputs((1, 3, 1, 2, 3) if fast else (2, 4, 2, 3, 5), torch.float64, device=device_for(backend))
    torch.autograd.gradcheck(lambda p, y: ddr_loss(p, y, backend=backend), (pred, target), fast_mode=fast)
    torch.autograd.gradcheck(lambda p: ddr_loss(p, target.detach(), tau=0.5, backend=backend), (pred,),
                             fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_without_grad(backend):
    pred, target = _inputs((2, 4, 1, 5, 5), torch.float64, device=device_for(backend))
    out = ddr_loss(pred, target.detach(), backend=backend)
    (gp,) = torch.autograd.grad(out, (pred,))
    (gr,) = torch.autograd.grad(ddr_loss_reference(pred, target.detach()), (pred,))
    torch.testing.assert_close(gp, gr)


@pytest.mark.parametrize("backend", BACKENDS + backend_params("ddr_loss", include_torch=True)[:1])
@pytest.mark.parametrize("T", [1, 2])
def test_short_sequences_give_zero(backend, T):
    pred, target = _inputs((2, T, 1, 4, 4), torch.float32, device=device_for(backend))
    out = ddr_loss(pred, target, backend=backend)
    assert out.item() == 0.0
    (gp,) = torch.autograd.grad(out, (pred,))
    assert (gp == 0).all()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpp", "cuda")])
def test_opcheck_compiled(backend):
    pred, target = _inputs((2, 4, 2, 3, 5), torch.float64, device=device_for(backend))
    torch.library.opcheck(torch.ops.vpfast.ddr_loss_forward.default, (pred, target, 0.1, 1e-12))
    stats = torch.ops.vpfast.ddr_loss_forward(pred, target, 0.1, 1e-12)[1]
    g = torch.tensor(1.0, dtype=torch.float64, device=pred.device)
    for need in (False, True):
        torch.library.opcheck(torch.ops.vpfast.ddr_loss_backward.default,
                              (g, pred.detach(), target.detach(), stats, 0.1, 1e-12, need))
        if backend == "cpp":  # the CPU-only fused forward+gradient (the cpp backend under autograd)
            torch.library.opcheck(torch.ops.vpfast.ddr_loss_forward_grad.default, (pred, target, 0.1, 1e-12, need))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpp", "cuda")])
def test_compiled_backward_rejects_short_sequences_and_bad_stats(backend):
    """Called directly, the compiled backward refuses what the forward refuses (T < 3, where the reference's
    loss is 0; T = 1 would have no rows at all) and statistics of the wrong size, instead of reading past them."""
    dev = device_for(backend)
    g = torch.tensor(1.0, dtype=torch.float64, device=dev)
    pred, target = _inputs((2, 2, 1, 3, 4), torch.float64, device=dev)
    with pytest.raises(RuntimeError, match="T >= 3"):
        torch.ops.vpfast.ddr_loss_backward(g, pred.detach(), target.detach(), pred.new_zeros((2, 1, 6)), 0.1,
                                           1e-12, False)
    pred, target = _inputs((2, 4, 1, 3, 4), torch.float64, device=dev)
    with pytest.raises(RuntimeError, match="stats has the wrong size"):
        torch.ops.vpfast.ddr_loss_backward(g, pred.detach(), target.detach(), pred.new_zeros((2, 2, 6)), 0.1,
                                           1e-12, False)


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    pred, target = _inputs((2, 3, 1, 3, 4), torch.float32, device=device_for("triton"))
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
    for backend in [b.values[0] for b in BACKENDS if not b.marks or b.values[0] == "cpp"]:
        if OP.static_reasons(backend):
            continue
        pred, target = _inputs((1, 3, 1, 4, 4), torch.float32, device=device_for(backend))
        pred = pred.detach().clone()
        pred[0, 1, 0, 2, 2] = float("nan")
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 1, 5, 5), (2, 4, 0, 5, 5)])
def test_empty_input_is_refused_by_every_backend(backend, shape):
    # a mean over no elements: the cpp kernel returned nan, the reference raised a reshape error
    pred = torch.rand(shape, device=device_for(backend))
    with pytest.raises(ValueError, match="must not be empty"):
        ddr_loss(pred, pred.clone(), backend=backend)


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


# ---- mixed precision ---------------------------------------------------------------------------------------
def _low_precision_check(backend, dtype, shape, scale=1.0, seed=0):
    pred, target = _inputs(shape, torch.float64, scale=scale, seed=seed, device=device_for(backend))
    pred, target = (t.detach().to(dtype).double().requires_grad_() for t in (pred, target))  # rounded inputs
    got = _loss_and_grads(lambda p, y: ddr_loss(p, y, backend=backend), pred, target, dtype)
    if dtype == torch.float16:
        # the reference itself fails in float16: q underflows (and eps = 1e-12 is 0 there), so p / (q + eps)
        # is inf and the loss NaN. Bound by an ideal float16 result instead: float32 arithmetic on the same
        # inputs, rounded to float16.
        same = [t.to(dtype) for t in _loss_and_grads(ddr_loss_reference, pred, target, torch.float32)]
    else:
        same = _loss_and_grads(ddr_loss_reference, pred, target, dtype)
    ref64 = _loss_and_grads(ddr_loss_reference, pred, target, torch.float64)
    for name, a, r, r64 in zip(("loss", "grad_pred", "grad_target"), got, same, ref64):
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        assert_close_bounded(a, r, r64, name=name)


@pytest.mark.parametrize("backend, dtype", LOW)
@pytest.mark.parametrize("shape, scale", [((2, 4, 3, 5, 7), 1.0), ((2, 5, 1, 32, 32), 1.0), ((2, 3, 1, 8, 8), 30.0)],
                         ids=["odd", "mmnist-like", "large-logits"])
def test_low_precision(backend, dtype, shape, scale):
    _low_precision_check(backend, dtype, shape, scale)
    # the saved row statistics stay in float32 (a half row max would shift every p)
    pred, target = _inputs(shape, dtype, device=device_for(backend))
    fwd = torch.ops.vpfast.ddr_loss_forward_triton if backend == "triton" else torch.ops.vpfast.ddr_loss_forward
    loss, stats = fwd(pred.detach(), target.detach(), 0.1, 1e-12)
    assert loss.dtype == dtype and stats.dtype == torch.float32 == stat_dtype(dtype)


@pytest.mark.parametrize("backend", ["torch", "auto", "cpp"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16], ids=["f32-target", "bf16-target"])
def test_cpu_autocast(backend, target_dtype):
    """Under CPU autocast the loss has the dtype PyTorch's own ops give the reference formula there: a bf16
    prediction against a float32 target promotes to float32; two bf16 inputs stay bf16."""
    if backend == "cpp" and OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    pred, target = _inputs((2, 4, 1, 6, 6), torch.float32)
    pred = pred.detach().to(torch.bfloat16).requires_grad_()
    target = target.detach().to(target_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "cpp" and target_dtype == torch.bfloat16:
            with pytest.raises(vpfast.BackendUnavailable, match="cpp supports"):
                ddr_loss(pred, target, backend=backend)
            return
        out = ddr_loss(pred, target, backend=backend)
        ref = ddr_loss_reference(pred, target)
    assert out.dtype == ref.dtype == target_dtype
    (gp,) = torch.autograd.grad(out, pred)
    (gr,) = torch.autograd.grad(ref, pred)
    assert gp.dtype == torch.bfloat16
    # PyTorch's formula forms pred's differences and softmax in bf16 before promoting; the op promotes first,
    # so it is at least as close to the float64 result as PyTorch's own run under autocast
    p64 = pred.detach().double().requires_grad_()
    ref64 = ddr_loss_reference(p64, target.double())
    (gr64,) = torch.autograd.grad(ref64, p64)
    assert_close_bounded(out, ref, ref64, factor=1.5, name="loss")
    assert_close_bounded(gp, gr, gr64, factor=1.5, name="grad_pred")


@needs_gpu
@pytest.mark.parametrize("backend", ["torch", "auto"] + GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_cuda_autocast(backend, dtype):
    """Under CUDA autocast the loss is computed in float32, as softmax is there, whatever the inputs' dtype."""
    pred, target = _inputs((2, 4, 3, 16, 16), torch.float32, device="cuda")
    pred = pred.detach().to(dtype).requires_grad_()
    target = target.detach().to(dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ddr_loss(pred, target, backend=backend)
        ref = ddr_loss_reference(pred, target)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, **tolerances(torch.float32))
    (gp,) = torch.autograd.grad(out, pred)
    (gr,) = torch.autograd.grad(ref, pred)
    assert gp.dtype == dtype
    torch.testing.assert_close(gp, gr)


# ---- GPU only: the models' shapes and the launch limits ----------------------------------------------------
@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 10, 1, 64, 64), (16, 10, 3, 128, 128)], ids=["mmnist", "large"])
def test_gpu_model_shape(backend, dtype, shape):
    # TAU on Moving MNIST (B = 16, T = 10 frames of 64x64) and the benchmark's large case
    _low_precision_check(backend, dtype, shape)


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_over_2_31_elements(backend):
    """pred with more than 2^31 elements (bf16, 5.4 GB): offsets past 2^31 must not wrap. The loss is the mean
    over samples of each sample's own loss, so the last sample (entirely past 2^31) is checked alone: its
    gradient is 1/B times the gradient of the loss of that sample by itself."""
    B, T, C, H, W = 16, 10, 1, 4096, 4096
    assert (B - 1) * T * C * H * W >= 2**31  # the last sample starts past 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    pred = torch.randn((B, T, C, H, W), generator=g, device="cuda", dtype=torch.bfloat16)
    target = torch.randn((B, T, C, H, W), generator=g, device="cuda", dtype=torch.bfloat16)
    last_pred, last_target = pred[-1:].clone(), target[-1:].clone()
    pred.requires_grad_()
    out = ddr_loss(pred, target, backend=backend)
    (gp,) = torch.autograd.grad(out, pred)
    assert torch.isfinite(out)
    gp_last = gp[-1:] * B
    del pred, target, gp
    lp = last_pred.requires_grad_()
    (gref,) = torch.autograd.grad(ddr_loss_reference(lp, last_target), lp)
    lp64 = last_pred.detach().double().requires_grad_()
    (gref64,) = torch.autograd.grad(ddr_loss_reference(lp64, last_target.double()), lp64)
    assert_close_bounded(gp_last, gref, gref64, name="grad_pred of the last sample")


@pytest.mark.triton
@pytest.mark.parametrize("need_target", [True, False])
def test_triton_chunked(monkeypatch, need_target):
    """The Triton forward splits each row over several programs at real sizes; small blocks force that split
    (and a partial last chunk) on a small input."""
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    from vpfast.kernels import ddr_loss as k

    monkeypatch.setattr(k, "MAX_BLOCK", 16)
    monkeypatch.setattr(k, "MIN_CHUNK_STEPS", 1)
    shape = (2, 4, 3, 5, 7)
    assert k.chunks(2 * 3, 105, 16)[0] > 1
    pred, target = _inputs(shape, torch.float64, device=device_for("triton"))
    if not need_target:
        target = target.detach()
    inputs = (pred, target) if need_target else (pred,)
    out = ddr_loss(pred, target, backend="triton")
    ref = ddr_loss_reference(pred, target)
    for a, b in zip((out, *torch.autograd.grad(out, inputs)), (ref, *torch.autograd.grad(ref, inputs))):
        scale = b.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(a / scale, b / scale, **tolerances(torch.float64))


# ---- denormals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_denormal_softmax_tails(tau):
    """randn frames with a small tau: the softmax tails fall below float32's smallest normal number. The CPU
    kernel flushes them to 0 (csrc/cpu/denormals.h) and still matches the reference, with and without the
    target's gradient, and the caller's denormal mode, in every thread, is what it was before the call."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    pred, target = _inputs((2, 5, 1, 16, 16), torch.float32)
    d = (pred[:, 1:] - pred[:, :-1]).detach().reshape(2, 4, -1).double() / tau
    assert torch.softmax(d, -1).min() < torch.finfo(torch.float32).tiny  # the case this test is about

    def pred_only():
        p = pred.detach().requires_grad_()
        (got,) = torch.autograd.grad(ddr_loss(p, target.detach(), tau=tau, backend="cpp"), p)
        (ref,) = torch.autograd.grad(ddr_loss_reference(p, target.detach(), tau=tau), p)
        p64 = p.detach().double().requires_grad_()
        (ref64,) = torch.autograd.grad(ddr_loss_reference(p64, target.detach().double(), tau=tau), p64)
        assert_close_bounded(got, ref, ref64, name="grad_pred")

    assert_keeps_fp_state(lambda: _compare("cpp", pred, target, torch.float32, tau=tau))
    assert_keeps_fp_state(pred_only)


def test_cpp_fused_gradient_task_split():
    """Under autograd the cpp backend computes the gradient in the forward pass (ddr_loss_forward_grad) and
    splits a sequence into runs of frames when there are fewer sequences than twice the threads; a run not
    starting at frame 0 recomputes the row before it. Every split (1 to 3 threads, 1 to 3 sequences), with and
    without the target's gradient, and an incoming gradient other than 1 give the reference's gradients."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for B, T in ((1, 3), (1, 7), (2, 6), (3, 5)):
                pred, target = _inputs((B, T, 1, 5, 6), torch.float64, seed=B * T)
                for need_target in (False, True):
                    y = target if need_target else target.detach()
                    ins = (pred, y) if need_target else (pred,)
                    got = torch.autograd.grad(ddr_loss(pred, y, backend="cpp") * 2.5, ins)
                    ref = torch.autograd.grad(ddr_loss_reference(pred, y) * 2.5, ins)
                    for a, b in zip(got, ref):
                        scale = b.abs().max()
                        torch.testing.assert_close(a / scale, b / scale, **tolerances(torch.float64),
                                                   msg=lambda m: f"threads={n} B={B} T={T}: {m}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(0, 4, 1, 3, 3), (2, 4, 1, 0, 3)], ids=["B0", "D0"])
def test_cpp_fused_gradient_empty(shape):
    """No sequences or empty frames: the fused forward+gradient op returns the mean of nothing (nan) and empty
    gradients, instead of dividing by the sequence count when it splits the work."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    pred, target = (t.detach() for t in _inputs(shape, torch.float32))
    loss, gp, gy = torch.ops.vpfast.ddr_loss_forward_grad(pred, target, 0.1, 1e-12, True)
    assert loss.isnan() and gp.shape == pred.shape and gy.shape == target.shape
