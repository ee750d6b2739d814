"""large_kernel_attention (fused depthwise pair of gSTA/TAU) vs the reference, every available backend."""
import pytest
import torch

from vpfast.ops import large_kernel_attention, large_kernel_attention_reference
from vpfast.ops.large_kernel_attention import OP

BACKENDS = ["torch", "cpp", "cuda", "triton"]


def _skip_unless(backend):
    why = OP.static_reasons(backend)
    if not why and backend == "cuda" and not torch.cuda.is_available():
        why = ["no CUDA device"]
    if why:
        pytest.skip("; ".join(why))


def _inputs(B, C, H, W, k0, k1, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return (mk(B, C, H, W), mk(C, 1, k0, k0), mk(C) if bias else None, mk(C, 1, k1, k1), mk(C) if bias else None)


def _run(fn, args):
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    leaves = [a for a in args if a is not None]
    return (out, *torch.autograd.grad(out, leaves, g))


CASES = [(2, 3, 16, 16, 5, 7, 3), (1, 2, 9, 13, 5, 7, 3), (1, 3, 5, 4, 5, 7, 3), (2, 2, 12, 7, 3, 5, 2),
         (1, 2, 8, 11, 5, 3, 1), (1, 1, 5, 4, 3, 5, 2)]
TRITON_CASES = [(1, 1, 5, 4, 3, 5, 2)]  # the interpreter runs taps one by one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    _skip_unless(backend)
    B, C, H, W, k0, k1, d = case
    if backend == "triton" and (case not in TRITON_CASES or dtype == torch.float32):
        pytest.skip("the Triton interpreter is slow; one small float64 shape only")
    args = _inputs(B, C, H, W, k0, k1, dtype)
    got = _run(lambda *a: large_kernel_attention(*a, dilation=d, backend=backend), args)
    ref = _run(lambda *a: large_kernel_attention_reference(*a, dilation=d), args)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, r in zip(got, ref):
        s = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a / s, r / s, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_no_bias(backend):
    _skip_unless(backend)
    if backend == "triton":
        pytest.skip("too many calls for the Triton interpreter; its gradients are compared with the reference")
    args = _inputs(1, 2, 6, 5, 3, 3, bias=False)
    assert torch.autograd.gradcheck(lambda *a: large_kernel_attention(*a, dilation=2, backend=backend), args)
    args = _inputs(1, 2, 5, 7, 5, 3)
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
    x, w0, b0, w1, b1 = _inputs(1, 1, 4, 5, 3, 3)
    torch.library.opcheck(_lka_triton_forward, (x, w0, b0, w1, b1, [1, 1], [2, 2]))


def test_deterministic():
    _skip_unless("cpp")
    args = _inputs(4, 8, 16, 16, 5, 7, torch.float32)
    r1 = _run(lambda *a: large_kernel_attention(*a, dilation=3, backend="cpp"), args)
    r2 = _run(lambda *a: large_kernel_attention(*a, dilation=3, backend="cpp"), args)
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
