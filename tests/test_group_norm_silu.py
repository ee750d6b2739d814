import pytest
import torch

import vpfast
from vpfast.ops import group_norm_silu, group_norm_silu_reference
from vpfast.ops.group_norm_silu import OP
from vpfast.testing import assert_close_bounded, backend_params, non_contiguous, tolerances

BACKENDS = backend_params("group_norm_silu")
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


def _inputs(shape, dtype, seed=0, affine=True, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + shift
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
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
    return backend == "triton" and torch.Size(shape).numel() > 1024


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, groups", CASES, ids=[f"{s}-g{g}" for s, g in CASES])
def test_matches_reference(backend, dtype, layout, shape, groups):
    if _triton_too_big(backend, shape):
        pytest.skip("the Triton interpreter is slow; small shapes only")
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b, gy = _inputs(shape, dtype)
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
    x, w, b, gy = _inputs((2, 6, 4, 5), torch.float64)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    _compare(backend, x, w, b, gy, 3, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_and_eps(backend, dtype, layout):
    # |mean| >> std: the statistics must not cancel catastrophically; a large eps changes the scale
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype, shift=300.0)
    _compare(backend, x, w, b, gy, 2, layout)
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype)
    _compare(backend, x, w, b, gy, 2, layout, eps=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_with_channels_last_grad(backend):
    x, w, b, gy = _inputs((2, 16, 6, 7), torch.float64)
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
    fast = backend == "triton"
    x, w, b, _ = _inputs((2, 4, 2, 3) if fast else (2, 6, 3, 4), torch.float64)
    x = _layout(x, layout).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.autograd.gradcheck(lambda *a: group_norm_silu(*a, backend=backend), (x, 2, w, b), fast_mode=fast)
    torch.autograd.gradcheck(lambda xx: group_norm_silu(xx, 1, None, None, backend=backend), (x,),
                             fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_parameter_grads(backend):
    # x does not require grad: the backward computes the parameter gradients alone
    x, w, b, gy = _inputs((2, 8, 5, 5), torch.float64)
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


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_grad_deterministic(layout):
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, w, b, gy = _inputs((12, 16, 24, 24), torch.float32, seed=1)
    x = _layout(x, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [_param_grads(x, w, b, gy, "cpp") for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(_param_grads(x, w, b, gy, "cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, r in zip(runs[0], other):
            assert torch.equal(a, r)


def test_opcheck_compiled():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    fwd = torch.ops.vpfast.group_norm_silu_forward.default
    bwd = torch.ops.vpfast.group_norm_silu_backward.default
    for layout in ("nchw", "channels_last"):
        x, w, b, gy = _inputs((2, 6, 3, 4), torch.float64)
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
    x, w, b, gy = _inputs((2, 4, 2, 3), torch.float32)
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
    x, w, b, gy = _inputs((2, 4, 5, 6), dtype)
    w = w * 100
    b = torch.tensor([-900.0, -150.0, 150.0, 900.0], dtype=dtype)
    got = _compare(backend, x, w, b, gy, 2, layout)
    assert all(torch.isfinite(t).all() for t in got)
