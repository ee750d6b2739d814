"""Fused ConvLSTM pointwise op and vpfast.nn.ConvLSTMCell vs the reference arithmetic."""
import importlib
import os

import pytest
import torch

import vpfast
from vpfast.testing import assert_close_bounded, backend_params, tolerances as tol
from vpfast.nn import ConvLSTMCell

CL = importlib.import_module("vpfast.ops.convlstm")
BACKENDS = backend_params("convlstm")
KEYS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "keys")


def _inputs(B, C, H, W, dtype, device, has_x, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 1.5).to(device)  # noqa: E731
    x_g = r(B, 4 * C, H, W) if has_x else None
    h_g = r(B, 4 * C, W, H).transpose(2, 3)  # H*W planes not contiguous
    c = r(B, 2 * C, H, W)[:, C:]  # a channel slice: non-contiguous
    return x_g, h_g, c


def _run(backend, x_g, h_g, c, tanh_c, use_h=True, use_c=True):
    leaves = [t.detach().requires_grad_() for t in (x_g, h_g, c) if t is not None]
    x_g = leaves[0] if x_g is not None else None
    h_g, c = leaves[-2], leaves[-1]
    h, c_new = CL.convlstm(x_g, h_g, c, 0.0, tanh_c, backend=backend)
    w = torch.linspace(-1, 1, h.numel(), dtype=h.dtype, device=h.device).reshape(h.shape)
    loss = (h * w).sum() * use_h + (c_new ** 2).sum() * 0.1 * use_c
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [h.detach(), c_new.detach()], [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("has_x", [True, False], ids=["sep", "merged"])
@pytest.mark.parametrize("tanh_c", [True, False], ids=["tanh_c", "o_g"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 5, 4, 17)], ids=["b1", "b2"])
def test_pointwise_vs_reference(backend, dtype, has_x, tanh_c, shape):
    if backend == "triton" and shape != (1, 3, 5, 7):
        pytest.skip("Triton interpreter: one small shape is enough")
    args = _inputs(*shape, dtype, "cuda" if backend == "cuda" else "cpu", has_x)
    for use_h, use_c in ((True, True), (True, False), (False, True)):
        ref = _run("torch", *args, tanh_c, use_h, use_c)
        out = _run(backend, *args, tanh_c, use_h, use_c)
        for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tanh_c", [True, False], ids=["tanh_c", "o_g"])
def test_gate_recovery_with_large_memories_and_closed_gates(backend, tanh_c):
    # Backward recovers g (only i, f, o are saved) from i*g = c_t - f*c_{t-1} or, for h = o*g, from h / o. The
    # hard cases: memories of a few hundred, and input and output gates that are tiny or exactly 0, each alone
    # and both together. Checked against float64 by the float32 reference's own error.
    dev = "cuda" if backend == "cuda" else "cpu"
    B, C, H, W = 2, 3, 4, 9
    _, h_g, c = _inputs(B, C, H, W, torch.float64, "cpu", False, seed=4)
    c = c * 100
    n = B * C * H * W
    closed = torch.linspace(-120.0, -15.0, n, dtype=torch.float64).reshape(B, C, H, W)
    k = torch.arange(n).reshape(B, C, H, W) % 4
    h_g = h_g.clone()
    h_g[:, :C] = torch.where((k == 1) | (k == 3), closed, h_g[:, :C])  # input gate
    h_g[:, 3 * C:] = torch.where((k == 2) | (k == 3), closed.flip(0), h_g[:, 3 * C:])  # output gate
    exact = _run("torch", None, h_g, c, tanh_c)
    f32 = [t.float().to(dev) for t in (h_g, c)]
    ref = _run("torch", None, *f32, tanh_c)
    out = _run(backend, None, *f32, tanh_c)
    for j, (a, r, e) in enumerate(zip(out[0] + out[1], ref[0] + ref[1], exact[0] + exact[1])):
        assert torch.isfinite(a).all()
        assert_close_bounded(a.cpu(), r.cpu(), e, name=f"result {j}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpp", "triton")])
@pytest.mark.parametrize("tanh_c", [True, False], ids=["tanh_c", "o_g"])
def test_gradcheck(backend, tanh_c):
    x_g, h_g, c = _inputs(1, 2, 3, 2, torch.float64, "cpu", True, seed=1)
    ins = [t.detach().requires_grad_() for t in (x_g, h_g, c)]
    f = lambda x, h, c: CL.OP.impls[backend](x, h, c, 0.5, tanh_c)  # noqa: E731
    g = lambda h, c: CL.OP.impls[backend](None, h, c, 0.0, tanh_c)  # noqa: E731
    fast = backend == "triton"
    assert torch.autograd.gradcheck(f, ins, atol=1e-6, rtol=1e-5, fast_mode=fast)
    assert torch.autograd.gradcheck(g, ins[1:], atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpp", "triton")])
def test_opcheck(backend):
    op = torch.ops.vpfast.convlstm_forward if backend == "cpp" else CL._triton_fwd
    for has_x in (True, False):
        for tanh_c in (True, False):
            x_g, h_g, c = _inputs(2, 2, 3, 4, torch.float32, "cpu", has_x, seed=2)
            args = [t.requires_grad_() if t is not None else None for t in (x_g, h_g, c.detach().clone())]
            torch.library.opcheck(op, (*args, 0.0, tanh_c))


def _unroll(cell, xs):
    h = c = xs.new_zeros(xs.shape[1], cell.num_hidden, xs.shape[3], xs.shape[4])
    outs, loss = [], 0
    with cell.unroll():
        for t in range(xs.shape[0]):
            h, c = cell(xs[t], h, c)
            outs += [h, c]
            loss = loss + (h * torch.cos(h)).mean() + (c ** 2).mean() * 0.1
    return outs, loss


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpp", "triton")])
@pytest.mark.parametrize("layer_norm,merge", [(False, True), (False, False), (True, False)],
                         ids=["merged", "separate", "layernorm"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("tanh_c", [True, False], ids=["tanh_c", "o_g"])
def test_cell_unroll_matches_reference(backend, layer_norm, merge, k, tanh_c):
    steps = 10 if k == 5 else 4
    if backend == "triton":
        if k != 3 or layer_norm:
            pytest.skip("Triton interpreter: one configuration")
        steps = 3
    dtype = torch.float64 if k == 3 else torch.float32
    torch.manual_seed(0)
    ref = ConvLSTMCell(3, 4, 6, 5, k, 1, layer_norm, tanh_c=tanh_c, backend="torch").to(dtype)
    if layer_norm:
        with torch.no_grad():
            for p in ref.parameters():
                if p.dim() == 3:
                    p.add_(torch.randn_like(p) * 0.1)
    fast = ConvLSTMCell(3, 4, 6, 5, k, 1, layer_norm, tanh_c=tanh_c, backend=backend, merge_convs=merge).to(dtype)
    fast.load_state_dict(ref.state_dict())
    xs = torch.randn(steps, 2, 3, 6, 5, generator=torch.Generator().manual_seed(5), dtype=dtype)
    outs_r, loss_r = _unroll(ref, xs)
    outs_f, loss_f = _unroll(fast, xs)
    t = tol(dtype) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(outs_f, outs_r):
        torch.testing.assert_close(a, b, **t)
    loss_r.backward()
    loss_f.backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        if pr.grad is None:  # conv_o / conv_last: constructed by the reference, never used
            assert pf.grad is None, n
            continue
        torch.testing.assert_close(pf.grad, pr.grad, **t, msg=lambda s: f"{n}: {s}")


def test_state_dict_keys_match_reference():
    path = os.path.join(KEYS, "convlstm_mmnist.txt")
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    want = {}
    for line in open(path):
        if line.startswith("cell_list.1."):
            name, shape = line[len("cell_list.1."):].split(" ", 1)
            want[name] = tuple(int(s) for s in shape.strip().strip("()").split(",") if s.strip())
    cell = ConvLSTMCell(128, 128, 16, 16, 5, 1, False)
    assert {k: tuple(v.shape) for k, v in cell.state_dict().items()} == want


def test_bad_inputs():
    cell = ConvLSTMCell(3, 4, 6, 5, 3, 1, False)
    x, s = torch.randn(2, 3, 6, 5), torch.randn(2, 4, 6, 5)
    with pytest.raises(ValueError, match="in_channel"):
        cell(torch.randn(2, 4, 6, 5), s, s)
    with pytest.raises(ValueError, match="4 dimensions"):
        cell(x, s[0], s)
    with pytest.raises(ValueError, match="c must have shape"):
        cell(x, s, torch.randn(1, 4, 6, 5))
    with pytest.raises(TypeError, match="dtype"):
        cell(x.double(), s, s)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cell(x, s, None)
    with pytest.raises(ValueError, match="h_g"):
        CL.convlstm(None, torch.randn(2, 15, 6, 5), s)
    with pytest.raises(vpfast.BackendUnavailable):
        CL.convlstm(None, torch.randn(2, 16, 6, 5), s, backend="cuda")
