"""Fused Causal LSTM pointwise ops and vpfast.nn.CausalLSTMCell / GHU vs the reference arithmetic (MODELS.md §10)."""
import importlib
import itertools

import pytest
import torch

import vpfast
from vpfast.testing import (assert_close_bounded, assert_keeps_fp_state, backend_params, device_for, exact_float32,
                            low_precision_params, tolerances as tol)
from vpfast.nn import GHU, CausalLSTMCell

from reference_keys import entries

S = importlib.import_module("vpfast.ops.causal_lstm")
BACKENDS = backend_params("causal_lstm_cell")
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("c_new", "carry", "m_new", "o_part", "h", "grad_x_g", "grad_h_g", "grad_c_g", "grad_c", "grad_m_g",
         "grad_c2m_g")


def _interpreted(backend):
    return backend == "triton" and device_for("triton") == "cpu"


def _case(B, C, H, W, dtype=torch.float64, has_x=True, has_c=True, seed=0, scale=1.5):
    """Inputs of the three chained stages: x_g, h_g, c_g, c, m_g (h_g's H*W planes transposed: not contiguous,
    c a channel slice of a wider buffer, as in a real unroll), in float64 holding values representable in dtype."""
    g = torch.Generator().manual_seed(seed)

    def r(k, *shape):
        return (torch.randn(B, k * C, *shape, generator=g, dtype=torch.float64) * scale).to(dtype).double()
    x_g = r(7, H, W) if has_x else None
    h_g = r(4, W, H).transpose(2, 3)
    c_g = r(3, H, W) if has_c else None
    c = r(2, H, W)[:, C:]
    return x_g, h_g, c_g, c, r(3, H, W)


def _chain(backend, ins, dtype=None, dev="cpu", grads=True):
    """cell -> memory -> output with smooth stand-ins for conv_c2m, conv_om and conv_last, so that every gradient
    reaches every stage; returns the outputs and the gradients of the inputs that are given."""
    dts = dtype if isinstance(dtype, tuple) else (dtype,) * 5
    leaves = [None if t is None else (t.to(dev, dt) if dt else t.to(dev)).detach().requires_grad_()
              for t, dt in zip(ins, dts)]
    x_g, h_g, c_g, c, m_g = leaves
    c_new, carry = S.causal_lstm_cell(x_g, h_g, c_g, c, 1.0, backend=backend)
    C = c_new.shape[1]
    c2m_g = torch.cat([torch.sin(c_new * (k + 1)) * 1.2 for k in range(4)], 1).to(m_g.dtype)
    m_new, o_part = S.causal_lstm_memory(carry, m_g, c2m_g, 1.0, backend=backend)
    o_m, last = torch.cos(m_new) * 0.8, (c_new - m_new * 0.5) * 1.1
    h = S.causal_lstm_output(o_part, o_m.to(o_part.dtype), last.to(o_part.dtype), backend=backend)
    outs = [c_new, carry, m_new, o_part, h]
    if not grads:
        return [t.detach() for t in outs]
    w = torch.linspace(-1, 1, h.numel(), dtype=h.dtype, device=h.device).reshape(h.shape)
    loss = (h * w).sum() + (c_new ** 2).sum() * 0.1 + (m_new * 0.3).sum() + (carry[:, :C] * 0.2).sum()
    given = [t for t in leaves if t is not None]
    gs = dict(zip([id(t) for t in given], torch.autograd.grad(loss, given)))
    return [t.detach() for t in outs] + [gs[id(t)] if t is not None else torch.zeros(0)
                                         for t in (x_g, h_g, c_g, c, m_g)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("has_x,has_c", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["separate", "merged", "x-only", "c-only"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 5, 4, 17)], ids=["b1", "b2"])
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_stages_vs_reference(backend, dtype, has_x, has_c, shape, layout):
    if _interpreted(backend) and (shape != (1, 3, 5, 7) or dtype == torch.float32):
        pytest.skip("Triton interpreter: one small shape is enough")
    dev = device_for(backend)
    ins = _case(*shape, has_x=has_x, has_c=has_c)
    if layout == "channels_last":  # the CPU cell's layout; c2m_g (from c_new) and the carry follow it
        ins = [None if t is None else t.contiguous(memory_format=torch.channels_last) for t in ins]
    with exact_float32():
        ref = _chain("torch", ins, dtype, dev)
        out = _chain(backend, ins, dtype, dev)
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda s: f"{name}: {s}")
    if layout == "channels_last" and backend != "torch":  # outputs in the call's layout (the ops' contract)
        assert all(S.channels_last(t) for t in out[:5]), [t.stride() for t in out[:5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovery_at_hard_values(backend):
    # Backward recovers g from c_t - f c and g' from m_t - f' tanh(m̂) (i, f, i', f', tanh(m̂) are saved): hard
    # cases are memories of a few hundred (cancellation), input gates that are tiny or exactly 0 in float32
    # (dividing by i), and output gates exactly 0 (tanh(0): the gradient of o's pre-activation is
    # grad_h * tanh(last), which h / o could not give). Bounded by the float32 reference's own error vs float64.
    dev = device_for(backend)
    B, C, H, W = 2, 3, 4, 9
    x_g, h_g, c_g, c, m_g = _case(B, C, H, W, seed=4)
    c = c * 100
    closed = torch.linspace(-120.0, -15.0, B * C * H * W, dtype=torch.float64).reshape(B, C, H, W)
    every_third = (torch.arange(B * C * H * W) % 3 == 0).reshape(B, C, H, W)
    h_g = h_g.clone()
    h_g[:, :C] = torch.where(every_third, closed, h_g[:, :C])  # stage 1's i
    m_g[:, :C] = torch.where(every_third, closed, m_g[:, :C])  # stage 2's i'
    m_g[:, 2 * C:] = torch.where(every_third, -m_g[:, 2 * C:] * 100, m_g[:, 2 * C:])  # tanh(m̂) = ±1
    ins = (x_g, h_g, c_g, c, m_g)
    exact = _chain("torch", ins)
    f32 = [t.float() for t in ins]
    ref = _chain("torch", f32, dev=dev)
    out = _chain(backend, f32, dev=dev)
    for name, a, r, e in zip(NAMES, out, ref, exact):
        if a.numel():
            assert torch.isfinite(a).all(), name
            assert_close_bounded(a.cpu(), r.cpu(), e, name=name)
    # o exactly 0: the output stage's pre-activation gradient must still be grad_h * tanh(last)
    z = torch.zeros(1, 2, 3, 3, device=dev, requires_grad=True)
    last = torch.full((1, 2, 3, 3), 0.5, device=dev, requires_grad=True)
    h = S.causal_lstm_output(z, torch.zeros_like(z), last, backend=backend)
    g = torch.autograd.grad(h.sum(), z)[0]
    torch.testing.assert_close(g, torch.tanh(last.detach()).expand_as(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_x", [True, False], ids=["separate", "merged"])
def test_gradcheck(backend, has_x):
    x_g, h_g, c_g, c, m_g = _case(1, 2, 3, 2, has_x=has_x, has_c=has_x, seed=1)
    ins = [t.to(device_for(backend)).requires_grad_() for t in (x_g, h_g, c_g, c, m_g) if t is not None]

    def f(*ts):
        ts = list(ts)
        xg = ts.pop(0) if has_x else None
        hg = ts.pop(0)
        cg = ts.pop(0) if has_x else None
        c_, mg = ts
        c_new, carry = S.CELL.impls[backend](xg, hg, cg, c_, 1.0)
        k = torch.cat((c_new, c_new * 2, torch.sin(c_new), c_new * 0.5), 1)
        m_new, o_part = S.MEMORY.impls[backend](carry, mg, k, 1.0)
        return c_new, carry, m_new, S.OUTPUT.impls[backend](o_part, m_new, c_new + m_new)

    # the interpreter is slow: Triton gets gradcheck's fast mode (random projections of the Jacobian)
    assert torch.autograd.gradcheck(f, ins, atol=1e-6, rtol=1e-5, fast_mode=_interpreted(backend))


def _opcheck_cases(dev):
    for (has_x, has_c), cl in itertools.product(((True, True), (False, False), (True, False)), (False, True)):
        fmt = torch.channels_last if cl else torch.contiguous_format
        x_g, h_g, c_g, c, m_g = [None if t is None else
                                 t.float().to(dev).contiguous(memory_format=fmt).requires_grad_()
                                 for t in _case(2, 2, 3, 4, has_x=has_x, has_c=has_c, seed=2)]
        yield "cell", (x_g, h_g, c_g, c, 1.0)
        carry = torch.randn(2, 8 if has_x else 2, 3, 4, device=dev).contiguous(memory_format=fmt).requires_grad_()
        c2m = torch.randn(2, 8, 3, 4, device=dev).contiguous(memory_format=fmt).requires_grad_()
        yield "memory", (carry, m_g, c2m, 1.0)
        a, b, c = (torch.randn(2, 3, 4, 5, device=dev).contiguous(memory_format=fmt).requires_grad_()
                   for _ in range(3))
        yield "output", (a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    if backend == "triton":
        ops = {"cell": S._cell_triton_fwd, "memory": S._memory_triton_fwd, "output": S._output_triton_fwd}
    else:
        ops = {k: getattr(torch.ops.vpfast, f"causal_lstm_{k}_forward") for k in ("cell", "memory", "output")}
    for kind, args in _opcheck_cases(device_for(backend)):
        torch.library.opcheck(ops[kind], args)


# ---- the cell and the GHU ---------------------------------------------------------------------------------
def _with_affine_norms(module):
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.1)
                mod.bias.add_(torch.randn_like(mod.bias) * 0.1)
    return module


def _cells(backend, layer_norm, k, merge, dtype, Cin=3, C=4, H=6, W=5, seed=0):
    """PredRNN++'s first two layers, reference and fast: cell 0 (Cin -> C), the GHU, cell 1 (C -> C)."""
    torch.manual_seed(seed)
    ref = [CausalLSTMCell(Cin, C, H, W, k, 1, layer_norm, backend="torch"),
           GHU(C, C, H, W, k, 1, layer_norm, initializer=0.3, backend="torch"),
           CausalLSTMCell(C, C, H, W, k, 1, layer_norm, backend="torch")]
    fast = [CausalLSTMCell(Cin, C, H, W, k, 1, layer_norm, backend=backend, merge_convs=merge),
            GHU(C, C, H, W, k, 1, layer_norm, backend=backend, merge_convs=merge),
            CausalLSTMCell(C, C, H, W, k, 1, layer_norm, backend=backend, merge_convs=merge)]
    for r, f in zip(ref, fast):
        f.load_state_dict(_with_affine_norms(r).state_dict())  # a reference state_dict loads unchanged
    return [m.to(dtype) for m in ref], [m.to(dtype) for m in fast]


def _unroll(mods, xs, steps):
    """PredRNN++'s wiring: cell 0 on the frame (no gradient needed), z = GHU(h0, z), cell 1 on z."""
    cell0, ghu, cell1 = mods
    h0 = c0 = h1 = c1 = m = z = xs.new_zeros(xs.shape[1], cell0.num_hidden, xs.shape[3], xs.shape[4])
    outs, loss = [], 0
    with cell0.unroll(), ghu.unroll(), cell1.unroll():
        for t in range(steps):
            h0, c0, m = cell0(xs[t], h0, c0, m)
            z = ghu(h0, z)
            h1, c1, m = cell1(z, h1, c1, m)
            outs += [h0, c0, z, h1, c1, m]
            loss = loss + (h1 * torch.cos(h1)).mean() + (m ** 2).mean() * 0.1 + (z * c0).mean()
    return outs, loss



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm,merge", [(False, True), (False, False), (True, False)],
                         ids=["merged", "separate", "layernorm"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_cell_unroll_matches_reference(backend, layer_norm, merge, k, no_tf32):
    steps = 6 if k == 5 else 3
    if _interpreted(backend):
        if k != 3 or layer_norm:
            pytest.skip("Triton interpreter: one configuration per merge setting")
        steps = 2
    dev = device_for(backend)
    dtype = torch.float64 if k == 3 else torch.float32
    ref, fast = _cells(backend, layer_norm, k, merge, dtype)
    ref, fast = [m.to(dev) for m in ref], [m.to(dev) for m in fast]
    assert all(m.merge_convs == merge for m in fast)
    B, Cin, H, W = 2, 3, 6, 5
    xs = torch.randn(steps, B, Cin, H, W, generator=torch.Generator().manual_seed(5), dtype=dtype).to(dev)
    outs_r, loss_r = _unroll(ref, xs, steps)
    outs_f, loss_f = _unroll(fast, xs, steps)
    t = tol(dtype) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for j, (a, b) in enumerate(zip(outs_f, outs_r)):
        torch.testing.assert_close(a, b, **t, msg=lambda s: f"output {j}: {s}")
    loss_r.backward()
    loss_f.backward()
    for mr, mf in zip(ref, fast):
        for (n, pr), (_, pf) in zip(mr.named_parameters(), mf.named_parameters()):
            if pr.grad is None:  # conv_o: built by the reference, never used
                assert pf.grad is None, n
                continue
            torch.testing.assert_close(pf.grad, pr.grad, **t, msg=lambda s: f"{n}: {s}")


_CPP_ONLY = pytest.mark.skipif(bool(S.CELL.static_reasons("cpp")), reason="the cpp kernels are not built")


def _one_node_layers(C=3, Cin=2, H=7, W=5):
    """A reference cell and GHU and fast (cpp) ones with the same float64 weights (not small: |w| ~ 0.3)."""
    torch.manual_seed(1)
    ref = [CausalLSTMCell(Cin, C, H, W, 3, 1, False, backend="torch"),
           GHU(C, C, H, W, 3, 1, False, initializer=0.3, backend="torch")]
    fast = [CausalLSTMCell(Cin, C, H, W, 3, 1, False, backend="cpp"),
            GHU(C, C, H, W, 3, 1, False, initializer=0.3, backend="cpp")]
    for r, f in zip(ref, fast):
        with torch.no_grad():
            for q in r.parameters():
                q.normal_(0, 0.3)
        f.load_state_dict(r.state_dict())
    return [m.double() for m in ref], [m.double() for m in fast]


@_CPP_ONLY
def test_one_node_steps_are_used():
    # the separate-convolution cell and the merged GHU run as one autograd node each on the compiled kernels;
    # LayerNorm, merged cell convolutions and autocast keep the per-stage ops
    _, (cell, ghu) = _one_node_layers()
    x, h = torch.randn(2, 2, 7, 5, dtype=torch.float64), torch.randn(2, 3, 7, 5, dtype=torch.float64)
    assert type(cell(x, h, h, h)[0].grad_fn).__name__ == "_CausalStepBackward"
    assert type(ghu(h, h).grad_fn).__name__ == "_GHUStepBackward"
    merged = CausalLSTMCell(2, 3, 7, 5, 3, 1, False, backend="cpp", merge_convs=True).double()
    assert type(merged(x, h, h, h)[0].grad_fn).__name__ != "_CausalStepBackward"
    ln = CausalLSTMCell(2, 3, 7, 5, 3, 1, True, backend="cpp").double()
    assert type(ln(x, h, h, h)[0].grad_fn).__name__ != "_CausalStepBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(cell.float()(x.float(), h.float(), h.float(), h.float())[0].grad_fn).__name__ \
            != "_CausalStepBackward"


@_CPP_ONLY
def test_one_node_steps_gradcheck():
    # float64 gradcheck of the cell step over its inputs, states and every weight (functional_call swaps the
    # parameters, from which the fused path derives its channels_last weights), and of the GHU step
    _, (cell, ghu) = _one_node_layers(C=2, Cin=1, H=4, W=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 3, dtype=torch.float64, generator=g)
    st = [torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g) * 0.5 for _ in range(3)]
    names = [n for n, _ in cell.named_parameters() if "conv_o." not in n]
    ps = [dict(cell.named_parameters())[n].detach() for n in names]

    def f_cell(x, h, c, m, *w):
        return torch.func.functional_call(cell, dict(zip(names, w)), (x, h, c, m))

    ins = [t.clone().requires_grad_() for t in [x] + st + ps]
    assert torch.autograd.gradcheck(f_cell, ins[:4])  # inputs and states: every entry
    assert torch.autograd.gradcheck(f_cell, ins, fast_mode=True)  # with the weights: random projections
    gn = [n for n, _ in ghu.named_parameters()]
    gp = [q.detach() for q in ghu.parameters()]

    def f_ghu(x, z, *w):
        return torch.func.functional_call(ghu, dict(zip(gn, w)), (x, z))

    h, z = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g), torch.randn(2, 2, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(f_ghu, [t.clone().requires_grad_() for t in [h, z] + gp])


@_CPP_ONLY
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("used", ["all", "h", "c", "m"])
def test_one_node_steps_layouts_and_unused_outputs(layout, used):
    # channels_last or non-contiguous inputs and states; outputs left out of the loss (gradients None inside
    # the node); frozen weights; against the reference arithmetic in float64
    ref, fast = _one_node_layers()
    g = torch.Generator().manual_seed(3)

    def mk(c):
        t = torch.randn(2, c, 7, 5, dtype=torch.float64, generator=g)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return torch.randn(2, 2 * c, 5, 7, dtype=torch.float64, generator=g)[:, ::2].transpose(2, 3)

    ins = [mk(2), mk(3), mk(3), mk(3)]
    fast[0].conv_h[0].weight.requires_grad_(False)
    ref[0].conv_h[0].weight.requires_grad_(False)
    res = []
    for cell, ghu in (ref, fast):
        xs = [t.clone().requires_grad_() for t in ins]
        h, c, m = cell(*xs)
        z = ghu(h, xs[1])
        pick = {"all": (h, c, m), "h": (h,), "c": (c,), "m": (m,)}[used]
        loss = sum((t * torch.cos(t)).sum() for t in pick) + (z * z).sum()
        params = [q for q in list(cell.parameters()) + list(ghu.parameters()) if q.requires_grad]
        res.append((h, c, m, z, *torch.autograd.grad(loss, xs + params, allow_unused=True)))
    for k, (a, b) in enumerate(zip(*res)):
        if a is None:
            assert b is None or not b.abs().sum(), k
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda s: f"result {k}: {s}")


@_CPP_ONLY
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
@pytest.mark.parametrize("missing", ["hcm", "hc", "m"])
def test_zero_states_skip_their_convolutions(layout, missing):
    # a loop's first step passes None for its zero states (nn.CausalLSTMCell._forward_states): the one-node step
    # skips their convolutions; outputs and every gradient equal the step on explicit zeros, in float64
    _, (cell, _) = _one_node_layers()
    g = torch.Generator().manual_seed(5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_()
    given = {k: torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
             .requires_grad_() for k in "hcm" if k not in missing}
    zeros = {k: torch.zeros(2, 3, 7, 5, dtype=torch.float64) for k in missing}
    with cell.unroll():
        out = cell._forward_states(x, *(given.get(k) for k in "hcm"))
        want = cell(x, *(given.get(k, zeros.get(k)) for k in "hcm"))
    assert type(out[0].grad_fn).__name__ == "_CausalStepBackward"
    params = [q for q in cell.parameters() if q.requires_grad]
    wrt = [x, *given.values(), *params]
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-13)
    loss = lambda ts: sum((t * torch.sin(t)).sum() for t in ts)  # noqa: E731
    got = torch.autograd.grad(loss(out), wrt, allow_unused=True)
    ref = torch.autograd.grad(loss(want), wrt, allow_unused=True)
    for k, (a, b) in enumerate(zip(got, ref)):
        if a is None:  # the weight of a skipped convolution (zero gradient) or conv_o (unused)
            assert b is None or not b.abs().sum(), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient {k}: {m}")
    # with the states' convolutions skipped, gradcheck over x, the given states and the weights
    names = [n for n, _ in cell.named_parameters() if "conv_o." not in n]
    first = _FirstStep(cell)

    def f(x, *rest):
        k = 3 - len(missing)
        st = dict(zip([n for n in "hcm" if n not in missing], rest[:k]))
        w = {"cell." + n: q for n, q in zip(names, rest[k:])}
        return torch.func.functional_call(first, w, (x, *(st.get(n) for n in "hcm")))

    ins = [t.detach().clone().requires_grad_() for t in [x, *given.values()]] + \
        [dict(cell.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, ins, fast_mode=True)


class _FirstStep(torch.nn.Module):
    """cell._forward_states as a module's forward, for torch.func.functional_call over the cell's weights."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, h, c, m):
        return self.cell._forward_states(x, h, c, m)


@_CPP_ONLY
def test_zero_states_with_hooks_run_the_module():
    # a hooked cell sees its first step too: _forward_states then calls the module on explicit zeros
    _, (cell, _) = _one_node_layers()
    seen = []
    cell.register_forward_hook(lambda mod, args, out: seen.append(args[1].abs().sum().item()))
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64)
    cell._forward_states(x, None, None, None)
    assert seen == [0.0]


@_CPP_ONLY
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_step_ops_opcheck(layout):
    # the compiled compositions behind the one-node steps (csrc/causal_lstm.cpp): schema, fake (their Meta run),
    # AOT dispatch; None states included
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    t = lambda *s: r(*s).contiguous(memory_format=fmt)  # noqa: E731
    C, Ci = 3, 2
    ws = [t(7 * C, Ci, 3, 3), t(4 * C, C, 3, 3), t(3 * C, C, 3, 3), t(3 * C, C, 3, 3), t(4 * C, C, 3, 3),
          t(C, C, 3, 3), t(C, 2 * C, 1, 1)]
    x, h, c, m = t(2, Ci, 5, 4), t(2, C, 5, 4), t(2, C, 5, 4), t(2, C, 5, 4)
    step, back = torch.ops.vpfast.causal_lstm_step, torch.ops.vpfast.causal_lstm_step_backward
    for states in ((h, c, m), (None, None, m), (None, None, None)):
        torch.library.opcheck(step, (x, *states, *ws, 1, 1, 1.0))
        _, c_new, m_new, a1, a2, o = step(x, *states, *ws, 1, 1, 1.0)
        gh, gc, gm = t(2, C, 5, 4), t(2, C, 5, 4), t(2, C, 5, 4)
        need = [True, *(s is not None for s in states)] + [True] * 7
        for grads in ((gh, gc, gm), (None, gc, None)):
            torch.library.opcheck(back, (*grads, x, *states, c_new, m_new, a1, a2, o, *ws, 1, 1, need))
    w = t(2 * C, Ci + C, 3, 3)
    torch.library.opcheck(torch.ops.vpfast.causal_lstm_ghu_step, (x, h, w, 1))
    z_new, sg, tp = torch.ops.vpfast.causal_lstm_ghu_step(x, h, w, 1)
    for need in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.vpfast.causal_lstm_ghu_step_backward, (t(2, C, 5, 4), x, h, w, sg, tp, 1, need))


@pytest.mark.skipif(not torch.cuda.is_available() or not vpfast._ext.has_kernel("causal_lstm_cell_forward", "CUDA"),
                    reason="needs a CUDA GPU and the CUDA kernels")
def test_one_node_steps_on_cuda():
    # the one-node steps (zero first states included) on CUDA tensors against the reference cell on the CPU
    ref, fast = _one_node_layers()
    fast = [m.cuda() for m in fast]
    g = torch.Generator().manual_seed(4)
    x, h = torch.randn(2, 2, 7, 5, dtype=torch.float64, generator=g), torch.randn(2, 3, 7, 5, dtype=torch.float64,
                                                                                  generator=g)
    zero = torch.zeros_like(h)
    with fast[0].unroll():
        got = fast[0]._forward_states(x.cuda(), None, None, h.cuda())
    assert type(got[0].grad_fn).__name__ == "_CausalStepBackward"
    want = ref[0](x, zero, zero, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1](h.cuda(), x.new_ones(2, 3, 7, 5).cuda()).cpu(),
                               ref[1](h, x.new_ones(2, 3, 7, 5)), rtol=1e-10, atol=1e-12)


@_CPP_ONLY
def test_one_node_steps_are_once_differentiable():
    _, (cell, _) = _one_node_layers()
    x, h = torch.randn(2, 2, 7, 5, dtype=torch.float64), torch.randn(2, 3, 7, 5, dtype=torch.float64,
                                                                      requires_grad=True)
    (gh,) = torch.autograd.grad(cell(x, h, h, h)[0].sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        gh.sum().backward()


def test_merged_weights_follow_optimizer_steps():
    backend = "cpp" if not S.CELL.static_reasons("cpp") else "torch"
    ref, fast = _cells(backend, False, 3, True, torch.float64)
    opts = [torch.optim.SGD([p for m in ms for p in m.parameters()], lr=0.5) for ms in (ref, fast)]
    xs = torch.randn(3, 2, 3, 6, 5, dtype=torch.float64)
    for _ in range(2):
        for cells, opt in zip((ref, fast), opts):
            opt.zero_grad()
            _unroll(cells, xs, 3)[1].backward()
            opt.step()
    for mr, mf in zip(ref, fast):
        for (n, pr), (_, pf) in zip(mr.named_parameters(), mf.named_parameters()):
            torch.testing.assert_close(pf, pr, **tol(torch.float64), msg=lambda s: f"{n}: {s}")
        assert set(mf.state_dict()) == set(mr.state_dict())  # nothing derived is stored


def test_state_dict_keys_and_merge_choice():
    want = entries("predrnnpp_mmnist.txt", "cell_list.1.")
    big = CausalLSTMCell(128, 128, 16, 16, 5, 1, False)
    assert {k: tuple(v.shape) for k, v in big.state_dict().items()} == want
    # separate convolutions unless asked (measured faster on the CPU); the GHU's exact [x, z] merge when small
    assert not big.merge_convs and not CausalLSTMCell(16, 16, 16, 16, 3, 1, False).merge_convs
    assert CausalLSTMCell(16, 16, 16, 16, 3, 1, False, merge_convs=True).merge_convs
    assert GHU(16, 16, 16, 16, 3, 1, False).merge_convs and not GHU(16, 16, 16, 16, 3, 1, True).merge_convs
    assert not GHU(128, 128, 16, 16, 5, 1, False).merge_convs and not GHU(16, 16, 16, 16, 3, 2, False).merge_convs


def test_bad_inputs():
    cell = CausalLSTMCell(3, 4, 6, 5, 3, 1, False)
    x, s = torch.randn(2, 3, 6, 5), torch.randn(2, 4, 6, 5)
    with pytest.raises(ValueError, match="in_channel"):
        cell(torch.randn(2, 5, 6, 5), s, s, s)
    with pytest.raises(ValueError, match="m must have shape"):
        cell(x, s, s, torch.randn(2, 4, 6, 4))
    with pytest.raises(TypeError, match="dtype"):
        cell(x, s, s.double(), s)
    with pytest.raises(ValueError, match="merge_convs"):
        CausalLSTMCell(3, 4, 6, 5, 3, 1, True, merge_convs=True)
    with pytest.raises(ValueError, match="stride"):
        CausalLSTMCell(3, 4, 6, 5, 3, 2, False, merge_convs=True)
    with pytest.raises(ValueError, match="stride"):
        GHU(4, 4, 6, 5, 3, 2, False, merge_convs=True)
    with pytest.raises(ValueError, match="backend"):
        CausalLSTMCell(3, 4, 6, 5, 3, 1, False, backend="nope")(x, s, s, s)
    with pytest.raises(ValueError, match="h_g"):
        S.causal_lstm_cell(None, torch.randn(2, 12, 6, 5), None, s)
    with pytest.raises(ValueError, match="c_g"):
        S.causal_lstm_cell(None, torch.randn(2, 16, 6, 5), torch.randn(2, 4, 6, 5), s)
    with pytest.raises(TypeError, match="x_g"):
        S.causal_lstm_cell(torch.randn(2, 28, 6, 5).double(), torch.randn(2, 16, 6, 5), None, s)
    with pytest.raises(ValueError, match="m_g must have 3C"):
        S.causal_lstm_memory(s, torch.randn(2, 10, 6, 5), torch.randn(2, 16, 6, 5))
    with pytest.raises(ValueError, match="carry"):
        S.causal_lstm_memory(torch.randn(2, 8, 6, 5), torch.randn(2, 12, 6, 5), torch.randn(2, 16, 6, 5))
    with pytest.raises(ValueError, match="c2m_g"):
        S.causal_lstm_memory(s, torch.randn(2, 12, 6, 5), torch.randn(2, 12, 6, 5))
    with pytest.raises(TypeError, match="same dtype"):
        S.causal_lstm_output(s, s.double(), s)
    with pytest.raises(TypeError, match="last must be a torch.Tensor"):
        S.causal_lstm_output(s, s, None)
    with pytest.raises(vpfast.BackendUnavailable):
        S.causal_lstm_output(s, s, s, backend="cuda")


# ---- mixed precision --------------------------------------------------------------------------------------
def _factor(name):
    # gate gradients use g, g' recovered from the rounded c_t, m_t (an absolute error of about eps |c_t|, where
    # autograd's is eps |g|), as for the ST-LSTM (tests/test_stlstm.py): twice the usual factor
    return 16 if name.startswith("grad_") else 8


@pytest.mark.parametrize("backend,dtype", low_precision_params("causal_lstm_cell"))
@pytest.mark.parametrize("has_x", [True, False], ids=["separate", "merged"])
def test_low_precision(backend, dtype, has_x):
    dev = device_for(backend)
    ins = _case(4, 32, 16, 16, dtype, has_x=has_x, has_c=has_x)
    out = _chain(backend, ins, dtype, dev)
    ref = _chain("torch", ins, dtype, dev)
    exact = _chain("torch", ins, torch.float64, dev)
    for name, a, r, e in zip(NAMES, out, ref, exact):
        if a.numel():
            assert a.dtype == dtype, name
            assert_close_bounded(a, r, e, factor=_factor(name), name=name)


def _skip_unavailable(dev, backend):
    if backend in ("cpp", "cuda", "triton"):
        why = S.CELL.static_reasons(backend)
        if why:
            pytest.skip("; ".join(why))
        if device_for(backend) != dev:
            pytest.skip(f"{backend} runs on {device_for(backend)} tensors here")


@pytest.mark.parametrize("dev,backend", [pytest.param("cpu", b, id=f"cpu-{b or 'auto'}") for b in ("cpp", None)]
                         + [pytest.param("cuda", b, id=f"cuda-{b or 'auto'}", marks=GPU_ONLY)
                            for b in ("cuda", "triton", None)])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_cell_under_autocast(dev, backend, merge):
    # the cell hands bf16 convolution outputs and float32 states to the ops, which promote (float32 results);
    # one PredRNN++ step, compared with the reference modules under autocast
    _skip_unavailable(dev, backend)
    ref, fast = _cells(backend, False, 3, merge, torch.float32)
    ref, fast = [m.to(dev) for m in ref], [m.to(dev) for m in fast]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 5, generator=g).to(dev)
    h = c = m = torch.randn(2, 4, 6, 5, generator=g).to(dev) * 0.5
    with torch.autocast(dev, dtype=torch.bfloat16):
        out_r = list(ref[0](x, h, c, m)) + [ref[1](h, c)] + list(ref[2](h, h, c, m))
        out_f = list(fast[0](x, h, c, m)) + [fast[1](h, c)] + list(fast[2](h, h, c, m))
    for k, (a, b) in enumerate(zip(out_f, out_r)):
        assert a.dtype == torch.float32, k
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)  # bf16 convolutions
    sum(t.float().square().sum() for t in out_f).backward()
    for mod in fast:
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in mod.parameters())


def test_half_types_on_the_cpu_go_to_torch():
    x_g, h_g, c_g, c, m_g = [t.bfloat16() for t in _case(1, 2, 3, 4)]
    assert S.CELL.select(None, x_g, h_g, c_g, c, 1.0)[0] == "torch"
    assert S.causal_lstm_cell(x_g, h_g, c_g, c)[0].dtype == torch.bfloat16
    if not S.CELL.static_reasons("cpp"):
        with pytest.raises(vpfast.BackendUnavailable, match="bfloat16"):
            S.causal_lstm_cell(x_g, h_g, c_g, c, backend="cpp")


def test_triton_refuses_int32_overflow():
    C = 2**27
    s = torch.empty(1, C, 2, 2, device="meta")
    args = (s.new_empty(1, 7 * C, 2, 2), s.new_empty(1, 4 * C, 2, 2), None, s, 1.0)  # 3.8e9 elements in x_g
    assert any("int32" in r for r in S.CELL.reasons("triton", args, {}))
    assert not any("int32" in r for r in S.CELL.reasons("cuda", args, {}))
    s = torch.empty(1, 2**31, 1, 1, device="meta")
    assert any("int32" in r for r in S.OUTPUT.reasons("triton", (s, s, s), {}))


# ---- on a GPU: the models' shapes and the launch limits ---------------------------------------------------
@GPU_ONLY
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(16, 128, 16, 16), (16, 4096, 2, 2), (16, 128, 96, 96)],
                         ids=["predrnnpp-mmnist", "65536-planes", "over-65535-blocks"])
def test_gpu_shapes(backend, dtype, shape):
    # PredRNN++'s Moving-MNIST cell (C=128) at B=16, 16x16; B*C = 65536 planes; and 18.9M elements per map,
    # more than 65535 blocks of 256 threads cover (the grid-stride loop does the rest)
    if device_for(backend) != "cuda":
        pytest.skip("runs on CUDA tensors")
    for has_x in (True, False):
        ins = _case(*shape, dtype, has_x=has_x, has_c=has_x)
        out = _chain(backend, ins, dtype, "cuda")
        ref = _chain("torch", ins, dtype, "cuda")
        exact = _chain("torch", ins, torch.float32, "cuda")
        for name, a, r, e in zip(NAMES, out, ref, exact):
            if not a.numel():
                continue
            if dtype == torch.float32:
                torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=name)
            else:  # float32 stands in for float64 as the exact result
                assert_close_bounded(a, r, e, factor=_factor(name), name=name)


def test_saturated_gates_denormals():
    """Pre-activations in the hundreds saturate every gate (exp(-|x|) denormal or underflowing). The CPU kernels
    (denormals flushed in their own scope, csrc/cpu/denormals.h) still match the reference and leave the
    caller's denormal mode as it was in every thread."""
    if S.CELL.static_reasons("cpp"):
        pytest.skip("; ".join(S.CELL.static_reasons("cpp")))
    ins = [t.float() for t in _case(2, 3, 8, 9, seed=5, scale=150.0)]
    exact = _chain("torch", [t.double() for t in ins])
    ref = _chain("torch", ins)

    def check():
        for a, r, e in zip(_chain("cpp", ins), ref, exact):
            assert_close_bounded(a, r, e)

    assert_keeps_fp_state(check)
