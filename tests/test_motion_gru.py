import pytest
import torch
import torch.nn.functional as F

import vpfast
from vpfast.ops import motion_gru, motion_gru_reference
from vpfast.ops.motion_gru import OP
from vpfast.testing import (assert_close_bounded, backend_params, device_for, low_precision_params, non_contiguous,
                            tolerances, assert_keeps_fp_state)

from reference_keys import entries

BACKENDS = backend_params("motion_gru")
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _interpreted(backend):
    return backend == "triton" and device_for("triton") == "cpu"


def _on(dev, inputs):
    """The same leaves on `dev` (None stays None)."""
    return [None if t is None else t.detach().to(dev).requires_grad_() for t in inputs]
NAMES = ("F", "D", "grad_x", "grad_f_prev", "grad_d_prev", "grad_uw", "grad_ub", "grad_rw", "grad_rb", "grad_ow",
         "grad_ob")


def _inputs(B, Cin, M, H, W, k=3, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype).requires_grad_()
    fan = (Cin + M) * k * k
    ts = [r(B, Cin, H, W), r(B, M, H, W), r(B, M, H, W)]
    for _ in range(3):
        ts += [r(M, Cin + M, k, k, sc=2 / fan ** 0.5), r(M, sc=0.5) if bias else None]
    return ts


def _run(fn, inputs, dtype=None):
    ins = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    f, d = fn(*ins)
    g = torch.Generator().manual_seed(1)
    gf = torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.device, f.dtype)
    gd = torch.randn(d.shape, generator=g, dtype=torch.float64).to(d.device, d.dtype)
    wrt = [t for t in ins if t is not None]
    return (f, d, *torch.autograd.grad((f, d), wrt, (gf, gd)))


def _compare(backend, inputs, dtype):
    # the reference runs on the backend's device too (float32 convolutions there may use TF32: both sides do)
    inputs = _on(device_for(backend), inputs)
    got = _run(lambda *a: motion_gru(*a, backend=backend), inputs)
    ref = _run(motion_gru_reference, inputs)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, **tolerances(dtype), msg=name)
    else:
        ref64 = _run(motion_gru_reference, inputs, torch.float64)
        for name, a, b, c in zip(NAMES, got, ref, ref64):
            assert_close_bounded(a, b, c, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 4, 18, 5, 7), (3, 16, 18, 8, 8), (2, 3, 2, 9, 4)], ids=str)
def test_matches_reference(backend, dtype, shape):
    if _interpreted(backend) and shape[0] * shape[2] * shape[3] * shape[4] > 1200:
        pytest.skip("the Triton interpreter is slow; small shapes only")
    _compare(backend, _inputs(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_k5(backend):
    _compare(backend, _inputs(2, 3, 4, 5, 6, bias=False), torch.float64)
    _compare(backend, _inputs(1, 3, 4, 6, 5, k=5), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    ins = _inputs(2, 3, 4, 5, 6)
    ins = [non_contiguous(t.detach().to(device_for(backend))).requires_grad_() if t is not None and t.dim() == 4
           else t for t in ins]
    _compare(backend, ins, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    ins = _on(device_for(backend), _inputs(1, 2, 4, 3, 4))
    assert torch.autograd.gradcheck(lambda *a: motion_gru(*a, backend=backend), ins,
                                    fast_mode=_interpreted(backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpp", "cuda")])
def test_opcheck_compiled(backend):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device_for(backend))  # noqa: E731
    gates, o, f, d = r(2, 8, 3, 5), r(2, 4, 3, 5), r(2, 4, 3, 5), r(2, 4, 3, 5)
    ops = torch.ops.vpfast
    torch.library.opcheck(ops.motion_gru_reset.default, (gates.requires_grad_(), f.requires_grad_()))
    torch.library.opcheck(ops.motion_gru_reset_backward.default, (r(2, 4, 3, 5), gates.detach(), f.detach()))
    torch.library.opcheck(ops.motion_gru_update.default, (gates, o.requires_grad_(), f, d.requires_grad_()))
    torch.library.opcheck(ops.motion_gru_update_backward.default,
                          (r(2, 4, 3, 5), r(2, 4, 3, 5), gates.detach(), o.detach(), f.detach()))


@pytest.mark.triton
def test_opcheck_triton():
    if OP.static_reasons("triton"):
        pytest.skip("; ".join(OP.static_reasons("triton")))
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device_for("triton")).requires_grad_()  # noqa: E731
    torch.library.opcheck(torch.ops.vpfast.motion_gru_reset_triton.default, (r(2, 8, 3, 5), r(2, 4, 3, 5)))
    torch.library.opcheck(torch.ops.vpfast.motion_gru_update_triton.default,
                          (r(2, 8, 3, 5), r(2, 4, 3, 5), r(2, 4, 3, 5), r(2, 4, 3, 5)))


def test_bad_input():
    ins = [t if t is None else t.detach() for t in _inputs(2, 3, 4, 5, 6, dtype=torch.float32)]
    with pytest.raises(ValueError, match="f_prev and d_prev must have the same shape"):
        motion_gru(ins[0], ins[1], ins[2][:, :2], *ins[3:])
    with pytest.raises(ValueError, match=r"update_weight must be \[M, Cin \+ M, k, k\]"):
        motion_gru(*ins[:3], ins[3][:, :5], *ins[4:])
    with pytest.raises(ValueError, match=r"reset_bias must be \[M\]"):
        motion_gru(*ins[:6], ins[6][:2], *ins[7:])
    with pytest.raises(TypeError, match="same dtype"):
        motion_gru(ins[0].double(), *ins[1:])
    with pytest.raises(ValueError, match="f_prev must be"):
        motion_gru(ins[0][:, :, :4], *ins[1:])


# ---- mixed precision ----------------------------------------------------------------------------------
def _realistic(B, Cin, M, H, W, dtype, seed=0):
    """float64 inputs holding values representable in `dtype`: unit-scale maps, weights at PyTorch's default
    initialisation scale (the reference zero-initialises them; trained ones are of this order)."""
    return [None if t is None else t.detach().to(dtype).double().requires_grad_()
            for t in _inputs(B, Cin, M, H, W, seed=seed)]


@pytest.mark.parametrize("backend,dtype", low_precision_params("motion_gru"))
def test_low_precision(backend, dtype):
    # everything in the half type: convolutions in it (as the reference's), the pointwise work in float32 with one
    # rounding per output; bounded by the reference's own error at that precision
    dev = device_for(backend)
    inputs = _on(dev, _realistic(4, 16, 18, 8, 8, dtype))
    got = _run(lambda *a: motion_gru(*a, backend=backend), inputs, dtype)
    ref = _run(motion_gru_reference, inputs, dtype)
    exact = _run(motion_gru_reference, inputs, torch.float64)
    for name, a, b, c in zip(NAMES, got, ref, exact):
        assert a.dtype == dtype, name
        assert_close_bounded(a, b, c, name=name)


class _ConvDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtype of every convolution that reaches the kernels (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def _autocast_params():
    out = [pytest.param("cpu", b, id=f"cpu-{b or 'auto'}") for b in ("torch", "cpp", None)]
    return out + [pytest.param("cuda", b, id=f"cuda-{b or 'auto'}", marks=GPU_ONLY)
                  for b in ("torch", "cuda", "triton", None)]


@pytest.mark.parametrize("dev,backend", _autocast_params())
def test_autocast(dev, backend):
    # Under autocast every backend does what autocast does to the reference: the three convolutions in bf16, the
    # pointwise work promoted to the float32 states, F and D float32, each input's gradient in its own dtype.
    # x is bf16 (in MotionRNN it comes from a convolution), the states and the parameters float32.
    if backend in ("cpp", "cuda", "triton"):
        if OP.static_reasons(backend):
            pytest.skip("; ".join(OP.static_reasons(backend)))
        if device_for(backend) != dev:
            pytest.skip(f"{backend} runs on {device_for(backend)} tensors here")
    inputs = _realistic(2, 16, 18, 6, 7, torch.bfloat16, seed=2)
    dts = [torch.bfloat16] + [torch.float32] * (len(inputs) - 1)
    leaves = [t.detach().to(dev, dt).requires_grad_() for t, dt in zip(inputs, dts)]
    with torch.autocast(dev, dtype=torch.bfloat16):
        with _ConvDtypes() as convs:
            got = _run(lambda *a: motion_gru(*a, backend=backend), leaves)
        ref = _run(motion_gru_reference, leaves)  # PyTorch's own arithmetic under autocast
    exact = _run(motion_gru_reference, _on(dev, inputs), torch.float64)
    assert convs.seen and all(d == (torch.bfloat16, torch.bfloat16) for d in convs.seen), convs.seen
    assert [t.dtype for t in got] == [t.dtype for t in ref] == [torch.float32] * 2 + dts
    for name, a, b, c in zip(NAMES, got, ref, exact):
        assert_close_bounded(a, b, c, name=name)


def test_half_types_on_the_cpu_go_to_torch():
    ins = [t.detach().bfloat16() for t in _inputs(1, 2, 4, 3, 4)]
    assert OP.select(None, *ins)[0] == "torch"
    assert all(t.dtype == torch.bfloat16 for t in motion_gru(*ins))
    if not OP.static_reasons("cpp"):
        with pytest.raises(vpfast.BackendUnavailable, match="bfloat16"):
            motion_gru(*ins, backend="cpp")


def test_triton_refuses_int32_overflow():
    B, Cin, M, H, W = 1, 2, 18, 2**13, 2**13  # gates of 2 * 18 * 2**26 elements
    x, f = torch.empty(B, Cin, H, W, device="meta"), torch.empty(B, M, H, W, device="meta")
    w, b = torch.empty(M, Cin + M, 3, 3, device="meta"), torch.empty(M, device="meta")
    args = (x, f, f, w, b, w, b, w, b)
    assert any("int32" in r for r in OP.reasons("triton", args, {}))
    assert not any("int32" in r for r in OP.reasons("cuda", args, {}))


@GPU_ONLY
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(16, 16, 18, 8, 8), (16, 64, 18, 16, 16), (16, 16, 18, 256, 256)],
                         ids=["motionrnn-mmnist", "bench", "over-65535-blocks"])
def test_gpu_shapes(backend, dtype, shape):
    # MotionRNN's MotionGRU on Moving MNIST (16 -> 18 channels at 8x8), the benchmarked 64 -> 18 at 16x16, and
    # 18.9M elements per map: more than 65535 blocks of 256 threads (the grid-stride loop covers the rest)
    if device_for(backend) != "cuda":
        pytest.skip("runs on CUDA tensors")
    inputs = _on("cuda", _realistic(*shape, dtype))
    got = _run(lambda *a: motion_gru(*a, backend=backend), inputs, dtype)
    ref = _run(motion_gru_reference, inputs, dtype)
    exact = _run(motion_gru_reference, inputs, torch.float64)
    for name, a, b, c in zip(NAMES, got, ref, exact):
        assert_close_bounded(a, b, c, name=name)

# ---- layers -------------------------------------------------------------------------------------------
# thuml MotionRNN's motion_list.0.* entries (tests/data/keys/motionrnn_64x4.txt)
THUML_KEYS = {
    "update.weight": (18, 34, 3, 3), "update.bias": (18,), "reset.weight": (18, 34, 3, 3), "reset.bias": (18,),
    "output.weight": (18, 34, 3, 3), "output.bias": (18,), "warp.conv.weight": (16, 16, 3, 3),
    "warp.warp_gate.weight": (9, 16, 3, 3), "warp.warp_gate.bias": (9,),
}


def test_state_dict_keys():
    m = vpfast.nn.MotionGRU(16, 18, 3)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == THUML_KEYS
    assert entries("motionrnn_64x4.txt", "motion_list.0.") == THUML_KEYS
    # zero initialisations of the reference
    for name in ("update", "reset", "output"):
        assert (getattr(m, name).weight == 0).all()
    assert (m.warp.warp_gate.weight == 0).all()
    assert m.warp.conv.bias is None


def _thuml_step(m, x, f_prev, d_prev):
    """MotionGRU written out from MODELS.md §4, with torchvision's deform_conv2d as the warp."""
    tv = pytest.importorskip("torchvision")
    st = torch.cat([x, f_prev], 1)
    u = torch.sigmoid(F.conv2d(st, m.update.weight, m.update.bias, padding=1))
    r = torch.sigmoid(F.conv2d(st, m.reset.weight, m.reset.bias, padding=1))
    o = torch.tanh(F.conv2d(torch.cat([x, f_prev * r], 1), m.output.weight, m.output.bias, padding=1))
    d = d_prev + 0.5 * (f_prev - d_prev)
    f = f_prev * (1 - u) + o * u + d
    mask = torch.sigmoid(F.conv2d(x, m.warp.warp_gate.weight, m.warp.warp_gate.bias, padding=1))
    N = f.shape[1] // 2
    inter = torch.stack([f[:, :N], f[:, N:]], 2).reshape(f.shape)
    return tv.ops.deform_conv2d(x, inter, m.warp.conv.weight, padding=1, mask=mask), f, d


@pytest.mark.parametrize("backend", [None, "torch"] + [b.values[0] for b in BACKENDS if not b.marks])
def test_motion_gru_layer(backend):
    dev = device_for(backend) if backend in ("cpp", "cuda", "triton") else "cpu"
    torch.manual_seed(0)
    m = vpfast.nn.MotionGRU(4, 18, 3, backend=backend).double().to(dev)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x, f_prev, d_prev = (torch.randn(2, c, 6, 7, dtype=torch.float64).to(dev) for c in (4, 18, 18))
    got = m(x, f_prev, d_prev)
    ref = _thuml_step(m, x, f_prev, d_prev)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # parameter gradients agree with the torch backend
    grads = {}
    for be in ("torch", backend):
        m.zero_grad()
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = be
        sum(t.square().sum() for t in m(x, f_prev, d_prev)).backward()
        grads[be] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k in grads["torch"]:
        torch.testing.assert_close(grads[backend][k], grads["torch"][k], rtol=1e-9, atol=1e-11, msg=k)


def test_warp_layer_calling_conventions():
    torch.manual_seed(0)
    w = vpfast.nn.Warp(3, 5, neighbour=5)
    x, off = torch.randn(2, 3, 6, 6), torch.randn(2, 50, 6, 6)
    a = w(x, off)
    b = w([x, off])
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 5, 6, 6)
    with pytest.raises(ValueError, match="neighbour must be a positive odd"):
        vpfast.nn.Warp(3, 3, neighbour=4)
    with pytest.raises(ValueError, match="motion_hidden must be 2"):
        vpfast.nn.MotionGRU(3, 16, 3)


def test_saturated_gates_denormals():
    """Inputs and states 100x larger saturate the update gate and the tanh: exp(-|x|) inside them is denormal
    or underflows. The CPU kernels (denormals flushed in their own scope, csrc/cpu/denormals.h) still match
    the reference, and leave the caller's denormal mode as it was in every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    ins = _inputs(2, 3, 4, 6, 7, dtype=torch.float32, seed=5)
    ins = [t.detach() * 100 if i < 3 else t for i, t in enumerate(ins)]
    assert_keeps_fp_state(lambda: _compare("cpp", ins, torch.float32))
