import pytest
import torch

import vpfast
from vpfast.ops import group_norm_silu, group_norm_silu_reference
from vpfast.ops.group_norm_silu import OP, stat_dtype
from vpfast.testing import (assert_close_bounded, backend_params, device_for, low_precision_params, non_contiguous,
                            tolerances, assert_keeps_fp_state)

BACKENDS = backend_params("group_norm_silu")
LOW = low_precision_params("group_norm_silu")
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def _interpreted(backend):
    """True where `backend` runs on the CPU through the Triton interpreter (slow: small shapes only)."""
    return backend == "triton" and device_for(backend) == "cpu"
# (shape, groups)
CASES = [
    ((4, 16, 64, 64), 2),  # SimVP/TAU's encoder: GroupNorm(2, 16) over 64x64 frames
    ((1, 6, 5, 7), 2),  # batch 1, non-square, HW = 35 (not a multiple of 16), 3 channels per group
    ((3, 4, 9, 13), 4),  # one channel per group
    ((2, 8, 17, 3), 1),  # one group
    ((2, 10, 6, 6), 2),  # 5 channels per group; channels_last with C = 10 takes the generic lane count
    ((2, 32, 4, 5), 4),  # channels_last with 32 lanes of 32 channels
    ((1, 64, 3, 5), 2),  # channels_last with 64 lanes
    ((2, 12, 5, 5), 4),  # channels_last: C = 12 divides neither 32 nor 64
    ((5, 8), 2),  # [N, C]
    ((2, 6, 11), 3),  # [N, C, L]
    ((2, 4, 3, 4, 5), 2),  # [N, C, D, H, W]
]
LAYOUTS = ["nchw", "channels_last", "strided"]


def _inputs(shape, dtype, seed=0, affine=True, shift=0.0, device="cpu"):
    """(x, weight, bias, grad_y) drawn on the CPU with a seeded generator, then moved to `device`"""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + shift
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype).to(device))
    return cast(x), cast(w), cast(b), cast(gy)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return non_contiguous(x)
    return x.contiguous()


def _run(fn, x, w, b, gy, groups, dtype=None, layout="nchw"):
    """(y, grad_x, grad_weight, grad_bias) of fn at dtype (default: the inputs')"""
    dtype = dtype or x.dtype
    xd = _layout(x.to(dtype), layout).requires_grad_()
    wd = None if w is None else w.to(dtype).requires_grad_()
    bd = None if b is None else b.to(dtype).requires_grad_()
    y = fn(xd, groups, wd, bd)
    leaves = [t for t in (xd, wd, bd) if t is not None]
    grads = list(torch.autograd.grad(y, leaves, gy.to(dtype)))
    out = [y, grads.pop(0)]
    out.append(grads.pop(0) if w is not None else None)
    out.append(grads.pop(0) if b is not None else None)
    return out


def _compare(backend, x, w, b, gy, groups, layout="nchw", eps=1e-5):
    dtype = x.dtype
    got = _run(lambda *a: group_norm_silu(*a, eps=eps, backend=backend), x, w, b, gy, groups, layout=layout)
    ref = _run(lambda *a: group_norm_silu_reference(*a, eps=eps), x, w, b, gy, groups, layout=layout)
    names = ("y", "grad_x", "grad_weight", "grad_bias")
    if dtype == torch.float64:
        for name, a, r in zip(names, got, ref):
            if r is not None:
                torch.testing.assert_close(a, r, **tolerances(dtype), msg=name)
    else:
        ref64 = _run(lambda *a: group_norm_silu_reference(*a, eps=eps), x, w, b, gy, groups, torch.float64,
                     layout=layout)
        for name, a, r, r64 in zip(names, got, ref, ref64):
            if r is not None:
                assert a.dtype == dtype
                assert_close_bounded(a, r, r64, name=name)
    return got


def _triton_too_big(backend, shape):
    return _interpreted(backend) and torch.Size(shape).numel() > 1024


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, groups", CASES, ids=[f"{s}-g{g}" for s, g in CASES])
def test_matches_reference(backend, dtype, layout, shape, groups):
    if _triton_too_big(backend, shape):
        pytest.skip("the Triton interpreter is slow; small shapes only")
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b, gy = _inputs(shape, dtype, device=device_for(backend))
    got = _compare(backend, x, w, b, gy, groups, layout)
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        assert got[0].is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_optional_parameters(backend, affine, layout):
    x, w, b, gy = _inputs((2, 6, 4, 5), torch.float64, device=device_for(backend))
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    _compare(backend, x, w, b, gy, 3, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_and_eps(backend, dtype, layout):
    # |mean| >> std: the statistics must not cancel catastrophically; a large eps changes the scale
    dev = device_for(backend)
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype, shift=300.0, device=dev)
    _compare(backend, x, w, b, gy, 2, layout)
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype, device=dev)
    _compare(backend, x, w, b, gy, 2, layout, eps=0.5)
    # var ~ eps, and an eps that float32 does not represent: a float64 kernel must not see it rounded (a
    # compiled Triton kernel receives Python floats as float32; the interpreter does not show it)
    _compare(backend, x.double() / 4, w.double(), b.double(), gy.double(), 2, layout, eps=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_with_channels_last_grad(backend):
    x, w, b, gy = _inputs((2, 16, 6, 7), torch.float64, device=device_for(backend))
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = group_norm_silu(xc, 2, w, b, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(y, xc, gy.contiguous(memory_format=torch.channels_last))
    assert gx.is_contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(group_norm_silu_reference(xr, 2, w, b), xr, gy)
    torch.testing.assert_close(gx, gr, **tolerances(torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(backend, layout):
    fast = _interpreted(backend)
    x, w, b, _ = _inputs((2, 4, 2, 3) if fast else (2, 6, 3, 4), torch.float64, device=device_for(backend))
    x = _layout(x, layout).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.autograd.gradcheck(lambda *a: group_norm_silu(*a, backend=backend), (x, 2, w, b), fast_mode=fast)
    torch.autograd.gradcheck(lambda xx: group_norm_silu(xx, 1, None, None, backend=backend), (x,),
                             fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_parameter_grads(backend):
    # x does not require grad: the backward computes the parameter gradients alone
    x, w, b, gy = _inputs((2, 8, 5, 5), torch.float64, device=device_for(backend))
    w1, b1 = w.clone().requires_grad_(), b.clone().requires_grad_()
    got = torch.autograd.grad(group_norm_silu(x, 2, w1, b1, backend=backend), (w1, b1), gy)
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = torch.autograd.grad(group_norm_silu_reference(x, 2, w2, b2), (w2, b2), gy)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **tolerances(torch.float64))


def _param_grads(x, w, b, gy, backend):
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    return torch.autograd.grad(group_norm_silu(xx, 2, w, b, backend=backend), (xx, w, b), gy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_grad_deterministic(backend, layout):
    if _interpreted(backend):
        pytest.skip("the Triton interpreter is slow; its reduction order is fixed by construction")
    x, w, b, gy = _inputs((12, 16, 24, 24), torch.float32, seed=1, device=device_for(backend))
    x = _layout(x, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [_param_grads(x, w, b, gy, backend) for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(_param_grads(x, w, b, gy, backend))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, r in zip(runs[0], other):
            assert torch.equal(a, r)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpp", "cuda")])
def test_opcheck_compiled(backend):
    fwd = torch.ops.vpfast.group_norm_silu_forward.default
    bwd = torch.ops.vpfast.group_norm_silu_backward.default
    for layout in ("nchw", "channels_last"):
        x, w, b, gy = _inputs((2, 6, 3, 4), torch.float64, device=device_for(backend))
        x = _layout(x, layout)
        for wb in ((w, b), (None, None), (w, None)):
            torch.library.opcheck(fwd, (x, 2, *wb, 1e-5))
            _, mean, rstd = fwd(x, 2, *wb, 1e-5)
            for mask in ([True, True, True], [False, True, True], [True, False, False]):
                torch.library.opcheck(bwd, (gy, x, *wb, mean, rstd, 2, mask))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    x, w, b, gy = _inputs((2, 4, 2, 3), torch.float32, device=device_for("triton"))
    torch.library.opcheck(torch.ops.vpfast.group_norm_silu_forward_triton.default, (x, 2, w, b, 1e-5))
    _, mean, rstd = torch.ops.vpfast.group_norm_silu_forward_triton(x, 2, w, b, 1e-5)
    torch.library.opcheck(torch.ops.vpfast.group_norm_silu_backward_triton.default,
                          (gy, x, w, b, mean, rstd, 2, [True, True, True]))


def test_torch_compile_fullgraph():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, w, b, _ = _inputs((2, 8, 6, 6), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    fn = torch.compile(lambda t: group_norm_silu(t, 2, w, b, backend="cpp"), fullgraph=True,
                       backend="aot_eager")
    out = fn(x)
    torch.testing.assert_close(out, group_norm_silu_reference(x, 2, w, b), **tolerances(torch.float32))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_batch_falls_back():
    x = torch.randn(0, 4, 3, 3)
    assert group_norm_silu(x, 2).shape == x.shape


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda x, w, b: (x[0, 0, 0], 2, None, None), ValueError, "x must have at least 2 dimensions"),
        (lambda x, w, b: (x, 4, w, b), ValueError, r"num_groups \(4\) must divide"),
        (lambda x, w, b: (x, 0, w, b), ValueError, "num_groups must be a positive int"),
        (lambda x, w, b: (x, 2.0, w, b), ValueError, "num_groups must be a positive int"),
        (lambda x, w, b: (x, 2, w[:3], b), ValueError, "weight must have shape"),
        (lambda x, w, b: (x, 2, w, b[None]), ValueError, "bias must have shape"),
        (lambda x, w, b: (x, 2, w.double(), b), TypeError, "same dtype"),
        (lambda x, w, b: (x, 2, w, b.double()), TypeError, "same dtype"),
        (lambda x, w, b: (x.long(), 2, None, None), TypeError, "x must be a floating-point"),
        (lambda x, w, b: (x.numpy(), 2, w, b), TypeError, "x must be a torch.Tensor"),
        (lambda x, w, b: (x, 2, w.to("meta"), b), ValueError, "same device"),
    ],
)
def test_bad_input(make, err, match):
    x, w, b, _ = _inputs((2, 6, 4, 4), torch.float32)
    with pytest.raises(err, match=match):
        group_norm_silu(*make(x, w, b))


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan")])
def test_bad_eps(eps):
    x, w, b, _ = _inputs((2, 6, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        group_norm_silu(x, 2, w, b, eps=eps)


def test_named_backend_that_cannot_run_lists_reasons():
    x, w, b, _ = _inputs((2, 6, 4, 4), torch.float32)
    with pytest.raises(vpfast.BackendUnavailable, match="backend 'cuda' cannot run"):
        group_norm_silu(x, 2, w, b, backend="cuda")



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_saturated_activation(backend, dtype, layout):
    # a = xhat * w + b far beyond the range of exp (|a| up to ~1000): finite, and equal to the reference
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype, device=device_for(backend))
    w = w * 100
    b = torch.tensor([-900.0, -150.0, 150.0, 900.0], dtype=dtype, device=x.device)
    got = _compare(backend, x, w, b, gy, 2, layout)
    assert all(torch.isfinite(t).all() for t in got)


# ---- mixed precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", LOW)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape, groups", [((4, 16, 32, 32), 2), ((3, 10, 7, 9), 5), ((2, 64, 8, 8), 2)],
                         ids=["simvp", "odd", "wide-group"])
def test_low_precision(backend, dtype, layout, shape, groups):
    # activations of a trained model: O(1) with an offset, affine parameters near (1, 0)
    x, w, b, gy = _inputs(shape, torch.float64, shift=0.5, device=device_for(backend))
    x, w, b, gy = (t.to(dtype).double() for t in (x, w, b, gy))  # float64 sees the rounded inputs too
    got = _run(lambda *a: group_norm_silu(*a, backend=backend), x, w, b, gy, groups, dtype, layout)
    same = _run(group_norm_silu_reference, x, w, b, gy, groups, dtype, layout)
    ref64 = _run(group_norm_silu_reference, x, w, b, gy, groups, torch.float64, layout)
    for name, a, r, r64 in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, same, ref64):
        assert a.dtype == dtype, name
        assert_close_bounded(a, r, r64, name=name)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    # the saved statistics stay in float32 (a bf16 mean would shift every recomputed xhat)
    fwd = (torch.ops.vpfast.group_norm_silu_forward_triton if backend == "triton"
           else torch.ops.vpfast.group_norm_silu_forward)
    _, mean, rstd = fwd(_layout(x.to(dtype), layout), groups, w.to(dtype), b.to(dtype), 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 == stat_dtype(dtype)


@pytest.mark.parametrize("backend, dtype", LOW)
def test_low_precision_large_mean(backend, dtype):
    # |mean| >> std in a half type: the statistics and xhat are formed in float32 from the stored inputs
    x, w, b, gy = _inputs((2, 8, 16, 16), torch.float64, shift=40.0, device=device_for(backend))
    x, w, b, gy = (t.to(dtype).double() for t in (x, w, b, gy))
    got = _run(lambda *a: group_norm_silu(*a, backend=backend), x, w, b, gy, 2, dtype)
    same = _run(group_norm_silu_reference, x, w, b, gy, 2, dtype)
    ref64 = _run(group_norm_silu_reference, x, w, b, gy, 2, torch.float64)
    for name, a, r, r64 in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, same, ref64):
        assert_close_bounded(a, r, r64, name=name)


@pytest.mark.parametrize("backend", ["torch", "auto", "cpp"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-x", "f32-x"])
def test_cpu_autocast(backend, x_dtype):
    """Under CPU autocast the op returns what nn.GroupNorm + nn.SiLU return: x's dtype (a bf16 convolution
    output with float32 parameters gives bf16), values as close to that as the dtype allows."""
    if backend == "cpp" and OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, w, b, gy = _inputs((2, 8, 6, 6), torch.float32)
    x = x.to(x_dtype).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "cpp" and x_dtype != torch.float32:
            with pytest.raises(vpfast.BackendUnavailable, match="cpp supports"):
                group_norm_silu(x, 2, w, b, backend=backend)
            return
        y = group_norm_silu(x, 2, w, b, backend=backend)
        ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, w, b))
    assert y.dtype == ref.dtype == x_dtype
    got = torch.autograd.grad(y, (x, w, b), gy.to(y.dtype))
    want = torch.autograd.grad(ref, (x, w, b), gy.to(ref.dtype))
    tol = tolerances(torch.float32) if x_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref, **tol)
    for a, r in zip(got, want):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, **(tol if x_dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)))


@needs_gpu
@pytest.mark.parametrize("backend", ["torch", "auto"] + [p for p in BACKENDS if p.values[0] in ("cuda", "triton")])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-x", "f32-x"])
def test_cuda_autocast(backend, x_dtype):
    """Under CUDA autocast the op runs in float32, as group_norm does there, whatever the input's dtype."""
    x, w, b, gy = _inputs((4, 16, 16, 16), torch.float32, device="cuda")
    x = x.to(x_dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = group_norm_silu(x, 2, w, b, backend=backend)
        ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, w, b))
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, **tolerances(torch.float32))
    (gx,) = torch.autograd.grad(y, x, gy)
    (gr,) = torch.autograd.grad(ref, x, gy)
    assert gx.dtype == x_dtype
    torch.testing.assert_close(gx, gr, **(tolerances(torch.float32) if x_dtype == torch.float32 else {}))


# ---- GPU only: the models' shapes and the launch limits ----------------------------------------------------
GPU_BACKENDS = [p for p in BACKENDS if p.values[0] in ("cuda", "triton")]


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(160, 64, 64, 64), (160, 16, 64, 64)], ids=["simvp64", "simvp16"])
def test_gpu_model_shape(backend, layout, dtype, shape):
    # SimVP/TAU on Moving MNIST: B*T = 16*10 frames, GroupNorm(2, C) at 64x64
    x, w, b, gy = _inputs(shape, torch.float32, shift=0.5, device="cuda")
    x, w, b, gy = (t.to(dtype).double() for t in (x, w, b, gy))
    got = _run(lambda *a: group_norm_silu(*a, backend=backend), x, w, b, gy, 2, dtype, layout)
    same = _run(group_norm_silu_reference, x, w, b, gy, 2, dtype, layout)
    ref64 = _run(group_norm_silu_reference, x, w, b, gy, 2, torch.float64, layout)
    for name, a, r, r64 in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, same, ref64):
        assert a.dtype == dtype
        assert_close_bounded(a, r, r64, name=name)


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_over_2_31_elements(backend):
    """x with more than 2^31 elements (float16, 4.4 GB): offsets past 2^31 must not wrap. GroupNorm is per
    sample, so the last sample (entirely past 2^31) is checked against the reference run on it alone."""
    N, C, H, W = 520, 64, 256, 256
    assert (N - 1) * C * H * W >= 2**31  # the last sample starts past 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((N, C, H, W), generator=g, device="cuda", dtype=torch.float16).requires_grad_()
    w, b = _inputs((1, C), torch.float16, device="cuda")[1:3]
    gy = torch.randn_like(x)
    y = group_norm_silu(x, 2, w, b, backend=backend)
    (gx,) = torch.autograd.grad(y, x, gy)
    last = x[-1:].detach().requires_grad_()
    ref = group_norm_silu_reference(last, 2, w, b)
    (gref,) = torch.autograd.grad(ref, last, gy[-1:])
    last64 = last.detach().double().requires_grad_()
    ref64 = group_norm_silu_reference(last64, 2, w.double(), b.double())
    (gref64,) = torch.autograd.grad(ref64, last64, gy[-1:].double())
    assert_close_bounded(y[-1:], ref, ref64, name="y")
    assert_close_bounded(gx[-1:], gref, gref64, name="grad_x")


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_triton_chunked(monkeypatch, layout, affine):
    """The Triton kernels split each (sample, group) over several programs at real sizes; small blocks force
    that split (and partial chunks) on a small input."""
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    from vpfast.kernels import group_norm_silu as k

    monkeypatch.setattr(k, "FORWARD_BLOCK", 16)
    monkeypatch.setattr(k, "BACKWARD_TILE", 32)
    monkeypatch.setattr(k, "MIN_CHUNK_STEPS", 1)
    C, HW = 6, 7 * 9
    assert k.chunks(2 * 2, C // 2 * HW, 16)[0] > 1
    assert k.chunks(2 * 2, HW, k.backward_blocks(C // 2, HW, layout == "channels_last")[0])[0] > 1
    x, w, b, gy = _inputs((2, C, 7, 9), torch.float64, affine=affine, device=device_for("triton"))
    _compare("triton", x, w, b, gy, 2, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_saturated_silu_denormals(layout):
    """Weights of 100 put SiLU's inputs in the hundreds: its negative half gives results and gradients below
    float32's smallest normal number. The CPU kernel (denormals flushed in its own scope,
    csrc/cpu/denormals.h) still matches the reference, and leaves the caller's denormal mode as it was in
    every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, w, b, gy = _inputs((2, 8, 9, 11), torch.float32, seed=5)
    assert_keeps_fp_state(lambda: _compare("cpp", x, w * 100, b, gy, 2, layout=layout))
