"""The seed papers' other baselines (PredRNN++, MIM, PhyDNet, E3D-LSTM): state_dict contract against
tests/data/keys/, the reference arithmetic rebuilt here step by step from MODELS.md §10-13 on tiny float64
configurations, training losses, statelessness, checkpoints, autocast and the CLI."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpfast import models as M
from vpfast.testing import backend_params, device_for

from model_checks import check_bad_input, check_fast_matches_torch, ref_patch
from reference_keys import key_list

KEY_FILES = dict(predrnnpp="predrnnpp_mmnist", mim="mim_mmnist", phydnet="phydnet_mmnist", e3dlstm="e3dlstm_mmnist")
NEW = tuple(n for n in ("predrnnpp", "mim", "phydnet", "e3dlstm") if n in M.NAMES)
RNNS = tuple(n for n in ("predrnnpp", "mim", "e3dlstm") if n in M.NAMES)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(name, **over):
    """A tiny configuration (16x16 frames, 3 observed, 2 predicted; 3 recurrent layers where it matters)."""
    kw = dict(in_shape=(3, 1, 16, 16), pre_seq_length=3, aft_seq_length=2)
    if name in RNNS:
        kw.update(num_hidden="4,4,4", filter_size=3, patch_size=2)
    kw.update(over)
    return kw


def tiny(name, backend="torch", dtype=torch.float64, **over):
    torch.manual_seed(0)
    m = M.create(name, backend=backend, **tiny_config(name, **over)).to(dtype)
    with torch.no_grad():  # break the zero initialisations (MIM's peepholes) so every path carries signal
        for k, p in m.named_parameters():
            if "norm" in k and k.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.6 / math.sqrt(max(1, p[0].numel() if p.dim() > 1 else 1)))
    return m


def step_input(t, frames, mask, x_gen, pre):
    """§3's input at step t with a full-size scheduled-sampling mask (entry t - pre drives step t >= pre)."""
    if t < pre:
        return frames[:, t]
    return mask[:, t - pre] * frames[:, t] + (1 - mask[:, t - pre]) * x_gen


# ---- state_dict contract --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_mmnist_keys_shapes_and_parameter_count(name):
    count, entries = key_list(f"{KEY_FILES[name]}.txt")
    with torch.device("meta"):
        m = M.create(name, preset="mmnist", backend="torch")
        again = M.create(m.name, backend="torch", **m.config)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == entries
    assert sum(p.numel() for p in m.parameters()) == count
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    with torch.device("meta"):
        M.create(name, preset="small")


@pytest.mark.parametrize("name", NEW)
def test_load_openstl_state_dict(name):
    """A synthetic OpenSTL checkpoint (every reference key, reference shapes, Lightning container) loads
    unchanged into the mmnist preset."""
    _, entries = key_list(f"{KEY_FILES[name]}.txt")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in entries:
        dt = torch.float64 if k.startswith("k2m.") else torch.float32
        alias = k[len("encoder."):]
        # PhyDNet lists its recurrent modules twice (model.phycell is model.encoder.phycell): one tensor each
        sd[k] = sd[alias] if alias in sd else torch.randn(shape, generator=g, dtype=dt)
    with torch.device("meta"):
        model = M.create(name, preset="mmnist", backend="torch")
    model = model.to_empty(device="cpu")
    rep = M.load_checkpoint(model, {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 199})
    assert not rep.missing and not rep.unexpected and not rep.mismatched
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k].to(v.dtype), v), k


# ---- PredRNN++ (MODELS.md §10) ----------------------------------------------------------------------------
def ref_causal_lstm(P, pre, x, h, c, m, k):
    C = h.shape[1]
    conv = lambda t, n: F.conv2d(t, P[pre + n + ".0.weight"], padding=k // 2)  # noqa: E731
    ix, fx, gx, ixp, fxp, gxp, ox = conv(x, "conv_x").split(C, 1)
    ih, fh, gh, oh = conv(h, "conv_h").split(C, 1)
    ic, fc, gc = conv(c, "conv_c").split(C, 1)
    im, fm, mm = conv(m, "conv_m").split(C, 1)
    i, f, g = torch.sigmoid(ix + ih + ic), torch.sigmoid(fx + fh + fc + 1), torch.tanh(gx + gh + gc)
    c2 = f * c + i * g
    ic2m, gc2m, fc2m, oc2m = conv(c2, "conv_c2m").split(C, 1)
    ip, fp, gp = torch.sigmoid(ixp + im + ic2m), torch.sigmoid(fxp + fm + fc2m + 1), torch.tanh(gxp + gc2m)
    m2 = fp * torch.tanh(mm) + ip * gp
    o = torch.tanh(ox + oh + oc2m + conv(m2, "conv_om"))
    h2 = o * torch.tanh(F.conv2d(torch.cat([c2, m2], 1), P[pre + "conv_last.weight"]))
    return h2, c2, m2


def ref_ghu(P, x, z, k):
    C = z.shape[1]
    s = (F.conv2d(x, P["gradient_highway.x_concat.0.weight"], padding=k // 2)
         + F.conv2d(z, P["gradient_highway.z_concat.0.weight"], padding=k // 2))
    p, u = s.split(C, 1)
    u = torch.sigmoid(u)
    return u * torch.tanh(p) + (1 - u) * z


def ref_predrnnpp(model, fp, mask):
    P = dict(model.state_dict())
    cfg = model.config
    k, pre, total, nh = cfg["filter_size"], cfg["pre_seq_length"], cfg["pre_seq_length"] + cfg["aft_seq_length"], \
        cfg["num_hidden"]
    B, _, _, Hp, Wp = fp.shape
    h = [fp.new_zeros(B, n, Hp, Wp) for n in nh]
    c = [fp.new_zeros(B, n, Hp, Wp) for n in nh]
    mem, z = fp.new_zeros(B, nh[0], Hp, Wp), fp.new_zeros(B, nh[0], Hp, Wp)
    preds, x_gen = [], None
    for t in range(total - 1):
        net = step_input(t, fp, mask, x_gen, pre)
        for i in range(len(nh)):
            inp = net if i == 0 else (z if i == 1 else h[i - 1])
            h[i], c[i], mem = ref_causal_lstm(P, f"cell_list.{i}.", inp, h[i], c[i], mem, k)
            if i == 0:
                z = ref_ghu(P, h[0], z, k)
        x_gen = F.conv2d(h[-1], P["conv_last.weight"])
        preds.append(x_gen)
    return torch.stack(preds, 1)


# ---- MIM (MODELS.md §11) ------------------------------------------------------------------------------------
def ref_lstmp(P, pre, x, h, c, k):
    C = c.shape[1]
    ih, gh, fh, oh = F.conv2d(h, P[pre + "conv_h_concat.0.weight"], padding=k // 2).split(C, 1)
    ix, gx, fx, ox = F.conv2d(x, P[pre + "conv_x_concat.0.weight"], padding=k // 2).split(C, 1)
    ct = P[pre + "ct_weight"]
    c2 = torch.sigmoid(fh + fx + c * ct[C:] + 1) * c + torch.sigmoid(ih + ix + c * ct[:C]) * torch.tanh(gh + gx)
    return torch.sigmoid(oh + ox + c2 * P[pre + "oc_weight"]) * torch.tanh(c2), c2


def ref_stlstm(P, pre, x, h, c, m, k):
    C = h.shape[1]
    conv = lambda t, w: F.conv2d(t, P[pre + w], padding=k // 2)  # noqa: E731
    ix, fx, gx, ixp, fxp, gxp, ox = conv(x, "conv_x.0.weight").split(C, 1)
    ih, fh, gh, oh = conv(h, "conv_h.0.weight").split(C, 1)
    im, fm, gm = conv(m, "conv_m.0.weight").split(C, 1)
    c2 = torch.sigmoid(fx + fh + 1.0) * c + torch.sigmoid(ix + ih) * torch.tanh(gx + gh)
    m2 = torch.sigmoid(fxp + fm + 1.0) * m + torch.sigmoid(ixp + im) * torch.tanh(gxp + gm)
    cm = torch.cat([c2, m2], 1)
    o = torch.sigmoid(ox + oh + conv(cm, "conv_o.0.weight"))
    return o * torch.tanh(F.conv2d(cm, P[pre + "conv_last.weight"])), c2, m2


def ref_mim_block(P, pre, x, d, h, c, m, s, k):
    C = h.shape[1]
    conv = lambda t, n: F.conv2d(t, P[pre + n + ".0.weight"], padding=k // 2)  # noqa: E731
    it, gt, ot = conv(h, "conv_t_cc").split(C, 1)
    is_, gs, fs, os_ = conv(m, "conv_s_cc").split(C, 1)
    ix, gx, fx, ox = conv(x, "conv_x_cc").split(C, 1)
    m2 = torch.sigmoid(fx + fs + 1) * m + torch.sigmoid(ix + is_) * torch.tanh(gx + gs)
    T, S = ref_lstmp(P, pre, d, c, s, k)
    c2 = T + torch.sigmoid(ix + it) * torch.tanh(gx + gt)
    h2 = torch.sigmoid(ox + ot + os_) * torch.tanh(F.conv2d(torch.cat([c2, m2], 1), P[pre + "conv_last.weight"]))
    return h2, c2, m2, S


def ref_mim(model, fp, mask, s=None):
    """The reference loop; `s` is the MIM-S state the call starts from (OpenSTL: what the last call left)."""
    P = dict(model.state_dict())
    cfg = model.config
    k, pre, total, nh = cfg["filter_size"], cfg["pre_seq_length"], cfg["pre_seq_length"] + cfg["aft_seq_length"], \
        cfg["num_hidden"]
    L = len(nh)
    B, _, _, Hp, Wp = fp.shape
    z = lambda: fp.new_zeros(B, nh[0], Hp, Wp)  # noqa: E731
    h, c = [z() for _ in nh], [z() for _ in nh]
    hd, cd = [z() for _ in nh[1:]], [z() for _ in nh[1:]]
    s = [z() for _ in nh[1:]] if s is None else list(s)
    mem = z()
    preds, x_gen = [], None
    for t in range(total - 1):
        net = step_input(t, fp, mask, x_gen, pre)
        prev = h[0]
        h[0], c[0], mem = ref_stlstm(P, "stlstm_layer.0.", net, h[0], c[0], mem, k)
        for i in range(1, L):
            if t > 0:
                d_in = h[0] - prev if i == 1 else hd[i - 2]
                hd[i - 1], cd[i - 1] = ref_lstmp(P, f"stlstm_layer_diff.{i - 1}.", d_in, hd[i - 1], cd[i - 1], k)
            h[i], c[i], mem, s[i - 1] = ref_mim_block(P, f"stlstm_layer.{i}.", h[i - 1], hd[i - 1], h[i], c[i], mem,
                                                      s[i - 1], k)
        x_gen = F.conv2d(h[-1], P["conv_last.weight"])
        preds.append(x_gen)
    return torch.stack(preds, 1), s


# ---- E3D-LSTM (MODELS.md §12) ----------------------------------------------------------------------------
def ref_tf_conv3d(x, w):
    """Conv3d without temporal padding, its single time slice repeated to x's window (nearest upsampling)."""
    y = F.conv3d(x, w, padding=(0, w.shape[3] // 2, w.shape[4] // 2))
    return y.repeat(1, 1, x.shape[2] // y.shape[2], 1, 1)


def ref_e3d_cell(P, pre, x, h, c, m, hist):
    B, C = h.shape[:2]
    conv = lambda t, n: ref_tf_conv3d(t, P[pre + n + ".0.conv3d.weight"])  # noqa: E731
    ix, gx, rx, ox, ixp, gxp, fxp = conv(x, "conv_x").split(C, 1)
    ih, gh, rh, oh = conv(h, "conv_h").split(C, 1)
    im, fm, gm, mm = conv(m, "conv_gm").split(C, 1)
    i, r, g = torch.sigmoid(ix + ih), torch.sigmoid(rx + rh), torch.tanh(gx + gh)
    # recall: rows of C consecutive values of the (C, T, H, W)-flattened maps; keys = values = the history
    q, kv = r.flatten(1).unflatten(1, (-1, C)), hist.flatten(1).unflatten(1, (-1, C))
    rec = (torch.softmax(torch.einsum("bnc,bkc->bnk", q, kv), dim=2) @ kv).flatten(1).view(r.shape)
    c2 = F.layer_norm(c + rec, tuple(c.shape[1:]), P[pre + "_norm_c_t.weight"], P[pre + "_norm_c_t.bias"], 1e-5) \
        + i * g
    m2 = torch.sigmoid(fxp + fm + 1) * torch.tanh(mm) + torch.sigmoid(ixp + im) * torch.tanh(gxp + gm)
    o = torch.tanh(ox + oh + conv(c2, "conv_new_cell") + conv(m2, "conv_new_gm"))
    h2 = torch.tanh(ref_tf_conv3d(torch.cat([c2, m2], 1), P[pre + "conv_last.conv3d.weight"])) * torch.sigmoid(o)
    return h2, c2, m  # the reference hands back the memory it was given


def ref_e3dlstm(model, fp, mask):
    P = dict(model.state_dict())
    cfg = model.config
    pre, total, nh = cfg["pre_seq_length"], cfg["pre_seq_length"] + cfg["aft_seq_length"], cfg["num_hidden"]
    B, _, _, Hp, Wp = fp.shape
    h = [fp.new_zeros(B, n, 2, Hp, Wp) for n in nh]
    c = [fp.new_zeros(B, n, 2, Hp, Wp) for n in nh]
    mem = fp.new_zeros(B, nh[0], 2, Hp, Wp)
    hist = [None] * len(nh)
    prev = torch.zeros_like(fp[:, 0])
    preds, x_gen = [], None
    for t in range(total - 1):
        net = step_input(t, fp, mask, x_gen, pre)
        window = torch.stack([prev, net], 2)
        prev = net
        for i in range(len(nh)):
            hist[i] = c[i] if hist[i] is None else torch.cat([hist[i], c[i]], 1)
            h[i], c[i], mem = ref_e3d_cell(P, f"cell_list.{i}.", window if i == 0 else h[i - 1], h[i], c[i], mem,
                                           hist[i])
        x_gen = F.conv3d(h[-1], P["conv_last.weight"], stride=(2, 1, 1)).squeeze(2)
        preds.append(x_gen)
    return torch.stack(preds, 1)


def test_e3dlstm_memory_quirk_and_option():
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    grads = {}
    for upd in (False, True):
        m = tiny("e3dlstm", update_memory=upd).train()
        m.training_loss(frames, 60000)[0].backward()
        C = m.num_hidden[0]
        grads[upd] = (m.cell_list[1].conv_gm[0].conv3d.weight.grad, m.cell_list[1].conv_x[0].conv3d.weight.grad)
    gm, gx = grads[False]
    # OpenSTL: the global memory stays zero, so conv_gm and the f' rows of conv_x learn nothing
    assert gm.abs().max() == 0 and gx[6 * C:].abs().max() == 0 and gx[:6 * C].abs().max() > 0
    gm, gx = grads[True]
    assert gm.abs().max() > 0 and gx[6 * C:].abs().max() > 0
    with pytest.raises(ValueError, match="layer_norm"):
        M.create("e3dlstm", layer_norm=True, **tiny_config("e3dlstm"))
    # both time slices of every gate are equal (the 2-frame kernel yields one slice, repeated)
    cell = m.cell_list[0]
    y = cell.conv_x(torch.rand(1, 4, 2, 8, 8, dtype=torch.float64))
    assert torch.equal(y[:, :, 0], y[:, :, 1])


def test_e3dlstm_fused_recall_matches_bmm_softmax():
    """The fast backends' recall (scaled_dot_product_attention, scale 1) against the written-out one: odd
    sizes, values, gradients of both inputs, and under CPU bf16 autocast with a float32 history."""
    from vpfast.nn.e3dlstm import recall
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 2, 5, 3, dtype=torch.float64, generator=g).requires_grad_()
    hist = torch.randn(2, 9, 2, 5, 3, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(2, 3, 2, 5, 3, dtype=torch.float64, generator=g)
    res = []
    for fused in (False, True):
        y = recall(q, hist, fused=fused)
        res.append((y, *torch.autograd.grad((y * w).sum(), (q, hist))))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = (recall(q.detach().to(torch.bfloat16), hist.detach().float(), fused=f) for f in (False, True))
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)


REF_RNN = {"predrnnpp": ref_predrnnpp, "mim": lambda m, fp, mask: ref_mim(m, fp, mask)[0], "e3dlstm": ref_e3dlstm}


@pytest.mark.parametrize("name", RNNS)
def test_rnn_reproduces_reference_arithmetic(name):
    model = tiny(name).train()
    cfg = model.config
    p, pre, aft = cfg["patch_size"], cfg["pre_seq_length"], cfg["aft_seq_length"]
    torch.manual_seed(1)
    frames = torch.rand(2, pre + aft, 1, 16, 16, dtype=torch.float64)
    fp = ref_patch(frames, p)
    mask = (torch.rand(2, aft - 1, 1, 1, 1) < 0.5).double()
    want = REF_RNN[name](model, fp, mask.expand(2, aft - 1, *fp.shape[2:]))
    torch.testing.assert_close(model.rollout(fp, mask), want, rtol=1e-10, atol=1e-12)
    # training loss: MSE over all T_total - 1 patch-space predictions, with the mask of iteration itr
    loss, logs = model.training_loss(frames, itr=20000, generator=torch.Generator().manual_seed(5))
    mk, probs = model.sampling_mask(2, 20000, frames, torch.Generator().manual_seed(5))
    assert probs["eta"] == pytest.approx(1 - 2e-5 * 20001)
    preds = REF_RNN[name](model, fp, mk.expand(2, aft - 1, *fp.shape[2:]))
    want_loss = F.mse_loss(preds, fp[:, 1:])
    if name == "e3dlstm":  # MSE + L1
        want_loss = want_loss + F.l1_loss(preds, fp[:, 1:])
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert logs["loss"] == pytest.approx(loss.item())
    # test time: own predictions after the observed frames; the future must not leak in
    model.eval()
    noisy = fp.clone()
    noisy[:, pre:] = 123.0
    want_test = REF_RNN[name](model, noisy, torch.zeros(2, aft - 1, *fp.shape[2:], dtype=torch.float64))
    y = model(frames[:, :pre])
    assert y.shape == (2, aft, 1, 16, 16)
    torch.testing.assert_close(M.patch(y, p), want_test[:, pre - 1:], rtol=1e-10, atol=1e-12)


def test_predrnnpp_ghu_init_and_layer_norm():
    m = M.create("predrnnpp", **tiny_config("predrnnpp"))
    for n in ("x_concat", "z_concat"):
        w = getattr(m.gradient_highway, n)[0].weight
        assert w.abs().max() <= 0.001
    # OpenSTL's layer_norm configuration cannot run (its GHU norm is declared over C channels); ours does
    ln = M.create("predrnnpp", layer_norm=True, **tiny_config("predrnnpp")).double()
    assert ln.state_dict()["gradient_highway.z_concat.1.weight"].shape == (8, 8, 8)
    assert ln.state_dict()["cell_list.0.conv_c2m.1.weight"].shape == (16, 8, 8)
    y = ln(torch.rand(2, 3, 1, 16, 16, dtype=torch.float64))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="at least 2 layers"):
        M.create("predrnnpp", num_hidden="8")


def _fused_output_case(kind):
    """(module maker, inputs, expected stlstm_output calls) for the layers whose output stage is fused."""
    import vpfast.nn.causal_lstm as cl
    import vpfast.nn.mim as mim
    g = torch.Generator().manual_seed(0)
    state = lambda c: torch.randn(2, c, 7, 5, dtype=torch.float64, generator=g)  # noqa: E731
    if kind.startswith("ghu"):
        # the merged GHU (no LayerNorm) runs the stlstm_output kernels inside its one-node step (_GHUStep)
        return cl, (lambda b: cl.GHU(3, 4, 7, 5, 3, 1, kind == "ghu_ln", initializer=0.3, backend=b)), \
            (state(3), state(4)), 0 if kind == "ghu" else 1
    if kind == "mimn":
        return mim, (lambda b: mim.MIMN(3, 4, 7, 5, 3, 1, backend=b)), (state(3), state(4), state(4)), 1
    return mim, (lambda b: mim.MIMBlock(4, 4, 7, 5, 3, 1, backend=b)), tuple(state(4) for _ in range(6)), 2


@pytest.mark.parametrize("kind", ["ghu", "ghu_ln", "mimn", "mim_block"])
def test_fused_output_stage_matches_reference(monkeypatch, kind):
    """GHU, MIM-N and the MIM block (its block output and its MIM-S) run stlstm_output on the fast backends:
    values and gradients (inputs and parameters, peepholes included) equal the reference arithmetic in float64
    on an odd shape, and the fused op is what ran. MIM-N and the MIM block on the multi-node path (their
    one-node steps call the kernel directly: test_mim_one_node_steps)."""
    module, make, inputs, expected = _fused_output_case(kind)
    if kind.startswith("mim"):
        import vpfast.nn._mim_step as mim_step
        monkeypatch.setattr(mim_step, "usable", lambda *a: False)
    calls, op = [], module.stlstm_output
    monkeypatch.setattr(module, "stlstm_output", lambda *a, **k: calls.append(1) or op(*a, **k))
    res = []
    for backend in ("torch", None):
        torch.manual_seed(0)
        layer = make(backend).double()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.3)
        xs = [t.clone().requires_grad_() for t in inputs]
        ys = layer(*xs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        loss = sum((y * y).sum() for y in ys)
        if backend is None and kind == "ghu":
            assert type(ys[0].grad_fn).__name__ == "_GHUStepBackward"
        res.append((*ys, *torch.autograd.grad(loss, xs + list(layer.parameters()), allow_unused=True)))
    assert len(calls) == expected
    for a, b in zip(*res):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


def test_predrnnpp_unused_conv_gets_no_gradient():
    m = tiny("predrnnpp").train()
    loss, _ = m.training_loss(torch.rand(2, 5, 1, 16, 16, dtype=torch.float64), 0)
    loss.backward()
    assert m.cell_list[0].conv_o[0].weight.grad is None
    assert m.cell_list[0].conv_c2m[0].weight.grad.abs().sum() > 0


def test_mim_is_stateless_and_can_reproduce_the_carried_state():
    model = tiny("mim").train()
    p = model.config["patch_size"]
    torch.manual_seed(3)
    a, b = (torch.rand(2, 5, 1, 16, 16, dtype=torch.float64) for _ in range(2))
    fa, fb = ref_patch(a, p), ref_patch(b, p)
    mask = torch.zeros(2, 1, 1, 1, 1, dtype=torch.float64)
    full = mask.expand(2, 1, *fa.shape[2:])
    # same input twice: same output (OpenSTL's would differ: its S carries over)
    torch.testing.assert_close(model.rollout(fa, mask), model.rollout(fa, mask), rtol=0, atol=0)
    # a new batch size works (OpenSTL's carried S of batch 2 cannot take batch 3)
    assert model.rollout(torch.cat([fa, fa[:1]]), torch.cat([mask, mask[:1]])).shape[0] == 3
    # OpenSTL's two consecutive calls, S carried from the first into the second, rebuilt by threading the state
    want_a, s_ref = ref_mim(model, fa, full)
    want_b, _ = ref_mim(model, fb, full, s_ref)
    got_a, s = model.rollout_with_state(fa, mask)
    got_b, _ = model.rollout_with_state(fb, mask, s)
    torch.testing.assert_close(got_a, want_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_b, want_b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got_b, model.rollout(fb, mask))
    y, s2 = model.eval().forward_with_state(b[:, :3], s)
    assert y.shape == (2, 2, 1, 16, 16) and len(s2) == 2
    with pytest.raises(ValueError, match="s_state"):
        model.rollout_with_state(fa, mask, s[:1])


def test_mim_s_bptt_option():
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    grads = []
    for bptt in (False, True):
        m = tiny("mim", s_bptt=bptt).train()
        loss, _ = m.training_loss(frames, 60000)  # eta 0: no random mask
        loss.backward()
        grads.append((loss.detach(), m.stlstm_layer[1].conv_h_concat[0].weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=0)  # same forward
    assert not torch.allclose(grads[0][1], grads[1][1])  # different gradients: BPTT through S
    # MIM-N's conv_last is built but never used
    m = tiny("mim").train()
    m.training_loss(frames, 0)[0].backward()
    assert m.stlstm_layer_diff[0].conv_last.weight.grad is None


def test_mim_bad_config_and_input():
    with pytest.raises(ValueError, match="layer_norm"):
        M.create("mim", layer_norm=True, **tiny_config("mim"))
    with pytest.raises(ValueError, match="equal num_hidden"):
        M.create("mim", **tiny_config("mim", num_hidden="4,8"))
    m = tiny("mim")
    with pytest.raises(ValueError, match="16x16"):
        m(torch.rand(1, 3, 1, 32, 32, dtype=torch.float64))


def _mim_cell(kind, backend, merge):
    import vpfast.nn.mim as mim
    if kind == "mimn":
        return mim.MIMN(3, 4, 7, 5, 3, 1, backend=backend, merge_convs=merge)
    return mim.MIMBlock(4, 4, 7, 5, 3, 1, backend=backend, merge_convs=merge)


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kind", ["mimn", "mim_block"])
def test_mim_fast_cells_match_reference(kind, merge):
    """MIM-N and the MIM block on the fast path (merged or separate convolutions, reordered gates, in-place
    peepholes, convlstm / stlstm_gates / stlstm_output) against backend="torch" in float64 on an odd shape:
    every output and the gradients of every input and parameter; inside and outside an unroll."""
    g = torch.Generator().manual_seed(0)
    n_in, C = (3, 4) if kind == "mimn" else (4, 4)
    states = [torch.randn(2, n_in if j == 0 else C, 7, 5, dtype=torch.float64, generator=g)
              for j in range(3 if kind == "mimn" else 6)]
    res = []
    for backend, unroll in (("torch", False), (None, False), (None, True)):
        torch.manual_seed(0)
        cell = _mim_cell(kind, backend, merge).double()
        assert backend == "torch" or cell.merge_convs == merge
        with torch.no_grad():
            for p in cell.parameters():
                p.normal_(0, 0.3)
        xs = [t.clone().requires_grad_() for t in states]
        with cell.unroll() if unroll else contextlib.nullcontext():
            ys = cell(*xs)
            # a second step from the first's states (inside the unroll: the cached weights are reused)
            ys2 = cell(xs[0], xs[1], *ys) if kind == "mim_block" else cell(xs[0], *ys)
        loss = sum((y * y.sin()).sum() for y in (*ys, *ys2))
        params = [p for k, p in cell.named_parameters() if "conv_last" not in k or kind == "mim_block"]
        res.append((*ys2, *torch.autograd.grad(loss, xs + params)))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("merge", [False, True])
def test_mim_fast_model_matches_torch_merge_on_off(merge):
    """The MIM model's fast path with its MIM cells' convolutions merged or not (the small presets merge, the
    Moving-MNIST ones do not): training loss, every parameter's gradient and the prediction equal backend="torch"."""
    def build(name, backend="torch"):
        m = tiny(name, backend=backend)
        for cell in (*m.stlstm_layer[1:], *m.stlstm_layer_diff):
            cell.merge_convs = merge
        return m
    check_fast_matches_torch(build, "mim", lambda m, frames: m.training_loss(
        frames, 10, generator=torch.Generator().manual_seed(3))[0])


# ---- PhyDNet (MODELS.md §13) ---------------------------------------------------------------------------------
def ref_block(P, pre, x, stride, up=False):
    if up:
        y = F.conv_transpose2d(x, P[pre + "main.0.weight"], P[pre + "main.0.bias"], stride=stride, padding=1,
                               output_padding=1 if stride == 2 else 0)
    else:
        y = F.conv2d(x, P[pre + "main.0.weight"], P[pre + "main.0.bias"], stride=stride, padding=1)
    return F.leaky_relu(F.group_norm(y, 16, P[pre + "main.1.weight"], P[pre + "main.1.bias"]), 0.2)


def ref_phydnet_step(P, frame, state, p):
    E = "encoder."
    e = ref_block(P, E + "encoder_E.c3.", ref_block(P, E + "encoder_E.c2.", ref_block(
        P, E + "encoder_E.c1.", frame, 2), 1), p // 2)
    ep = ref_block(P, E + "encoder_Ep.c2.", ref_block(P, E + "encoder_Ep.c1.", e, 1), 1)
    er = ref_block(P, E + "encoder_Er.c2.", ref_block(P, E + "encoder_Er.c1.", e, 1), 1)
    Hp, hs, cs = state
    q = "phycell.cell_list.0."
    K = torch.sigmoid(F.conv2d(torch.cat([ep, Hp], 1), P[q + "convgate.weight"], P[q + "convgate.bias"], padding=1))
    f = F.conv2d(Hp, P[q + "F.conv1.weight"], P[q + "F.conv1.bias"], padding=3)
    f = F.group_norm(f, 7, P[q + "F.bn1.weight"], P[q + "F.bn1.bias"])
    tilde = Hp + F.conv2d(f, P[q + "F.conv2.weight"], P[q + "F.conv2.bias"])
    Hp = tilde + K * (ep - tilde)
    hs, cs = list(hs), list(cs)
    for j in range(3):
        inp = er if j == 0 else hs[j - 1]
        C = hs[j].shape[1]
        i, f_, o, g = F.conv2d(torch.cat([inp, hs[j]], 1), P[f"convcell.cell_list.{j}.conv.weight"],
                               P[f"convcell.cell_list.{j}.conv.bias"], padding=1).split(C, 1)
        cs[j] = torch.sigmoid(f_) * cs[j] + torch.sigmoid(i) * torch.tanh(g)
        hs[j] = torch.sigmoid(o) * torch.tanh(cs[j])
    dp = ref_block(P, E + "decoder_Dp.upc2.", ref_block(P, E + "decoder_Dp.upc1.", Hp, 1, True), 1, True)
    dr = ref_block(P, E + "decoder_Dr.upc2.", ref_block(P, E + "decoder_Dr.upc1.", hs[-1], 1, True), 1, True)
    d = ref_block(P, E + "decoder_D.upc2.", ref_block(P, E + "decoder_D.upc1.", dp + dr, 2, True), 1, True)
    s = p // 2
    out = F.conv_transpose2d(d, P[E + "decoder_D.upc3.weight"], P[E + "decoder_D.upc3.bias"], stride=s, padding=1,
                             output_padding=1 if s == 2 else 0)
    return torch.sigmoid(out), (Hp, hs, cs)


def ref_phydnet(model, frames, forced):
    """(predictions of the decoder phase, L = Σ step MSEs + moment loss) as OpenSTL's forward computes them."""
    P = dict(model.state_dict())
    pre, aft, p = model.config["pre_seq_length"], model.config["aft_seq_length"], model.config["patch_size"]
    B, _, _, H, W = frames.shape
    z = lambda c: frames.new_zeros(B, c, H // p, W // p)  # noqa: E731
    state = (z(64), [z(128), z(128), z(64)], [z(128), z(128), z(64)])
    L = 0
    for ei in range(pre - 1):
        out, state = ref_phydnet_step(P, frames[:, ei], state, p)
        L = L + F.mse_loss(out, frames[:, ei + 1])
    inp, preds = frames[:, pre - 1], []
    for di in range(aft):
        out, state = ref_phydnet_step(P, inp, state, p)
        preds.append(out)
        L = L + F.mse_loss(out, frames[:, pre + di])
        inp = frames[:, pre + di] if forced else out
    # K2M: moment (a, b) of a 7x7 kernel k = Σ_ij k[i, j] (i - 3)^a (j - 3)^b / (a! b!); targets one-hot
    r = torch.arange(7, dtype=torch.float64) - 3
    Mm = torch.stack([r ** a / math.factorial(a) for a in range(7)])
    Wt = P["phycell.cell_list.0.F.conv1.weight"]
    for b in range(Wt.shape[1]):
        mom = Mm @ Wt[:, b].double() @ Mm.t()
        L = L + F.mse_loss(mom.to(Wt.dtype), torch.eye(49, dtype=Wt.dtype).view(49, 7, 7))
    return torch.stack(preds, 1), L


def test_phydnet_reproduces_reference_arithmetic():
    model = tiny("phydnet").train()
    torch.manual_seed(1)
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    # epoch 0: teacher forcing with probability 1; epoch 400: ratio max(0, 1 - 0.003 * 400) = 0
    for epoch, forced in ((0, True), (400, False)):
        preds, L = ref_phydnet(model, frames, forced)
        loss, logs = model.training_loss(frames, itr=epoch * 625)
        assert logs["teacher_forcing"] == float(forced) and logs["tf_ratio"] == max(0.0, 1 - 0.003 * epoch)
        torch.testing.assert_close(loss, L, rtol=1e-10, atol=1e-12)
        assert logs["phydnet_loss"] == pytest.approx(L.item())
    assert model.teacher_forcing_ratio(100) == pytest.approx(0.7)
    # test time: the decoder phase fed with its own outputs; future frames do not leak in
    noisy = frames.clone()
    noisy[:, 3:] = 123.0
    want, _ = ref_phydnet(model, noisy, False)
    torch.testing.assert_close(model.eval()(frames[:, :3]), want, rtol=1e-10, atol=1e-12)
    # the moment loss alone: the vectorised form (fast backends) equals the reference's loop
    fast = tiny("phydnet", backend=None)
    torch.testing.assert_close(fast.moment_loss(), model.moment_loss(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["forced", "free", "defer_all", "defer_none"])
def test_phydnet_fast_path_matches_torch(case, monkeypatch):
    """The fast path (frames known in advance encoded in one batch, outputs not fed back decoded in one batch,
    DCGAN chains, ConvLSTM weight gradients batched over the steps) against backend="torch": loss, every
    parameter's gradient and the prediction, with and without teacher forcing (free: the decoder phase feeds its
    own outputs back) and with the deferred weight gradients in every / no ConvLSTM layer."""
    import vpfast.nn.phydnet as ph
    encodes = []
    encode = ph.PhyDEncoderRNN.encode
    monkeypatch.setattr(ph.PhyDEncoderRNN, "encode", lambda self, f: encodes.append(f.shape[0]) or encode(self, f))

    def build(name, backend="torch"):
        m = tiny(name, backend=backend)
        for cell in m.convcell.cell_list:
            cell.defer_weight_grad = {"defer_all": True, "defer_none": False}.get(case, cell.defer_weight_grad)
        return m
    epoch = 400 if case == "free" else 0  # teacher forcing with probability max(0, 1 - 0.003 epoch)
    check_fast_matches_torch(build, "phydnet", lambda m, frames: m.training_loss(frames, 0, epoch=epoch)[0])
    # the reference encodes frame by frame (2 x 4 steps, 2 x 4 eval); the fast path encodes the frames known in
    # advance at once: all 4 steps when forced, else the 3 observed ones and then each fed-back output
    B = 2
    fast = encodes[8:]
    assert encodes[:8] == [B] * 8
    train = [4 * B] if case != "free" else [3 * B, B]
    assert fast == train + [3 * B, B]  # eval: 3 observed frames, then 1 fed-back prediction


def test_phydnet_fast_path_saves_less():
    """The fast path's training step keeps less for backward than the reference's (small preset, batch 1): the
    unique bytes of the saved tensors (autograd's saved-tensor hooks)."""
    frames = torch.rand(1, 20, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    saved = []
    for backend in ("torch", None):
        torch.manual_seed(0)
        m = M.create("phydnet", preset="small", in_shape=(10, 1, 64, 64), backend=backend).train()
        seen = {p.untyped_storage().data_ptr() for p in m.parameters()}
        total = [0]

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total[0] += st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.training_loss(frames, 0)
        saved.append(total[0])
    assert saved[1] < 0.8 * saved[0], saved


def test_phydnet_openstl_objective_and_aliases():
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    grads = []
    for openstl in (False, True):
        m = tiny("phydnet", openstl_objective=openstl).train()
        loss, logs = m.training_loss(frames, 0, epoch=1000)
        loss.backward()
        grads.append((logs["phydnet_loss"], loss.detach(), m.encoder.decoder_D.upc3.bias.grad.clone()))
    (L, l0, g0), (L1, l1, g1) = grads
    assert L == pytest.approx(L1) and l0.item() == pytest.approx(L)
    y = frames[:, 3:]
    assert l1.item() == pytest.approx(((L - y) ** 2).mean().item())
    # OpenSTL's objective back-propagates 2 (L - mean(y)) times L's gradient
    torch.testing.assert_close(g1, 2 * (L - y.mean()) * g0, rtol=1e-9, atol=1e-12)
    # the recurrent modules are listed twice in the state_dict and counted once
    sd = m.state_dict()
    assert sd["phycell.cell_list.0.F.conv1.weight"].data_ptr() == sd["encoder.phycell.cell_list.0.F.conv1.weight"] \
        .data_ptr()
    assert m.encoder.convcell is m.convcell and sd["k2m._M0"].dtype == torch.float64
    with pytest.raises(ValueError, match="patch_size must be 2 or 4"):
        M.create("phydnet", patch_size=1)
    assert M.create("phydnet", in_shape=(3, 1, 16, 16), patch_size=2)(torch.rand(1, 3, 1, 16, 16)).shape == \
        (1, 3, 1, 16, 16)


def test_accelerate_swaps_openstl_phydnet_convlstm_cell():
    """An OpenSTL-style PhyD_ConvLSTM_Cell (same constructor, keys and forward(x, (h, c))) is swapped for
    vpfast.nn.PhyDConvLSTMCell sharing its parameters; the step is unchanged."""
    import vpfast
    from torch import nn

    class PhyD_ConvLSTM_Cell(nn.Module):  # MODELS.md §13's cell, as OpenSTL constructs it
        def __init__(self, input_shape, input_dim, hidden_dim, kernel_size, bias=1):
            super().__init__()
            self.height, self.width = input_shape
            self.input_dim, self.hidden_dim, self.kernel_size = input_dim, hidden_dim, kernel_size
            self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size,
                                  padding=(kernel_size[0] // 2, kernel_size[1] // 2), bias=bool(bias))

        def forward(self, x, hidden):
            h, c = hidden
            i, f, o, g = self.conv(torch.cat([x, h], 1)).split(self.hidden_dim, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c

    torch.manual_seed(0)
    holder = nn.Module()
    holder.cell = PhyD_ConvLSTM_Cell((8, 8), 6, 4, (3, 3)).double()
    x, h, c = (torch.randn(2, n, 8, 8, dtype=torch.float64) for n in (6, 4, 4))
    want = holder.cell(x, (h, c))
    w = holder.cell.conv.weight
    rep = vpfast.accelerate(holder)
    assert rep.swapped == [("cell", "PhyD_ConvLSTM_Cell", "PhyDConvLSTMCell")]
    assert holder.cell.conv.weight is w
    for a, b in zip(holder.cell(x, (h, c)), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_accelerate_swaps_openstl_e3d_cell():
    """An OpenSTL-structured Eidetic3DLSTMCell (tf_Conv3d in nn.Sequential, _norm_c_t; forward as MODELS.md
    §12, the reference returning the memory it was given) is swapped for vpfast's, sharing its parameters:
    outputs and gradients unchanged; gate LayerNorms (layer_norm=True) are left alone with a reason."""
    import vpfast
    from torch import nn

    class tf_Conv3d(nn.Module):  # noqa: N801  (OpenSTL's name)
        def __init__(self, cin, cout, k, stride, padding):
            super().__init__()
            self.conv3d = nn.Conv3d(cin, cout, k, stride=stride, padding=padding, bias=False)

    class Eidetic3DLSTMCell(nn.Module):  # OpenSTL's constructor and structure
        def __init__(self, in_channel, num_hidden, window_length, height, width, filter_size, stride, layer_norm):
            super().__init__()
            C, pad = num_hidden, (0, filter_size[1] // 2, filter_size[2] // 2)
            self._norm_c_t = nn.LayerNorm([C, window_length, height, width])
            self._forget_bias = 1.0

            def conv(cin, cout):
                ln = [nn.LayerNorm([cout, window_length, height, width])] if layer_norm else []
                return nn.Sequential(tf_Conv3d(cin, cout, filter_size, stride, pad), *ln)
            self.conv_x, self.conv_h, self.conv_gm = conv(in_channel, 7 * C), conv(C, 4 * C), conv(C, 4 * C)
            self.conv_new_cell, self.conv_new_gm = conv(C, C), conv(C, C)
            self.conv_last = tf_Conv3d(2 * C, C, (1, 1, 1), 1, 0)

        def forward(self, x, h, c, m, history):
            return ref_e3d_cell(self.state_dict(keep_vars=True), "", x, h, c, m, history)

    torch.manual_seed(0)
    holder = nn.Module()
    holder.cell = Eidetic3DLSTMCell(3, 4, 2, 6, 5, (2, 3, 3), 1, False).double()
    holder.ln = Eidetic3DLSTMCell(3, 4, 2, 6, 5, (2, 3, 3), 1, True).double()
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_(0, 0.5)
    x, h, c, m = (torch.randn(2, n, 2, 6, 5, dtype=torch.float64) for n in (3, 4, 4, 4))
    hist = torch.randn(2, 12, 2, 6, 5, dtype=torch.float64)
    res = []
    for swap in (False, True):
        if swap:
            w = holder.cell.conv_x[0].conv3d.weight
            rep = vpfast.accelerate(holder)
            assert rep.swapped == [("cell", "Eidetic3DLSTMCell", "Eidetic3DLSTMCell")]
            assert [(p, why[:13]) for p, _, why in rep.left] == [("ln", "conv_x has ga")]
            assert type(holder.cell).__module__ == "vpfast.nn.e3dlstm" and holder.cell.conv_x[0].conv3d.weight is w
        outs = holder.cell(x, h, c, m, hist)
        grads = torch.autograd.grad(sum(o.sum() for o in outs[:2]), list(holder.cell.parameters()), allow_unused=True)
        res.append((outs, grads))
    for a, b in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


def _accelerate_unchanged(holder, name, inputs, swapped, left, backend=None):
    """vpfast.accelerate(holder, backend) swaps holder.<name> as `swapped` says and leaves `left` (paths); the
    swapped layer's outputs and parameter gradients equal the original's (float64)."""
    import vpfast
    torch.manual_seed(0)
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_(0, 0.5)
    res = []
    for swap in (False, True):
        if swap:
            params = list(getattr(holder, name).parameters())
            rep = vpfast.accelerate(holder, backend=backend)
            assert rep.swapped == swapped and [p for p, _, _ in rep.left] == left, rep
            assert all(a is b for a, b in zip(getattr(holder, name).parameters(), params))
        ys = getattr(holder, name)(*inputs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        res.append((*ys, *torch.autograd.grad(sum(y.square().sum() for y in ys),
                                              list(getattr(holder, name).parameters()), allow_unused=True)))
    for a, b in zip(*res):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    return rep


def _openstl_conv_block(cin, cout, k, stride, norm_shape=None):
    from torch import nn
    ln = [nn.LayerNorm(norm_shape)] if norm_shape else []
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), *ln)


def test_accelerate_swaps_openstl_ghu():
    """OpenSTL's GHU (MODELS.md §10: x_concat / z_concat as nn.Sequential, forward(x, z)) is swapped for
    vpfast.nn.GHU sharing its parameters, outputs and gradients unchanged; OpenSTL's layer_norm GHU (its
    LayerNorm declared over C of the 2C channels) is left alone with the shapes as the reason."""
    from torch import nn

    class GHU(nn.Module):  # OpenSTL's constructor and structure
        def __init__(self, in_channel, num_hidden, height, width, filter_size, stride, layer_norm,
                     initializer=0.001):
            super().__init__()
            C, k = num_hidden, filter_size
            ln = [C, height, width] if layer_norm else None
            self.num_hidden = C
            self.z_concat = _openstl_conv_block(C, 2 * C, k, stride, ln)
            self.x_concat = _openstl_conv_block(in_channel, 2 * C, k, stride, ln)

        def forward(self, x, z):
            p, u = torch.split(self.x_concat(x) + self.z_concat(z), self.num_hidden, dim=1)
            u = torch.sigmoid(u)
            return u * torch.tanh(p) + (1 - u) * z

    holder = nn.Module()
    holder.ghu, holder.ln = GHU(3, 4, 7, 5, 3, 1, False).double(), GHU(3, 4, 7, 5, 3, 1, True)
    x, z = torch.randn(2, 3, 7, 5, dtype=torch.float64), torch.randn(2, 4, 7, 5, dtype=torch.float64)
    rep = _accelerate_unchanged(holder, "ghu", (x, z), [("ghu", "GHU", "GHU")], ["ln"])
    assert "shape" in rep.left[0][2] and type(holder.ghu).__module__ == "vpfast.nn.causal_lstm"


def test_accelerate_swaps_openstl_mimn_and_leaves_mim_block():
    """OpenSTL's MIMN (peephole LSTM, forward(x, h, c) -> (h, c), MODELS.md §11) is swapped for vpfast.nn.MIMN,
    outputs and gradients unchanged; OpenSTL's MIMBlock, which keeps S on the module, is left with a reason."""
    from torch import nn

    class MIMN(nn.Module):  # OpenSTL's constructor and structure
        def __init__(self, in_channel, num_hidden, height, width, filter_size, stride, layer_norm=False):
            super().__init__()
            C, k = num_hidden, filter_size
            self.num_hidden, self._forget_bias = C, 1.0
            self.ct_weight = nn.Parameter(torch.zeros(2 * C, height, width))
            self.oc_weight = nn.Parameter(torch.zeros(C, height, width))
            self.conv_h_concat = _openstl_conv_block(C, 4 * C, k, stride)
            self.conv_x_concat = _openstl_conv_block(in_channel, 4 * C, k, stride)
            self.conv_last = nn.Conv2d(2 * C, C, 1, 1, 0, bias=False)

        def forward(self, x, h, c):
            P = self.state_dict(keep_vars=True)
            return ref_lstmp({"m." + k: v for k, v in P.items()}, "m.", x, h, c, self.conv_h_concat[0].kernel_size[0])

    class MIMBlock(nn.Module):
        pass

    holder = nn.Module()
    holder.mimn, holder.block = MIMN(3, 4, 7, 5, 3, 1).double(), MIMBlock()
    x, h, c = (torch.randn(2, n, 7, 5, dtype=torch.float64) for n in (3, 4, 4))
    rep = _accelerate_unchanged(holder, "mimn", (x, h, c), [("mimn", "MIMN", "MIMN")], ["block"])
    assert "stateful" in rep.left[0][2] and type(holder.mimn).__module__ == "vpfast.nn.mim"


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("backend", [None] + backend_params("causal_lstm_cell"))
def test_accelerate_swaps_openstl_causal_lstm_cell(backend, layer_norm):
    """OpenSTL's PredRNN++ CausalLSTMCell (MODELS.md §10: seven k x k convolutions in nn.Sequential, with or
    without their LayerNorms, the unused conv_o, a 1x1 conv_last; forward(x, h, c, m) -> (h, c, m)) is swapped
    for vpfast.nn.CausalLSTMCell sharing its parameters, outputs and gradients unchanged with the default backend
    and each fused one; a cell whose convolution has a bias (the TF original's) is left alone with a reason."""
    from torch import nn

    class CausalLSTMCell(nn.Module):  # OpenSTL's constructor and structure
        def __init__(self, in_channel, num_hidden, height, width, filter_size, stride, layer_norm):
            super().__init__()
            C, k = num_hidden, filter_size
            self.num_hidden, self._forget_bias = C, 1.0

            def block(cin, cout):
                return _openstl_conv_block(cin, cout, k, stride, [cout, height, width] if layer_norm else None)
            self.conv_x, self.conv_h, self.conv_c = block(in_channel, 7 * C), block(C, 4 * C), block(C, 3 * C)
            self.conv_m, self.conv_o = block(C, 3 * C), block(2 * C, C)
            self.conv_c2m, self.conv_om = block(C, 4 * C), block(C, C)
            self.conv_last = nn.Conv2d(2 * C, C, 1, 1, 0, bias=False)

        def forward(self, x_t, h_t, c_t, m_t):
            C, fb = self.num_hidden, self._forget_bias
            i_x, f_x, g_x, i_xp, f_xp, g_xp, o_x = torch.split(self.conv_x(x_t), C, dim=1)
            i_h, f_h, g_h, o_h = torch.split(self.conv_h(h_t), C, dim=1)
            i_c, f_c, g_c = torch.split(self.conv_c(c_t), C, dim=1)
            i_m, f_m, m_hat = torch.split(self.conv_m(m_t), C, dim=1)
            c_new = torch.sigmoid(f_x + f_h + f_c + fb) * c_t + torch.sigmoid(i_x + i_h + i_c) * torch.tanh(
                g_x + g_h + g_c)
            i_k, g_k, f_k, o_k = torch.split(self.conv_c2m(c_new), C, dim=1)  # i', g', f', o
            m_new = torch.sigmoid(f_xp + f_m + f_k + fb) * torch.tanh(m_hat) + torch.sigmoid(
                i_xp + i_m + i_k) * torch.tanh(g_xp + g_k)
            o_t = torch.tanh(o_x + o_h + o_k + self.conv_om(m_new))
            h_new = o_t * torch.tanh(self.conv_last(torch.cat([c_new, m_new], 1)))
            return h_new, c_new, m_new

    dev = device_for(backend or "cpp")
    holder = nn.Module()
    holder.cell = CausalLSTMCell(3, 4, 7, 5, 3, 1, layer_norm)
    holder.tf = CausalLSTMCell(3, 4, 7, 5, 3, 1, layer_norm)
    holder.tf.conv_h[0] = nn.Conv2d(4, 16, 3, 1, 1, bias=True)  # the TF original's biased convolutions
    holder = holder.double().to(dev)
    x, h, c, m = (torch.randn(3, n, 7, 5, dtype=torch.float64, device=dev) for n in (3, 4, 4, 4))
    rep = _accelerate_unchanged(holder, "cell", (x, h, c, m), [("cell", "CausalLSTMCell", "CausalLSTMCell")],
                                ["tf"], backend)
    assert "convolution options" in rep.left[0][2], rep
    assert type(holder.cell).__module__ == "vpfast.nn.causal_lstm" and holder.cell.backend == backend
    assert holder.cell.layer_norm == layer_norm and type(holder.tf).__module__ == __name__
    assert "CausalLSTMCell -> vpfast.nn.CausalLSTMCell" in str(rep)
    import vpfast  # a second call recognises vpfast's cell: not swapped again, its backend set
    again = vpfast.accelerate(holder, backend="torch")
    assert again.swapped == [] and holder.cell.backend == "torch" and [p for p, _, _ in again.left] == ["tf"]


# ---- fast backend vs torch, autocast, CLI ---------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_default_backend_matches_torch(name):
    check_fast_matches_torch(tiny, name, lambda m, frames: m.training_loss(
        frames, 10, generator=torch.Generator().manual_seed(3))[0])


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("name", NEW)
def test_cpu_bf16_autocast_training_step(name, backend):
    """Under CPU bf16 autocast a training step gives a finite loss near the float32 one and float32 gradients
    for every parameter that gets one in float32."""
    torch.manual_seed(0)
    m = M.create(name, preset="small", backend=backend, **tiny_config(name, num_hidden="8,8")
                 if name in RNNS else tiny_config(name)).train()
    frames = torch.rand(2, 5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    res = []
    for amp in (False, True):
        for p in m.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = m.training_loss(frames, 10, generator=torch.Generator().manual_seed(3))
        loss.backward()
        res.append((loss.detach().float(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (l32, g32), (l16, g16) = res
    assert torch.isfinite(l16) and abs(l16 - l32) <= 0.05 * abs(l32) + 1e-3
    assert g16.keys() == g32.keys()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g16.values())


def _cli_data(tmp_path, name):
    arr = np.random.default_rng(0).random((8, 6, 1, 16, 16)).astype(np.float32)
    f = str(tmp_path / "seqs.npy")
    np.save(f, arr)
    cfg = dict(tiny_config(name), in_shape=[3, 1, 16, 16], pre_seq_length=3, aft_seq_length=3)
    return arr, f, json.dumps(cfg)


def _openstl_weights(net, path):
    """Save net's weights the way an OpenSTL (Lightning) checkpoint holds them: "model."-prefixed keys."""
    torch.save({"state_dict": {"model." + k: v for k, v in net.state_dict().items()}, "epoch": 3}, path)


@pytest.mark.parametrize("name", NEW)
def test_cli_train_eval_predict(tmp_path, name):
    """In process: `train --preset small` (one step: 7 training sequences at batch 4), `eval` of its checkpoint, `predict` from the same
    weights saved under OpenSTL's key names (loaded by --model/--preset/--config) equals the model's output."""
    from vpfast import evaluate as ev
    from vpfast import commands as tr
    arr, f, cfg = _cli_data(tmp_path, name)
    out = tmp_path / "run"
    assert tr.train_main(["--model", name, "--preset", "small", "--config", cfg, "--data", f, "--epochs", "1",
                    "--batch-size", "4", "--test-size", "2", "--no-progress",
                    "--out", str(out)]) == 0
    assert tr.cli(["eval", str(out / "last.pt"), "--data", f, "--test-size", "2", "--no-progress"]) == 0
    # the default peak learning rate is OpenSTL's for the model (MODELS.md §14)
    lr = dict(predrnnpp=1e-4, mim=5e-4, e3dlstm=1e-4, phydnet=1e-3)[name]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["train_args"]["lr"] == lr
    net, meta = ev.load_model(str(out / "last.pt"))
    assert meta["model"] == name
    _openstl_weights(net, tmp_path / "openstl.ckpt")
    assert tr.cli(["predict", str(tmp_path / "openstl.ckpt"), "--model", name, "--preset", "small", "--config",
                   cfg, "--input", f, "--num", "2", "--out", str(tmp_path / "pred")]) == 0
    with torch.no_grad():
        want = net(torch.from_numpy(arr[:2, :3])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "pred" / "predictions.npy"), want, rtol=1e-5, atol=1e-6)


def test_cli_subprocess(tmp_path):
    """The entry point itself (`python -m vpfast train`, one process: importing torch alone takes seconds) trains
    a baseline for two steps (two epochs of one), evaluates it and writes its checkpoint; eval and predict of such checkpoints run
    in process above."""
    import os
    import subprocess
    import sys
    from vpfast import evaluate as ev
    name = "predrnnpp"
    arr, f, cfg = _cli_data(tmp_path, name)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "vpfast", "train", "--model", name, "--preset", "small", "--config",
                          cfg, "--data", f, "--epochs", "2", "--max-steps", "2", "--batch-size", "4", "--test-size", "2",
                          "--no-progress", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    net, meta = ev.load_model(str(out / "last.pt"))
    assert meta["model"] == name and meta["global_step"] == 2
    assert net(torch.from_numpy(arr[:2, :3])).shape == (2, 3, 1, 16, 16)


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NEW)
def test_gpu_mmnist_training_step(name):
    """The Moving-MNIST configuration on the GPU (batch 4): a training step with the default backend against
    backend="torch" in float32 (TF32 off), loss and every gradient."""
    from vpfast.testing import exact_float32
    torch.manual_seed(0)
    frames = torch.rand(4, 20, 1, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    res = []
    with exact_float32():
        src = None
        for backend in ("torch", None):
            m = M.create(name, preset="mmnist", backend=backend).cuda().train()
            if src is None:
                src = m.state_dict()
            else:
                m.load_state_dict(src)
            loss, _ = m.training_loss(frames, 10, generator=torch.Generator().manual_seed(3))
            loss.backward()
            res.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
            del m
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        err = (g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)
        assert err < 1e-3, (k, err.item())


@pytest.mark.parametrize("name", NEW)
def test_bad_input(name):
    check_bad_input(tiny(name).eval())
