"""large_kernel_attention (fused depthwise pair of gSTA/TAU) vs the reference, every available backend on its
own device (cuda, and triton where a GPU runs it, on CUDA tensors against the reference on the GPU)."""

import pytest
import torch

from vpfast.ops import large_kernel_attention, large_kernel_attention_reference
from vpfast.ops.large_kernel_attention import OP
from vpfast.testing import assert_close_bounded, assert_keeps_fp_state, device_for, exact_float32, low_precision_params



BACKENDS = ["torch", "cpp", "cuda", "triton"]


def _skip_unless(backend):
    why = OP.static_reasons(backend)
    if not why and backend == "cuda" and not torch.cuda.is_available():
        why = ["no CUDA device"]
    if why:
        pytest.skip("; ".join(why))


def _interpreted(backend):
    """The Triton interpreter runs taps one by one: its tests keep to a few small shapes."""
    return backend == "triton" and device_for("triton") != "cuda"


def _gpu_only(backend):
    _skip_unless(backend)
    if device_for(backend) != "cuda":
        pytest.skip(f"{backend} runs on CPU tensors here (no GPU); this test is for the GPU")


def _inputs(B, C, H, W, k0, k1, dtype=torch.float64, bias=True, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()  # noqa: E731
    return (mk(B, C, H, W), mk(C, 1, k0, k0), mk(C) if bias else None, mk(C, 1, k1, k1), mk(C) if bias else None)


def _run(fn, args):
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [a for a in args if a is not None]
    return (out, *torch.autograd.grad(out, leaves, g.to(out.device, out.dtype)))


def _compare(backend, args, d, tol):
    got = _run(lambda *a: large_kernel_attention(*a, dilation=d, backend=backend), args)
    with exact_float32():
        ref = _run(lambda *a: large_kernel_attention_reference(*a, dilation=d), args)
    for name, a, r in zip(("out", "grad_x", "grad_w0", "grad_b0", "grad_w1", "grad_b1"), got, ref):
        s = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a / s, r / s, **tol, msg=lambda m: f"{name}: {m}")


CASES = [(2, 3, 16, 16, 5, 7, 3), (1, 2, 9, 13, 5, 7, 3), (1, 3, 5, 4, 5, 7, 3), (2, 2, 12, 7, 3, 5, 2),
         (1, 2, 8, 11, 5, 3, 1), (1, 1, 5, 4, 3, 5, 2),
         # CUDA: tiles beyond 48 KB of shared memory run as two depthwise convolutions instead of fused: in
         # float64 only (5 -> 15 dilation 3), in both dtypes (3 -> 23 dilation 3)
         (1, 2, 10, 9, 5, 15, 3), (1, 1, 9, 8, 3, 23, 3)]
TRITON_CASES = [(1, 1, 5, 4, 3, 5, 2)]  # the interpreter runs taps one by one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    _skip_unless(backend)
    B, C, H, W, k0, k1, d = case
    if _interpreted(backend) and (case not in TRITON_CASES or dtype == torch.float32):
        pytest.skip("the Triton interpreter is slow; one small float64 shape only")
    args = _inputs(B, C, H, W, k0, k1, dtype, dev=device_for(backend))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    _compare(backend, args, d, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_no_bias(backend):
    _skip_unless(backend)
    if _interpreted(backend):
        pytest.skip("too many calls for the Triton interpreter; its gradients are compared with the reference")
    dev = device_for(backend)
    args = _inputs(1, 2, 6, 5, 3, 3, bias=False, dev=dev)
    assert torch.autograd.gradcheck(lambda *a: large_kernel_attention(*a, dilation=2, backend=backend), args)
    args = _inputs(1, 2, 5, 7, 5, 3, dev=dev)
    assert torch.autograd.gradcheck(lambda *a: large_kernel_attention(*a, dilation=3, backend=backend), args)


def test_pointwise_and_opcheck():
    x, w0, b0, w1, b1 = _inputs(2, 4, 8, 9, 5, 7)
    wp, bp = torch.randn(8, 4, 1, 1, dtype=x.dtype), torch.randn(8, dtype=x.dtype)
    out = large_kernel_attention(x, w0, b0, w1, b1, 3, wp, bp)
    torch.testing.assert_close(out, large_kernel_attention_reference(x, w0, b0, w1, b1, 3, wp, bp))
    if not OP.static_reasons("cpp"):
        torch.library.opcheck(torch.ops.vpfast.large_kernel_attention_forward,
                              (x, w0, b0, w1, b1, [1, 1], [3, 3]))
        g = torch.randn_like(x)
        torch.library.opcheck(torch.ops.vpfast.large_kernel_attention_backward,
                              (g, x.detach(), w0.detach(), b0.detach(), w1.detach(), [1, 1], [3, 3],
                               [True, True, True, True, True]))


def test_opcheck_triton():
    _skip_unless("triton")
    from vpfast.ops.large_kernel_attention import _lka_triton_forward
    x, w0, b0, w1, b1 = _inputs(1, 1, 4, 5, 3, 3, dev=device_for("triton"))
    torch.library.opcheck(_lka_triton_forward, (x, w0, b0, w1, b1, [1, 1], [2, 2]))


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_deterministic(backend):
    _skip_unless(backend)
    args = _inputs(4, 8, 16, 16, 5, 7, torch.float32, dev=device_for(backend))
    r1 = _run(lambda *a: large_kernel_attention(*a, dilation=3, backend=backend), args)
    r2 = _run(lambda *a: large_kernel_attention(*a, dilation=3, backend=backend), args)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


def test_bad_input():
    x, w0, b0, w1, b1 = _inputs(1, 4, 8, 8, 5, 7)
    with pytest.raises(ValueError, match="odd"):
        large_kernel_attention(x, torch.randn(4, 1, 4, 4, dtype=x.dtype), b0, w1, b1)
    with pytest.raises(ValueError, match="w1"):
        large_kernel_attention(x, w0, b0, torch.randn(3, 1, 7, 7, dtype=x.dtype), b1)
    with pytest.raises(ValueError, match="dilation"):
        large_kernel_attention(x, w0, b0, w1, b1, dilation=0)
    with pytest.raises(ValueError, match="weight_pw"):
        large_kernel_attention(x, w0, b0, w1, b1, 3, torch.randn(8, 3, 1, 1, dtype=x.dtype))


def test_opcheck_cuda():
    _skip_unless("cuda")
    x, w0, b0, w1, b1 = (t.detach() for t in _inputs(2, 4, 8, 9, 5, 7, dev="cuda"))
    torch.library.opcheck(torch.ops.vpfast.large_kernel_attention_forward, (x, w0, b0, w1, b1, [1, 1], [3, 3]))
    torch.library.opcheck(torch.ops.vpfast.large_kernel_attention_backward,
                          (torch.randn_like(x), x, w0, b0, w1, [1, 1], [3, 3], [True, True, True, True, True]))


# ---- mixed precision and autocast --------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", low_precision_params("large_kernel_attention"))
@pytest.mark.parametrize("case", [(2, 8, 16, 16, 5, 7, 3), (1, 4, 13, 9, 3, 5, 2), (1, 2, 12, 12, 5, 21, 3)],
                         ids=str)
def test_low_precision(backend, dtype, case):
    """float16/bfloat16 in and out, float32 inside: output and gradients within 8x the error of the reference
    run at that precision, both against float64 on the same (rounded) inputs."""
    B, C, H, W, k0, k1, d = case
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dev)  # noqa: E731
    args64 = (mk(B, C, H, W), mk(C, 1, k0, k0, scale=1 / k0), mk(C, scale=0.1), mk(C, 1, k1, k1, scale=1 / k1),
              mk(C, scale=0.1))
    go = mk(B, C, H, W).to(dtype)
    low = [t.to(dtype).requires_grad_() for t in args64]
    exact = [t.detach().double().requires_grad_() for t in low]

    def run(fn, args, grad):
        out = fn(*args)
        return (out, *torch.autograd.grad(out, args, grad))

    got = run(lambda *a: large_kernel_attention(*a, dilation=d, backend=backend), low, go)
    same = run(lambda *a: large_kernel_attention_reference(*a, dilation=d), low, go)
    ref = run(lambda *a: large_kernel_attention_reference(*a, dilation=d), exact, go.double())
    for name, a, r_same, r in zip(("out", "grad_x", "grad_w0", "grad_b0", "grad_w1", "grad_b1"), got, same, ref):
        assert a.dtype == dtype, name
        assert_close_bounded(a, r_same, r, factor=8, name=name)


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "auto"])
def test_cpu_autocast(backend):
    """Under CPU autocast the op returns what autocast gives the reference's F.conv2d calls (bfloat16, close
    to the reference run under autocast), with the 1x1 convolution included; gradients in float32."""
    x, w0, b0, w1, b1 = _inputs(2, 4, 9, 11, 5, 7, torch.float32)
    wp = torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(3)).requires_grad_()
    args = (x, w0, b0, w1, b1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda *a: large_kernel_attention(*a, 3, wp, backend=backend), args)
        ref = _run(lambda *a: large_kernel_attention_reference(*a, 3, wp), args)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        s = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a / s, r / s, rtol=1e-2, atol=1e-2)


# ---- on a GPU: the models' shape and the grid limits ------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(16, 512, 16, 16), (17, 4096, 8, 8)], ids=str)
def test_gpu_model_shape_and_many_planes(backend, shape):
    """TAU/gSTA's attention at Moving-MNIST's translator shape, and 69632 planes (beyond gridDim.y/z)."""
    _gpu_only(backend)
    args = _inputs(*shape, 5, 7, torch.float32, dev="cuda")
    _compare(backend, args, 3, dict(rtol=1e-4, atol=1e-4))


def test_auto_prefers_cudnn_on_gpu():
    assert OP.auto_order(device="cuda") == ("torch",)


def test_tiny_values_denormals():
    """x around float32's smallest normal number: its products with the weights are denormal. The CPU kernels
    (denormals flushed in their own scope, csrc/cpu/denormals.h; such values count as 0) still match the
    reference, and leave the caller's denormal mode as it was in every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, *rest = _inputs(2, 4, 12, 13, 5, 7, torch.float32, seed=5)
    args = ((x * 1e-38).detach().requires_grad_(), *rest)
    assert_keeps_fp_state(lambda: _compare("cpp", args, 3, dict(rtol=1e-4, atol=1e-4)))
