import pytest
import torch

from vpfast.ops import BackendUnavailable, flow_warp, flow_warp_reference
from vpfast.ops.flow_warp import OP
from vpfast.testing import (assert_close_bounded, backend_params, device_for, low_precision_params, non_contiguous,
                            tolerances, assert_keeps_fp_state)

BACKENDS = backend_params("flow_warp")
LOW = low_precision_params("flow_warp")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("out", "grad_x", "grad_flow")
MODES = [("zeros", True), ("zeros", False), ("border", True), ("border", False)]


def _inputs(B, C, H, W, scale, dtype=torch.float64, seed=0, off_integer=True, device="cpu"):
    """x ~ N(0, 1) and a flow of about `scale` pixels, drawn on the CPU (seeded), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    flow = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * scale
    if off_integer:  # keep positions clear of integers, where the reference's grid rounding picks a side
        flow = flow.round() + 0.1 + 0.8 * torch.rand(flow.shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, flow)]


def _run(fn, inputs, dtype=None):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (out, *torch.autograd.grad(out, ins, g.to(device=out.device, dtype=out.dtype)))


def _compare(backend, inputs, mode, dtype=None, factor=8.0):
    """backend vs the reference on the inputs' device: to float64 tolerances in float64, else bounded by the
    reference's own error at that dtype (both against the float64 reference)."""
    dtype = dtype or inputs[0].dtype
    got = _run(lambda x, f: flow_warp(x, f, *mode, backend=backend), inputs)
    ref = _run(lambda x, f: flow_warp_reference(x, f, *mode), inputs)
    for name, a, i in zip(NAMES, got, (inputs[0],) + tuple(inputs)):
        assert a.dtype == i.dtype and a.device == i.device, (name, a.dtype, a.device)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, **tolerances(dtype), msg=name)
    else:
        ref64 = _run(lambda x, f: flow_warp_reference(x, f, *mode), inputs, torch.float64)
        for name, a, b, c in zip(NAMES, got, ref, ref64):
            assert_close_bounded(a, b, c, factor=factor, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_matches_grid_sample(backend, dtype, mode, scale):
    if backend == "triton" and (scale, dtype) not in ((3.0, torch.float64), (0.5, torch.float32)):
        pytest.skip("the Triton interpreter is slow: a subset of the cases")
    dev = device_for(backend)
    shape = (1, 3, 5, 7) if backend == "triton" and dev == "cpu" else (2, 5, 9, 13)
    _compare(backend, _inputs(*shape, scale, dtype, device=dev), mode, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_zero_flow_is_identity(backend, mode):
    x, flow = _inputs(2, 3, 6, 5, 0.0, off_integer=False, device=device_for(backend))
    out = flow_warp(x, flow, *mode, backend=backend)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(out, flow_warp_reference(x, flow, *mode), **tolerances(torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_size_one_maps(backend, mode):
    for shape in ((1, 2, 1, 5), (2, 2, 4, 1)):
        _compare(backend, _inputs(*shape, 1.0, device=device_for(backend)), mode, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    x, flow = _inputs(2, 3, 5, 6, 2.0, device=device_for(backend))
    nc = [non_contiguous(t.detach()).requires_grad_() for t in (x, flow)]
    _compare(backend, nc, ("zeros", True), torch.float64)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _compare(backend, [x_cl, flow], ("border", True), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_gradcheck(backend, mode):
    x, flow = _inputs(1, 2, 4, 5, 2.0, device=device_for(backend))
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


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_opcheck_compiled(backend):
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    dev = device_for(backend)
    x, flow = _inputs(2, 3, 4, 5, 2.0, device=dev)
    for border in (False, True):
        torch.library.opcheck(torch.ops.vpfast.flow_warp_forward.default, (x, flow, border, True))
        g = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=dev)
        for nx, nf in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.vpfast.flow_warp_backward.default,
                                  (g, x.detach(), flow.detach(), border, True, nx, nf))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    x, flow = _inputs(1, 2, 3, 4, 2.0, torch.float32, device=device_for("triton"))
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


# ---- half precision, autocast, the GPU at real shapes ---------------------------------------------------
@pytest.mark.parametrize("backend, dtype", LOW)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_low_precision(backend, dtype, mode):
    # positions up to ~63 on a 64-wide map: a kernel that rounded them to 16 bits (bf16 keeps 60.3 as 60.25)
    # would be far outside the bound, which is the reference's own error at this dtype (it samples in float32)
    _compare(backend, _inputs(2, 8, 48, 64, 3.0, dtype, device="cuda"), mode, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_interpreter_half(dtype):
    # where no GPU runs Triton, the interpreter still runs the half-precision kernels on CPU tensors (small
    # shapes): widening every load is what keeps them within the bound (computed in fp16 they are not; the
    # interpreter has no bf16 arithmetic at all, so a bf16 run also shows none is done in bf16)
    if OP.static_reasons("triton") or device_for("triton") != "cpu":
        pytest.skip("Triton's interpreter is not in use here (the GPU runs test_low_precision)")
    _compare("triton", _inputs(1, 2, 5, 40, 3.0, dtype), ("zeros", True), dtype)


def test_torch_half_samples_at_float32_positions():
    # the torch backend (auto's choice for bf16 on the CPU) in bf16 vs float64 on the same bf16 inputs: the
    # error is the output's rounding (|x| < 5: bf16 ulp <= 2^-5), while a bf16 position on a 64-wide map is
    # up to a quarter pixel off, an error of up to |x| / 4
    x, flow = (t.detach() for t in _inputs(2, 4, 8, 64, 0.0, torch.bfloat16, off_integer=False))
    flow = flow + torch.linspace(0.05, 0.45, 64).to(torch.bfloat16)  # fractional positions near 60.3 ...
    for mode in MODES:
        out = flow_warp(x, flow, *mode)
        ref = flow_warp_reference(x.double(), flow.double(), *mode)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=2**-9)


@pytest.mark.parametrize("backend", ["torch", "cpp", "auto"])
def test_cpu_autocast(backend):
    # under CPU autocast grid_sample runs in float32, so flow_warp does too (whatever the input dtypes), and
    # equals the reference run under the same autocast
    if backend == "cpp" and OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, flow = _inputs(2, 3, 6, 7, 2.0, torch.float32)
    for xin in (x, x.detach().to(torch.bfloat16).requires_grad_()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flow_warp(xin, flow, "zeros", True, backend=None if backend == "auto" else backend)
            ref = flow_warp_reference(xin, flow, "zeros", True)
        assert out.dtype == ref.dtype == torch.float32
        assert_close_bounded(out, ref, flow_warp_reference(xin.detach().double(), flow.detach().double()))
        gx, gf = torch.autograd.grad(out.sum(), (xin, flow))
        assert gx.dtype == xin.dtype and gf.dtype == flow.dtype


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_autocast(backend):
    # under CUDA autocast grid_sample promotes: a bf16 map warped by a float32 flow runs in float32
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    x, flow = _inputs(2, 8, 32, 32, 2.0, torch.float32, device="cuda")
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = flow_warp(xb, flow, backend=backend)
        ref = flow_warp_reference(xb, flow)
    assert out.dtype == ref.dtype == torch.float32
    assert_close_bounded(out, ref, flow_warp_reference(xb.detach().double(), flow.detach().double()))


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_gpu_real_shape(backend, dtype, padding):
    # the shape (16, 64, 64, 64), flows of a few pixels
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    _compare(backend, _inputs(16, 64, 64, 64, 3.0, dtype, device="cuda"), (padding, True), dtype)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(4096, 17, 4, 4), (1, 1, 3000, 3000)], ids=["69632planes", "9Mpixels"])
def test_gpu_grid_limits(backend, shape):
    # more planes than a grid's y/z axis holds (65535), and a plane of more than 65535 blocks of 128 pixels
    if OP.static_reasons(backend):
        pytest.skip("; ".join(OP.static_reasons(backend)))
    _compare(backend, _inputs(*shape, 2.0, torch.float32, device="cuda"), ("zeros", True), torch.float32)


@GPU
def test_gpu_flow_gradient_is_deterministic():
    if OP.static_reasons("cuda"):
        pytest.skip("; ".join(OP.static_reasons("cuda")))
    x, flow = (t.detach() for t in _inputs(4, 32, 40, 36, 3.0, torch.float32, device="cuda"))
    g = torch.randn(x.shape, device="cuda")
    a = torch.ops.vpfast.flow_warp_backward(g, x, flow, False, True, True, True)
    b = torch.ops.vpfast.flow_warp_backward(g, x, flow, False, True, True, True)
    assert torch.equal(a[1], b[1])


def test_index_limits_refuse():
    # a map too large for 32-bit plane indices is a dispatch reason of every fused backend (auto then takes
    # torch, a named backend raises BackendUnavailable), not a kernel error; meta tensors, nothing allocated
    x = torch.empty(1, 1, 2**16, 2**15 + 1, device="meta")
    flow = torch.empty(1, 2, 2**16, 2**15 + 1, device="meta")
    for backend in ("cpp", "cuda", "triton"):
        assert any("32-bit" in r for r in OP.check(backend, x, flow, "zeros", True)), backend
        assert not OP.check(backend, x[..., :100], flow[..., :100], "zeros", True), backend
    with pytest.raises(BackendUnavailable, match="32-bit"):
        OP.select("cpp", x, flow, "zeros", True)


def test_tiny_values_denormals():
    """x around float32's smallest normal number: its products with the bilinear weights are denormal. The CPU
    kernels (denormals flushed in their own scope, csrc/cpu/denormals.h; such values count as 0) still match
    the reference, and leave the caller's denormal mode as it was in every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, flow = _inputs(2, 3, 9, 11, 2.0, torch.float32, seed=5)
    inputs = [(x * 1e-38).detach().requires_grad_(), flow]
    for mode in (("zeros", True), ("border", False)):
        assert_keeps_fp_state(lambda: _compare("cpp", inputs, mode))
