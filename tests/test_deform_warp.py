import pytest
import torch

from vpfast.ops import BackendUnavailable, deform_warp, deform_warp_reference
from vpfast.ops.deform_warp import OP
from vpfast.testing import (assert_close_bounded, backend_params, device_for, low_precision_params, non_contiguous,
                            tolerances, assert_keeps_fp_state)

BACKENDS = backend_params("deform_warp")
LOW = low_precision_params("deform_warp")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("out", "grad_x", "grad_offset", "grad_mask", "grad_weight")


def _inputs(B, C, H, W, O, k, scale, dtype=torch.float64, seed=0, device="cpu"):
    """x ~ N(0, 1), offsets of about `scale` pixels, mask in [0, 1), weight ~ N(0, 1/(C k)²), drawn on the CPU
    (seeded), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    off = torch.randn(B, 2 * k * k, H, W, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, k * k, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C, k, k, generator=g, dtype=torch.float64) / (C * k)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, off, mask, w)]


def _run(fn, inputs, dtype=None, seed=1):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (out, *torch.autograd.grad(out, ins, g.to(device=out.device, dtype=out.dtype)))


def _compare(backend, inputs, dtype=None):
    """backend vs the reference on the inputs' device: to float64 tolerances in float64, else bounded by the
    reference's own error at that dtype (both against the float64 reference)."""
    dtype = dtype or inputs[0].dtype
    got = _run(lambda *a: deform_warp(*a, backend=backend), inputs)
    ref = _run(deform_warp_reference, inputs)
    for name, a, i in zip(NAMES, got, (inputs[0],) + tuple(inputs)):
        assert a.dtype == i.dtype and a.device == i.device, (name, a.dtype, a.device)
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
    dev = device_for(backend)
    shape = (1, 3, 5, 7, 4) if backend == "triton" and dev == "cpu" else (2, 5, 9, 13, 6)
    _compare(backend, _inputs(*shape, k, scale, dtype, device=dev), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_motionrnn_shape(backend):
    dev = device_for(backend)
    shape = (1, 8, 6, 6, 8) if backend == "triton" and dev == "cpu" else (4, 16, 16, 16, 16)
    _compare(backend, _inputs(*shape, 3, 1.5, torch.float32, device=dev), torch.float32)


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
    dev = device_for(backend)
    inputs = _inputs(1 if backend == "triton" else 2, 3, 6, 7, 4, k, 2.3, device=dev)
    got = _run(lambda *a: deform_warp(*a, backend=backend), inputs)
    ref = _run(peer, inputs)
    for name, a, b in zip(NAMES, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    inputs = _inputs(2, 3, 5, 6, 4, 3, 1.3, device=device_for(backend))
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
    x, off, mask, w = _inputs(1, 2, 3, 4, 2, k, 0.02, device=device_for(backend))
    steps = torch.randint(-4, 4, off.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    off = (off.detach() + 0.25 + 0.5 * steps.to(off.device)).requires_grad_()
    torch.autograd.gradcheck(lambda *a: deform_warp(*a, backend=backend), (x, off, mask, w),
                             fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend):
    if backend == "triton":
        pytest.skip("the Triton backward always computes every gradient")
    x, off, mask, w = _inputs(2, 3, 5, 6, 4, 3, 1.3, device=device_for(backend))
    ref = _run(deform_warp_reference, (x, off, mask, w))
    for i in range(4):
        ins = [t.detach().requires_grad_(j == i) for j, t in enumerate((x, off, mask, w))]
        out = deform_warp(*ins, backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.device)
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


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_opcheck_compiled(backend):
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    dev = device_for(backend)
    x, off, mask, w = _inputs(2, 3, 4, 5, 2, 3, 1.3, device=dev)
    torch.library.opcheck(torch.ops.vpfast.deform_warp_forward.default, (x, off, mask, w))
    g = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=dev)
    for needs in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(torch.ops.vpfast.deform_warp_backward.default,
                              (g, x.detach(), off.detach(), mask.detach(), w.detach(), needs))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    x, off, mask, w = _inputs(1, 2, 3, 4, 2, 3, 1.3, torch.float32, device=device_for("triton"))
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
    for backend in ("torch", "cpp", "cuda", "triton"):
        if OP.static_reasons(backend):
            continue
        x, off, mask, w = (t.detach()[:0] if i < 3 else t.detach()
                           for i, t in enumerate(_inputs(2, 3, 5, 6, 4, 3, 1.0, device=device_for(backend))))
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


# ---- half precision, autocast, the GPU at real shapes ---------------------------------------------------
@pytest.mark.parametrize("backend, dtype", LOW)
@pytest.mark.parametrize("k", [1, 3])
def test_low_precision(backend, dtype, k):
    # a 64-wide map: a kernel that rounded positions to 16 bits (bf16 keeps 60.3 as 60.25) would be far
    # outside the bound, the reference's own error at this dtype (it samples at float32 positions)
    _compare(backend, _inputs(2, 16, 16, 64, 16, k, 1.5, dtype, device="cuda"), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_interpreter_half(dtype):
    # where no GPU runs Triton, the interpreter still runs the half-precision kernels on CPU tensors (small
    # shapes): widening every load is what keeps them within the bound (computed in fp16 they are not; the
    # interpreter has no bf16 arithmetic at all, so a bf16 run also shows none is done in bf16)
    if OP.static_reasons("triton") or device_for("triton") != "cpu":
        pytest.skip("Triton's interpreter is not in use here (the GPU runs test_low_precision)")
    _compare("triton", _inputs(1, 3, 5, 40, 4, 3, 1.5, dtype), dtype)


def test_torch_half_samples_at_float32_positions():
    # the torch backend (auto's choice for bf16 on the CPU) with k = 1 and a unit weight and mask returns the
    # bilinear samples rounded once to bf16; a bf16 position on a 64-wide map is up to a quarter pixel off
    x, off, mask, w = (t.detach() for t in _inputs(2, 1, 8, 64, 1, 1, 0.0, torch.bfloat16))
    off = off + torch.linspace(0.05, 0.45, 64).to(torch.bfloat16)  # fractional positions near 60.3 ...
    mask, w = torch.ones_like(mask), torch.ones_like(w)
    out = deform_warp(x, off, mask, w)
    ref = deform_warp_reference(*(t.double() for t in (x, off, mask, w)))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=2**-9)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cpu_autocast(backend):
    # a contraction with a weight: under autocast the op runs in autocast's dtype, as F.conv2d does, and is
    # as close to float64 as the reference run under the same autocast; gradients come back in the leaves'
    # dtypes
    inputs = _inputs(2, 4, 6, 7, 5, 3, 1.3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_warp(*inputs, backend=None if backend == "auto" else backend)
        ref = deform_warp_reference(*inputs)
    assert out.dtype == ref.dtype == torch.bfloat16
    ref64 = deform_warp_reference(*(t.detach().double() for t in inputs))
    assert_close_bounded(out, ref, ref64)
    grads = torch.autograd.grad(out.float().sum(), inputs)
    assert all(g.dtype == torch.float32 for g in grads)


def test_cpu_autocast_cpp_refuses_bf16():
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    inputs = [t.detach() for t in _inputs(1, 2, 4, 5, 2, 3, 1.0, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(BackendUnavailable, match="bfloat16"):
        deform_warp(*inputs, backend="cpp")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_autocast(backend):
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    inputs = _inputs(2, 16, 16, 16, 16, 3, 1.5, torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = deform_warp(*inputs, backend=backend)
        ref = deform_warp_reference(*inputs)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close_bounded(out, ref, deform_warp_reference(*(t.detach().double() for t in inputs)))


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(16, 16, 8, 8, 16), (8, 64, 64, 64, 64)], ids=["motionrnn", "large"])
def test_gpu_real_shape(backend, dtype, shape):
    # MotionRNN's Moving-MNIST warp (batch 16, 64 hidden / 4 channels at 8x8) and the (8, 64, 64, 64)
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    _compare(backend, _inputs(*shape, 3, 1.5, dtype, device="cuda"), dtype)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape, k", [((4096, 17, 4, 4, 3), 3), ((1, 1, 3000, 3000, 1), 1)],
                         ids=["69632planes", "9Mpixels"])
def test_gpu_grid_limits(backend, shape, k):
    # more planes than a grid's y/z axis holds (65535), and a plane of more than 65535 blocks of 128 pixels
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    _compare(backend, _inputs(*shape, k, 1.5, torch.float32, device="cuda"), torch.float32)


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_gradients_are_deterministic(dtype):
    # the offset, mask and weight gradients of the cuda backward are reduced in a fixed order
    if OP.static_reasons("cuda"):
        pytest.skip("; ".join(OP.static_reasons("cuda")))
    x, off, mask, w = (t.detach() for t in _inputs(8, 32, 24, 20, 32, 3, 2.0, dtype, device="cuda"))
    g = torch.randn(8, 32, 24, 20, device="cuda").to(dtype)
    a = torch.ops.vpfast.deform_warp_backward(g, x, off, mask, w, [False, True, True, True])
    b = torch.ops.vpfast.deform_warp_backward(g, x, off, mask, w, [False, True, True, True])
    for u, v in zip(a[1:], b[1:]):
        assert torch.equal(u, v)


def test_index_limits_refuse():
    # a map too large for 32-bit plane indices is a dispatch reason of every fused backend (auto then takes
    # torch, a named backend raises BackendUnavailable), not a kernel error; meta tensors, nothing allocated
    H, W = 2**16, 2**15 + 1
    x = torch.empty(1, 1, H, W, device="meta")
    off, mask, w = (torch.empty(1, 18, H, W, device="meta"), torch.empty(1, 9, H, W, device="meta"),
                    torch.empty(1, 1, 3, 3, device="meta"))
    for backend in ("cpp", "cuda", "triton"):
        assert any("32-bit" in r for r in OP.check(backend, x, off, mask, w)), backend
        small = [t[..., :100] if t.dim() == 4 and t.shape[-1] == W else t for t in (x, off, mask, w)]
        assert not OP.check(backend, *small), backend
    with pytest.raises(BackendUnavailable, match="32-bit"):
        OP.select("cpp", x, off, mask, w)


def test_tiny_values_denormals():
    """x around float32's smallest normal number: its products with the bilinear weights and the mask are
    denormal. The CPU kernels (denormals flushed in their own scope, csrc/cpu/denormals.h; such values count
    as 0) still match the reference, and leave the caller's denormal mode as it was in every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, off, mask, w = _inputs(2, 3, 7, 8, 4, 3, 1.5, torch.float32, seed=5)
    inputs = [(x * 1e-38).detach().requires_grad_(), off, mask, w]
    assert_keeps_fp_state(lambda: _compare("cpp", inputs))
