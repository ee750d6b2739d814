"""depthwise_conv2d: every available backend vs F.conv2d(groups=C) (the reference)."""
import pytest
import torch
import torch.nn.functional as F

from vpfast.ops import depthwise_conv2d, depthwise_conv2d_reference
from vpfast.ops.depthwise_conv2d import OP
from vpfast.nn import DepthwiseConv2d

BACKENDS = ["torch", "cpp", "cuda", "triton"]


def _skip_unless(backend, *args):
    why = OP.static_reasons(backend)
    if not why and backend == "cuda" and not torch.cuda.is_available():
        why = ["no CUDA device"]
    if why:
        pytest.skip("; ".join(why))


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _inputs(B, C, H, W, kh, kw, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(C, 1, kh, kw, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _run(fn, x, w, b, seed=1):
    out = fn(x, w, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    return (out, *torch.autograd.grad(out, leaves, g))


def _compare(backend, x, w, b, stride=1, padding=None, dilation=1):
    got = _run(lambda *a: depthwise_conv2d(*a, stride=stride, padding=padding, dilation=dilation,
                                           backend=backend), x, w, b)
    ref = _run(lambda *a: F.conv2d(a[0], a[1], a[2], stride,
                                   padding if padding is not None else
                                   (dilation * (w.shape[2] // 2), dilation * (w.shape[3] // 2)),
                                   dilation, groups=x.shape[1]), x, w, b)
    for name, a, r in zip(("out", "grad_x", "grad_w", "grad_b"), got, ref):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a / scale, r / scale, **_tol(x.dtype), msg=lambda m: f"{name}: {m}")


CASES = [  # (B, C, H, W, k, dilation, stride)
    (2, 3, 16, 16, 3, 1, 1),
    (1, 4, 13, 9, 5, 1, 1),
    (2, 3, 16, 16, 7, 3, 1),
    (1, 2, 17, 23, 11, 2, 1),
    (2, 2, 19, 33, 21, 1, 1),
    (1, 2, 12, 35, 31, 1, 1),
    (2, 3, 15, 16, 3, 1, 2),
    (1, 2, 17, 20, 5, 2, 2),
    (1, 2, 9, 11, 7, 3, 2),
    (1, 2, 4, 5, 7, 3, 1),  # map smaller than the kernel's reach
    (1, 2, 3, 2, 31, 1, 1),
    (2, 2, 6, 7, 21, 2, 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    _skip_unless(backend)
    B, C, H, W, k, d, s = case
    if backend == "triton" and (B * C * H * W > 2048 or k > 11):
        pytest.skip("the Triton interpreter is slow; small shapes only")
    _compare(backend, *_inputs(B, C, H, W, k, k, dtype), stride=s, dilation=d)
