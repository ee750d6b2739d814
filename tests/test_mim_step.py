"""MIM's one-node steps (vpfast/nn/_mim_step.py): float64 gradcheck of each autograd Function on odd shapes, with
some outputs unused (their gradients None) and first inputs without gradient; the layer-0 step against the
ST-LSTM cell's reference arithmetic; when the model takes them and when it falls back to the modules; and, on
a GPU, the CUDA kernels behind them against the reference at MIM's small-preset shape."""
from __future__ import annotations

import contextlib

import pytest
import torch

from vpfast import models as M
from vpfast.models import mim as MIM_MODEL
from vpfast.nn import _mim_step as S
from vpfast.nn.mim import MIMN, MIMBlock
from vpfast.nn.stlstm import SpatioTemporalLSTMCell

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _r(*shape, device="cpu", scale=1.0, g=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=g) * scale).to(device).requires_grad_()


def _block_args(B=2, C=3, H=5, W=7, k=3, device="cpu"):
    g = torch.Generator().manual_seed(0)
    states = [_r(B, C, H, W, device=device, g=g) for _ in range(6)]  # x, D, h, c, m, s
    w = [_r(4 * C, C, k, k, scale=0.3, device=device, g=g), _r(4 * C, C, k, k, scale=0.3, device=device, g=g),
         _r(3 * C, C, k, k, scale=0.3, device=device, g=g), _r(4 * C, 2 * C, k, k, scale=0.3, device=device, g=g),
         _r(2 * C, H, W, scale=0.5, device=device, g=g), _r(C, H, W, scale=0.5, device=device, g=g),
         _r(C, 2 * C, 1, 1, scale=0.3, device=device, g=g)]
    return states, w, (1, 1), (k // 2, k // 2)


def _mimn_args(B=2, Cx=2, C=3, H=5, W=7, k=3, device="cpu"):
    g = torch.Generator().manual_seed(1)
    states = [_r(B, Cx, H, W, device=device, g=g), _r(B, C, H, W, device=device, g=g),
              _r(B, C, H, W, device=device, g=g)]
    w = [_r(4 * C, Cx + C, k, k, scale=0.3, device=device, g=g), _r(2 * C, H, W, scale=0.5, device=device, g=g),
         _r(C, H, W, scale=0.5, device=device, g=g)]
    return states, w, (1, 1), (k // 2, k // 2)


def _stlstm_args(B=2, Cx=2, C=3, H=5, W=7, k=3, device="cpu"):
    g = torch.Generator().manual_seed(2)
    states = [_r(B, Cx, H, W, device=device, g=g)] + [_r(B, C, H, W, device=device, g=g) for _ in range(3)]
    w = [_r(4 * C, Cx + C, k, k, scale=0.3, device=device, g=g), _r(3 * C, Cx + C, k, k, scale=0.3, device=device, g=g),
         _r(C, 2 * C, k, k, scale=0.3, device=device, g=g), _r(C, 2 * C, 1, 1, scale=0.3, device=device, g=g)]
    return states, w, (1, 1), (k // 2, k // 2)


CASES = {"mim_block": (S.MIMBlockStep, _block_args), "mimn": (S.MIMNStep, _mimn_args),
         "stlstm": (S.STLSTMStep, _stlstm_args)}


# the compiled compositions behind each Function (csrc/mim_step.cpp): op name, number of outputs of the
# forward that backward takes back after the saved inputs, number of output gradients
OPS = {"mim_block": ("mim_block_step", 4), "mimn": ("mim_n_step", 2), "stlstm": ("mim_stlstm_step", 3)}


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
@pytest.mark.parametrize("kind", list(CASES))
def test_opcheck(kind, layout):
    # schema, fake (the compositions' Meta run), AOT dispatch of the forward and backward ops, with every
    # gradient asked and with some left out
    fn, make = CASES[kind]
    name, n_grads = OPS[kind]
    states, w, stride, padding = make()
    cl = lambda t: t.detach().contiguous(memory_format=torch.channels_last) \
        if layout == "channels_last" and t.dim() == 4 else t.detach()  # noqa: E731
    states, w = [cl(t) for t in states], [cl(t) for t in w]
    fwd, bwd = getattr(torch.ops.vpfast, name), getattr(torch.ops.vpfast, name + "_backward")
    args = (*states, *w, stride, padding, 1.0)
    torch.library.opcheck(fwd, args)
    outs = fwd(*args)
    # what each Function saves after its inputs (see nn/_mim_step.py)
    kept = {"mim_block": lambda o: (o[3], o[2], *o[4:], o[0], o[1]), "mimn": lambda o: (o[2], o[1], o[3], o[0]),
            "stlstm": lambda o: (o[2], o[1], o[3], o[0])}[kind](outs)
    grads = [torch.randn_like(outs[0]) for _ in range(n_grads)]
    n_in = len(states) + len(w)
    for mask in ([True] * n_in, [k % 2 == 1 for k in range(n_in)]):
        for gs in (grads, [None] + grads[1:]):
            torch.library.opcheck(bwd, (*gs, *states, *w, *kept, stride, padding, mask))


@pytest.mark.parametrize("used", ["all", "h_only", "no_h"])
@pytest.mark.parametrize("kind", list(CASES))
def test_gradcheck(kind, used):
    """Every input and weight, float64; "h_only": the other outputs unused (the model's last step), "no_h": h
    unused (its gradient None)."""
    fn, make = CASES[kind]
    states, w, stride, pad = make()

    def f(*ts):
        outs = fn.apply(*ts, stride, pad, 1.0)
        if used == "h_only":
            return outs[0]
        return outs[1:] if used == "no_h" else outs

    assert torch.autograd.gradcheck(f, (*states, *w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CASES))
def test_first_input_without_gradient(kind):
    """The first input a data frame (no gradient; layer 0's input gradient then runs over h's channels only), the
    others partly without gradient too: the gradients that are asked for still pass gradcheck."""
    fn, make = CASES[kind]
    states, w, stride, pad = make()
    states[0].requires_grad_(False)
    w[0].requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *ts: fn.apply(states[0], *ts[:len(states) - 1], w[0], *ts[len(states) - 1:],
                                                         stride, pad, 1.0),
                                    (*states[1:], *w[1:]), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_stlstm_step_matches_cell_reference(device):
    """MIM's layer-0 step with the cell's merged weights against SpatioTemporalLSTMCell(backend="torch") on an
    odd shape: h, c, m and the gradients of the inputs and of conv_x / conv_h / conv_m / conv_o / conv_last."""
    torch.manual_seed(0)
    cell = SpatioTemporalLSTMCell(2, 3, 5, 7, 3, 1, False, backend="torch").double().to(device)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 2 if j == 0 else 3, 5, 7, dtype=torch.float64, generator=g).to(device).requires_grad_()
          for j in range(4)]
    params = list(cell.parameters())
    res = []
    for one_node in (False, True):
        if one_node:
            w_xh, w_xm = cell._derive_merged_weights()
            ys = S.STLSTMStep.apply(*xs, w_xh, w_xm, cell.conv_o[0].weight, cell.conv_last.weight, (1, 1), (1, 1),
                                    1.0)
        else:
            ys = cell(*xs)
        loss = sum((y * y.sin()).sum() for y in ys)
        res.append((*ys, *torch.autograd.grad(loss, xs + params)))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["mimn", "mim_block"])
def test_modules_take_one_node_step(kind):
    """MIM-N and the MIM block with merged convolutions run their one-node step on the compiled CPU backend, the
    multi-node path without merging (both against the reference: test_models_baselines.py)."""
    one_node = f"{'MIMN' if kind == 'mimn' else 'MIMBlock'}StepBackward"
    for merge in (True, False):
        cell = (MIMN(3, 4, 7, 5, 3, 1, merge_convs=merge) if kind == "mimn"
                else MIMBlock(4, 4, 7, 5, 3, 1, merge_convs=merge)).double()
        n = 3 if kind == "mimn" else 6
        xs = [torch.randn(2, 3 if (kind == "mimn" and j == 0) else 4, 7, 5, dtype=torch.float64,
                          requires_grad=True) for j in range(n)]
        assert (type(cell(*xs)[0].grad_fn).__name__ == one_node) == merge


def _tiny_mim(backend=None, **over):
    kw = dict(in_shape=(3, 1, 16, 16), pre_seq_length=3, aft_seq_length=2, num_hidden="4,4,4", filter_size=3,
              patch_size=2)
    kw.update(over)
    torch.manual_seed(0)
    return M.create("mim", backend=backend, **kw).double()


def _kinds(model, frames):
    """For each of the model's loop steps (layers, then MIM-Ns): whether it is the module (the fallback)."""
    with contextlib.ExitStack() as unrolled:
        for cell in (*model.stlstm_layer, *model.stlstm_layer_diff):
            unrolled.enter_context(cell.unroll())
        cells, diffs = MIM_MODEL._loop_steps(model, frames[:, 0], frames.new_zeros(frames.shape[0], 4, 8, 8))
    return [isinstance(c, torch.nn.Module) for c in (*cells, *diffs)]


def test_model_loop_takes_one_node_steps_or_falls_back():
    frames = torch.rand(2, 5, 4, 8, 8, dtype=torch.float64)
    assert _kinds(_tiny_mim(), frames) == [False] * 5  # every cell and MIM-N: one-node steps
    assert _kinds(_tiny_mim("torch"), frames) == [True] * 5  # the reference: the modules
    m = _tiny_mim()
    m.stlstm_layer[2].merge_convs = False  # one cell without merged convolutions: all modules
    assert _kinds(m, frames) == [True] * 5
    m = _tiny_mim()
    calls = []
    m.stlstm_layer_diff[0].register_forward_hook(lambda *a: calls.append(1))  # hooks see every step: modules
    assert _kinds(m, frames) == [True] * 5
    m.rollout(frames, None)
    assert len(calls) == 3  # 4 steps for 5 frames, no MIM-N at step 0
    m = _tiny_mim().float()
    assert _kinds(m, frames.float()) == [False] * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the modules (their casts)
        assert _kinds(m, frames.float()) == [True] * 5
    assert _kinds(m, frames) == [True] * 5  # float32 weights, float64 frames: the modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_mim_training_step_one_node_matches_reference_gpu():
    """The small preset's training step at batch 8 on the one-node path (the CUDA kernels behind it) against
    backend="torch", float64: loss and every parameter's gradient. (The CPU runs the same comparison on
    test_models_baselines.py's tiny models.)"""
    frames = torch.rand(8, 20, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("torch", None):
        torch.manual_seed(0)
        m = M.create("mim", preset="small", backend=backend).double().cuda().train()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.1)
        loss = m.training_loss(frames.cuda(), 60000)[0]
        loss.backward()
        grads.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-11)
    assert grads[0][1].keys() == grads[1][1].keys()
    for k in grads[0][1]:
        torch.testing.assert_close(grads[1][1][k], grads[0][1][k], rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("given_s", [False, True])
def test_block_zero_inputs_skip_their_convolutions(given_s):
    # the model loop's first step passes None for the MIM block's zero D, h, c (and S unless the caller gave
    # one): outputs and every gradient equal the step on explicit zeros (float64), gradcheck over the rest,
    # and the compiled op passes opcheck with them absent
    states, w, stride, padding = _block_args()
    x, _, _, _, m, s = states
    zero = torch.zeros_like(m)
    s_in = s if given_s else None
    got = S.MIMBlockStep.apply(x, None, None, None, m, s_in, *w, stride, padding, 1.0)
    want = S.MIMBlockStep.apply(x, zero, zero, zero, m, s if given_s else zero, *w, stride, padding, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    wrt = [x, m] + ([s] if given_s else []) + w
    loss = lambda ts: sum((t * torch.cos(t)).sum() for t in ts)  # noqa: E731
    ga = torch.autograd.grad(loss(got), wrt, allow_unused=True)
    gb = torch.autograd.grad(loss(want), wrt, allow_unused=True)
    for k, (a, b) in enumerate(zip(ga, gb)):
        if a is None:  # a skipped convolution's weight (w_t, w_mims), or ct without S: zero gradient
            assert not b.abs().sum(), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda e: f"gradient {k}: {e}")

    def f(x, m, *rest):
        s_ = rest[0] if given_s else None
        return S.MIMBlockStep.apply(x, None, None, None, m, s_, *rest[int(given_s):], stride, padding, 1.0)

    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in wrt], fast_mode=True)
    d = [t.detach() for t in (x, m)]
    d_s = s.detach() if given_s else None
    wd = [t.detach() for t in w]
    torch.library.opcheck(torch.ops.vpfast.mim_block_step, (d[0], None, None, None, d[1], d_s, *wd, stride,
                                                            padding, 1.0))
    outs = torch.ops.vpfast.mim_block_step(d[0], None, None, None, d[1], d_s, *wd, stride, padding, 1.0)
    kept = (outs[3], outs[2], *outs[4:], outs[0], outs[1])
    mask = [True, False, False, False, True, given_s] + [True] * 7
    torch.library.opcheck(torch.ops.vpfast.mim_block_step_backward,
                          (torch.randn_like(outs[0]), None, None, None, d[0], None, None, None, d[1], d_s, *wd, *kept,
                           stride, padding, mask))
