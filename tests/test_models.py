"""vpfast.models: state_dict contract, reference arithmetic (rebuilt here step by step from MODELS.md on tiny
configurations), fast backend vs backend="torch", schedules, checkpoints, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vpfast
from vpfast import models as M
from vpfast.ops.ddr_loss import ddr_loss_reference

from model_checks import check_bad_input, check_fast_matches_torch, ref_patch
from reference_keys import key_list

KEY_FILES = dict(convlstm="convlstm_mmnist", predrnn="predrnn_mmnist", predrnnv2="predrnnv2_mmnist",
                 motionrnn="motionrnn_64x4", simvp_incepu="simvp_incepu_mmnist", simvp_gsta="simvp_gsta_mmnist",
                 tau="tau_mmnist")
# the models this file covers; the baselines (PredRNN++, MIM, PhyDNet, E3D-LSTM) are in test_models_baselines.py
ORIGINAL = ("convlstm", "predrnn", "predrnnv2", "motionrnn", "simvp_incepu", "simvp_gsta", "tau")
RNNS = ("convlstm", "predrnn", "predrnnv2", "motionrnn")
SIMVPS = ("simvp_incepu", "simvp_gsta", "tau")


def tiny(name, backend="torch", dtype=torch.float64, **over):
    """A tiny configuration of each model (16x16 frames, 3 observed, 2 predicted)."""
    kw = dict(in_shape=(3, 1, 16, 16), pre_seq_length=3, aft_seq_length=2)
    if name in RNNS:
        kw.update(num_hidden="8,8", filter_size=3, patch_size=2)
        if name == "motionrnn":
            kw.update(num_hidden="8,8,8")
    else:
        kw.update(hid_S=8, hid_T=16, N_S=2, N_T=3, mlp_ratio=2.0)
    kw.update(over)
    torch.manual_seed(0)
    m = M.create(name, backend=backend, **kw).to(dtype)
    with torch.no_grad():  # break the zero initialisations so every path carries signal
        for k, p in m.named_parameters():
            if "layer_scale" in k:
                p.uniform_(0.3, 1.0)
            elif "norm" in k and k.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 / math.sqrt(max(1, p[0].numel() if p.dim() > 1 else 1)) * 2)
        for k, b in m.named_buffers():
            if k.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif k.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return m


# ---- state_dict contract --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ORIGINAL)
def test_mmnist_keys_shapes_and_parameter_count(name):
    count, entries = key_list(f"{KEY_FILES[name]}.txt")
    with torch.device("meta"):  # shapes only: no allocation, no initialisation cost
        m = M.create(name, preset="mmnist", backend="torch")
        again = M.create(m.name, backend="torch", **m.config)  # config rebuilds the architecture
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == entries
    assert sum(p.numel() for p in m.parameters()) == count
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_names_and_classes():
    assert M.NAMES[:len(ORIGINAL)] == ORIGINAL
    for n in M.NAMES:
        assert M.CLASSES[n].__name__ in M.__all__
    assert isinstance(M.create("predrnn", preset="small"), M.PredRNN)
    assert M.create("tau", preset="mmnist").config["hid_T"] == 512
    assert M.create("predrnn", num_hidden=[16, 16], patch_size=2).config["num_hidden"] == [16, 16]


# ---- reference arithmetic, rebuilt from MODELS.md -------------------------------------------------------
def ref_stlstm(P, pre, x, h, c, m, k, highway=None):
    C = h.shape[1]
    conv = lambda t, w: F.conv2d(t, P[pre + w], padding=k // 2)  # noqa: E731
    ix, fx, gx, ixp, fxp, gxp, ox = conv(x, "conv_x.0.weight").split(C, 1)
    ih, fh, gh, oh = conv(h, "conv_h.0.weight").split(C, 1)
    im, fm, gm = conv(m, "conv_m.0.weight").split(C, 1)
    i, f, g = torch.sigmoid(ix + ih), torch.sigmoid(fx + fh + 1.0), torch.tanh(gx + gh)
    c2 = f * c + i * g
    ip, fp, gp = torch.sigmoid(ixp + im), torch.sigmoid(fxp + fm + 1.0), torch.tanh(gxp + gm)
    m2 = fp * m + ip * gp
    cm = torch.cat([c2, m2], 1)
    o = torch.sigmoid(ox + oh + conv(cm, "conv_o.0.weight"))
    h2 = o * torch.tanh(F.conv2d(cm, P[pre + "conv_last.weight"]))
    if highway is not None:
        h2 = h2 + (1 - o) * highway
    return h2, c2, m2, i * g, ip * gp


def ref_convlstm_cell(P, pre, x, h, c, k):
    C = h.shape[1]
    ix, fx, gx, ox = F.conv2d(x, P[pre + "conv_x.0.weight"], padding=k // 2).split(C, 1)
    ih, fh, gh, oh = F.conv2d(h, P[pre + "conv_h.0.weight"], padding=k // 2).split(C, 1)
    i, f, g, o = torch.sigmoid(ix + ih), torch.sigmoid(fx + fh), torch.tanh(gx + gh), torch.sigmoid(ox + oh)
    c2 = f * c + i * g
    return o * torch.tanh(c2), c2


def ref_warp(P, pre, x, F_):
    """MODELS.md §4 via the stated peer: torchvision deform_conv2d with (dy_n, dx_n) interleaved."""
    tv = pytest.importorskip("torchvision")
    m = torch.sigmoid(F.conv2d(x, P[pre + "warp_gate.weight"], P[pre + "warp_gate.bias"], padding=1))
    off = torch.stack([F_[:, :9], F_[:, 9:]], dim=2).flatten(1, 2)
    return tv.ops.deform_conv2d(x, off, P[pre + "conv.weight"], padding=1, mask=m)


def ref_motiongru(P, pre, x, F_prev, D_prev):
    conv = lambda t, n: F.conv2d(t, P[pre + n + ".weight"], P[pre + n + ".bias"], padding=1)  # noqa: E731
    u = torch.sigmoid(conv(torch.cat([x, F_prev], 1), "update"))
    r = torch.sigmoid(conv(torch.cat([x, F_prev], 1), "reset"))
    Fp = F_prev * (1 - u) + torch.tanh(conv(torch.cat([x, r * F_prev], 1), "output")) * u
    D = D_prev + 0.5 * (F_prev - D_prev)
    Fn = Fp + D
    return ref_warp(P, pre + "warp.", x, Fn), Fn, D


def ref_rnn(name, model, frames_p, mask, reverse):
    """The reference loop (MODELS.md §3/§4) with a full-size mask; returns predictions and decoupling loss."""
    P = {k: v for k, v in model.state_dict().items()}
    cfg = model.config
    k, pre, total = cfg["filter_size"], cfg["pre_seq_length"], cfg["pre_seq_length"] + cfg["aft_seq_length"]
    nh = cfg["num_hidden"]
    L = len(nh)
    B, _, _, Hp, Wp = frames_p.shape
    h = [frames_p.new_zeros(B, n, Hp, Wp) for n in nh]
    c = [frames_p.new_zeros(B, n, Hp, Wp) for n in nh]
    mem = frames_p.new_zeros(B, nh[0], Hp, Wp)
    Fs = [frames_p.new_zeros(B, 18, Hp // 2, Wp // 2) for _ in range(L - 1)]
    Ds = [frames_p.new_zeros(B, 18, Hp // 2, Wp // 2) for _ in range(L - 1)]
    preds, dec, x_gen = [], [], None
    for t in range(total - 1):
        if reverse:
            net = frames_p[:, t] if t == 0 else mask[:, t - 1] * frames_p[:, t] + (1 - mask[:, t - 1]) * x_gen
        else:
            net = frames_p[:, t] if t < pre else \
                mask[:, t - pre] * frames_p[:, t] + (1 - mask[:, t - pre]) * x_gen
        hw = F.conv2d(net, P["conv_first_v.weight"]) if name == "motionrnn" else None
        for i in range(L):
            inp = net if i == 0 else h[i - 1]
            if name == "convlstm":
                h[i], c[i] = ref_convlstm_cell(P, f"cell_list.{i}.", inp, h[i], c[i], k)
                continue
            h[i], c[i], mem, dc, dm = ref_stlstm(P, f"cell_list.{i}.", inp, h[i], c[i], mem, k, hw)
            if name == "predrnnv2":
                a = lambda d: F.normalize(F.conv2d(d, P["adapter.weight"]).flatten(2), dim=2)  # noqa: E731
                dec.append((a(dc) * a(dm)).sum(2).abs().mean())
            if name == "motionrnn":
                hw = h[i]
                if i < L - 1:
                    z = F.conv2d(h[i], P[f"enc_list.{i}.weight"], P[f"enc_list.{i}.bias"], stride=2, padding=k // 2)
                    z, Fs[i], Ds[i] = ref_motiongru(P, f"motion_list.{i}.", z, Fs[i], Ds[i])
                    ht = F.conv_transpose2d(z, P[f"dec_list.{i}.weight"], P[f"dec_list.{i}.bias"], stride=2,
                                            padding=1)
                    o = torch.sigmoid(F.conv2d(torch.cat([ht, h[i]], 1), P[f"gate_list.{i}.weight"],
                                               P[f"gate_list.{i}.bias"], padding=k // 2))
                    h[i] = o * ht + (1 - o) * h[i]
        x_gen = F.conv2d(h[-1], P["conv_last.weight"])
        preds.append(x_gen)
    return torch.stack(preds, 1), (torch.stack(dec).mean() if dec else None)


@pytest.mark.parametrize("name", RNNS)
def test_rnn_reproduces_reference_arithmetic(name):
    model = tiny(name).train()
    cfg = model.config
    p, pre, aft = cfg["patch_size"], cfg["pre_seq_length"], cfg["aft_seq_length"]
    reverse = cfg["reverse_scheduled_sampling"]
    torch.manual_seed(1)
    frames = torch.rand(2, pre + aft, 1, 16, 16, dtype=torch.float64)
    fp = ref_patch(frames, p)
    assert torch.equal(M.patch(frames, p), fp)
    assert torch.equal(M.unpatch(fp, p, 1), frames)
    n = pre + aft - 2 if reverse else aft - 1
    mask_small = (torch.rand(2, n, 1, 1, 1) < 0.5).double()
    mask_full = mask_small.expand(2, n, *fp.shape[2:]).contiguous()
    want, want_dec = ref_rnn(name, model, fp, mask_full, reverse)
    got, aux = model.rollout(fp, mask_small, with_aux=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if name == "predrnnv2":
        torch.testing.assert_close(aux["decouple"][0], want_dec, rtol=1e-10, atol=1e-12)
    # test time: reference test mask (0 for predicted steps; reverse: 1 for the first pre-1 entries)
    model.eval()
    tm = model.test_mask(2, frames)
    full_tm = tm.expand(2, tm.shape[1], *fp.shape[2:])
    noisy = fp.clone()
    noisy[:, pre:] = 123.0  # future frames must not leak into the prediction
    want_test, _ = ref_rnn(name, model, noisy, full_tm, reverse)
    y = model(frames[:, :pre])
    assert y.shape == (2, aft, 1, 16, 16)
    torch.testing.assert_close(M.patch(y, p), want_test[:, pre - 1:], rtol=1e-10, atol=1e-12)


def test_rnn_training_loss_matches_reference_loss():
    model = tiny("predrnnv2").train()
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    loss, logs = model.training_loss(frames, itr=30000, generator=g)
    g = torch.Generator().manual_seed(5)
    mask, probs = model.sampling_mask(2, 30000, frames, g)
    assert probs["r_eta"] == pytest.approx(1 - 0.5 * math.exp(-1.0)) and probs["eta"] == pytest.approx(0.4)
    fp = ref_patch(frames, 2)
    preds, dec = ref_rnn("predrnnv2", model, fp, mask.expand(2, 3, *fp.shape[2:]), True)
    want = F.mse_loss(preds, fp[:, 1:]) + 0.1 * dec
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert set(logs) >= {"loss", "mse", "decouple", "eta", "r_eta"}


# ---- SimVP / gSTA / TAU ---------------------------------------------------------------------------------
def ref_convsc(P, pre, x, k, down=False, up=False):
    stride = 2 if down else 1
    pad = (k - stride + 1) // 2
    if up:
        y = F.pixel_shuffle(F.conv2d(x, P[pre + "conv.conv.0.weight"], P[pre + "conv.conv.0.bias"], padding=pad), 2)
    else:
        y = F.conv2d(x, P[pre + "conv.conv.weight"], P[pre + "conv.conv.bias"], stride=stride, padding=pad)
    return F.silu(F.group_norm(y, 2, P[pre + "conv.norm.weight"], P[pre + "conv.norm.bias"]))


def ref_bn(P, pre, x):
    return F.batch_norm(x, P[pre + "running_mean"], P[pre + "running_var"], P[pre + "weight"], P[pre + "bias"],
                        training=False, eps=1e-5)


def ref_meta_block(P, pre, x, tau):
    C = x.shape[1]
    conv = lambda t, n, **kw: F.conv2d(t, P[pre + n + ".weight"], P[pre + n + ".bias"], **kw)  # noqa: E731
    b = pre
    pre = b + "block."
    z = ref_bn(P, pre + "norm1.", x)
    a = F.gelu(conv(z, "attn.proj_1"))
    u = conv(a, "attn.spatial_gating_unit.conv0", padding=2, groups=C)
    u = conv(u, "attn.spatial_gating_unit.conv_spatial", padding=9, dilation=3, groups=C)
    u = conv(u, "attn.spatial_gating_unit.conv1")
    if tau:
        se = a.mean((2, 3))
        se = torch.sigmoid(F.relu(se @ P[pre + "attn.spatial_gating_unit.fc.0.weight"].t())
                           @ P[pre + "attn.spatial_gating_unit.fc.2.weight"].t())
        unit = se[:, :, None, None] * u * a
    else:
        f, g = u.split(C, 1)
        unit = torch.sigmoid(g) * f
    attn = conv(unit, "attn.proj_2") + z
    x = x + P[pre + "layer_scale_1"][:, None, None] * attn
    z = ref_bn(P, pre + "norm2.", x)
    hdn = conv(z, "mlp.fc1")
    hdn = F.gelu(conv(hdn, "mlp.dwconv.dwconv", padding=1, groups=hdn.shape[1]))
    x = x + P[pre + "layer_scale_2"][:, None, None] * conv(hdn, "mlp.fc2")
    if b + "reduction.weight" in P:
        x = F.conv2d(x, P[b + "reduction.weight"], P[b + "reduction.bias"])
    return x


def ref_inception(P, pre, x):
    x = F.conv2d(x, P[pre + "conv1.weight"], P[pre + "conv1.bias"])
    y = 0
    for j, k in enumerate((3, 5, 7, 11)):
        w = P[f"{pre}layers.{j}.conv.weight"]
        groups = x.shape[1] // w.shape[1]
        t = F.conv2d(x, w, P[f"{pre}layers.{j}.conv.bias"], padding=k // 2, groups=groups)
        t = F.group_norm(t, groups, P[f"{pre}layers.{j}.norm.weight"], P[f"{pre}layers.{j}.norm.bias"])
        y = y + F.leaky_relu(t, 0.2)
    return y


def ref_simvp_step(model, x):
    P = dict(model.state_dict())
    cfg = model.config
    B, T, C, H, W = x.shape
    NS, NT, k = cfg["N_S"], cfg["N_T"], cfg["spatio_kernel_enc"]
    z = x.reshape(B * T, C, H, W)
    downs = [i % 2 == 1 for i in range(NS)]
    for i in range(NS):
        z = ref_convsc(P, f"enc.enc.{i}.", z, k, down=downs[i])
        if i == 0:
            skip = z
    _, Cs, Hs, Ws = z.shape
    z = z.reshape(B, T * Cs, Hs, Ws)
    mt = model.model_type
    if mt == "incepu":
        skips = []
        for i in range(NT):
            z = ref_inception(P, f"hid.enc.{i}.", z)
            if i < NT - 1:
                skips.append(z)
        z = ref_inception(P, "hid.dec.0.", z)
        for i in range(1, NT):
            z = ref_inception(P, f"hid.dec.{i}.", torch.cat([z, skips[-i]], 1))
    else:
        for i in range(NT):
            z = ref_meta_block(P, f"hid.enc.{i}.", z, mt == "tau")
    z = z.reshape(B * T, Cs, Hs, Ws)
    ups = list(reversed(downs))
    for i in range(NS):
        if i == NS - 1:
            z = z + skip
        z = ref_convsc(P, f"dec.dec.{i}.", z, cfg["spatio_kernel_dec"], up=ups[i])
    y = F.conv2d(z, P["dec.readout.weight"], P["dec.readout.bias"])
    return y.reshape(B, T, C, H, W)


@pytest.mark.parametrize("name", SIMVPS)
def test_simvp_reproduces_reference_arithmetic(name):
    model = tiny(name, aft_seq_length=5).eval()  # eval: BatchNorm running statistics, DropPath off
    torch.manual_seed(2)
    frames = torch.rand(2, 8, 1, 16, 16, dtype=torch.float64)
    x = frames[:, :3]
    s1 = ref_simvp_step(model, x)
    s2 = ref_simvp_step(model, s1)
    want = torch.cat([s1, s2[:, :2]], 1)  # aft=5 > pre=3: autoregressive chunks, as the reference
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)
    loss, logs = model.training_loss(frames, 0)
    want_loss = F.mse_loss(want, frames[:, 3:])
    if name == "tau":
        want_loss = want_loss + 0.1 * ddr_loss_reference(want, frames[:, 3:])
        assert "ddr" in logs
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    short = tiny(name, aft_seq_length=2).eval()
    torch.testing.assert_close(short(x), ref_simvp_step(short, x)[:, :2], rtol=1e-10, atol=1e-12)


def test_drop_path_rates_follow_reference():
    m = tiny("simvp_gsta", N_T=4, drop_path=0.0)
    rates = [getattr(b.block.drop_path, "drop_prob", 0.0) for b in m.hid.enc]
    assert rates[:3] == pytest.approx([v.item() for v in torch.linspace(1e-2, 0.0, 4)][:3])
    assert rates[3] == 0.0


# ---- schedules ------------------------------------------------------------------------------------------
def test_scheduled_sampling_schedules():
    assert M.scheduled_sampling_eta(0) == pytest.approx(1 - 2e-5)
    assert M.scheduled_sampling_eta(24999) == pytest.approx(0.5)
    assert M.scheduled_sampling_eta(50000) == 0.0
    assert M.reverse_sampling_probs(100) == (0.5, 0.5)
    assert M.reverse_sampling_probs(25000) == pytest.approx((0.5, 0.5))
    assert M.reverse_sampling_probs(37500) == pytest.approx((1 - 0.5 * math.exp(-2.5), 0.25))
    assert M.reverse_sampling_probs(60000) == (1.0, 0.0)
    m = tiny("predrnn")
    g = torch.Generator().manual_seed(0)
    mask, p = m.sampling_mask(4000, 25000, torch.zeros(1, dtype=torch.float64), g)
    assert mask.shape == (4000, 1, 1, 1, 1) and mask.mean().item() == pytest.approx(0.5, abs=0.03)
    mask, _ = m.sampling_mask(4, 60000, torch.zeros(1))
    assert mask.sum() == 0


# ---- fast backend vs torch ------------------------------------------------------------------------------
FAST = list(ORIGINAL)


def _available_fast_backend():
    from vpfast._dispatch import resolve
    return resolve(None)


@pytest.mark.parametrize("name", FAST)
def test_fast_backend_matches_torch(name):
    def loss_of(m, frames):
        torch.manual_seed(7)  # same DropPath draws
        g = torch.Generator().manual_seed(3)  # same sampling masks
        return (m.training_loss(frames, 10, generator=g) if name in RNNS else m.training_loss(frames, 10))[0]
    check_fast_matches_torch(tiny, name, loss_of)


@pytest.mark.parametrize("channels", [1, 3])
def test_simvp_fast_path_keeps_maps_channels_last(channels):
    """Every encoder/decoder layer's output on the fast path is channels_last (a one-channel input and the
    pixel shuffle included): a layer that fell back to NCHW would mix layouts and pay conversions."""
    from vpfast.models.simvp import BasicConv2d
    m = tiny("tau", backend=None, in_shape=(3, channels, 16, 16))
    layouts = []
    for mod in m.modules():
        if isinstance(mod, BasicConv2d):
            mod.register_forward_hook(lambda mod, i, o: layouts.append(o.is_contiguous(
                memory_format=torch.channels_last) and not o.is_contiguous()))
    m(torch.rand(2, 3, channels, 16, 16, dtype=torch.float64))
    assert len(layouts) == 4 and all(layouts), layouts


# ---- checkpoints ----------------------------------------------------------------------------------------
def test_load_checkpoint_containers(tmp_path):
    src = tiny("predrnnv2")
    sd = src.state_dict()
    for obj in (sd, {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},
                {"module." + k: v for k, v in sd.items()}, {"net_param": sd}):
        dst = tiny("predrnnv2")
        with torch.no_grad():
            for p in dst.parameters():
                p.zero_()
        rep = M.load_checkpoint(dst, obj)
        assert not rep.missing and not rep.unexpected and len(rep.loaded) == len(sd)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k])
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, path)
    M.load_checkpoint(tiny("predrnnv2"), str(path))


def test_load_checkpoint_reports_problems():
    sd = tiny("predrnn").state_dict()
    with pytest.raises(M.CheckpointError, match="missing.*cell_list.0.conv_x.0.weight"):
        M.load_checkpoint(tiny("predrnn"), {k: v for k, v in sd.items() if k != "cell_list.0.conv_x.0.weight"})
    with pytest.raises(M.CheckpointError, match="unexpected.*bogus"):
        M.load_checkpoint(tiny("predrnn"), dict(sd, bogus=torch.zeros(1)))
    other = tiny("predrnn", in_shape=(3, 3, 16, 16))  # channel mismatch
    with pytest.raises(M.CheckpointError, match="cell_list.0.conv_x.0.weight: checkpoint"):
        M.load_checkpoint(other, sd)
    rep = M.load_checkpoint(other, sd, strict=False)
    assert rep.mismatched and "conv_last.weight" not in rep.loaded
    with pytest.raises(M.CheckpointError, match="no state_dict"):
        M.load_checkpoint(tiny("predrnn"), {"epoch": 1})


def test_convlstm_accepts_reference_unused_entries():
    m = tiny("convlstm")
    sd = m.state_dict()
    assert "cell_list.0.conv_o.0.weight" in sd and "cell_list.0.conv_last.weight" in sd
    M.load_checkpoint(tiny("convlstm"), sd)


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["predrnn", "motionrnn", "tau"])
def test_bad_input(name):
    check_bad_input(tiny(name).eval())


def test_bad_config():
    with pytest.raises(ValueError, match="unknown model"):
        M.create("predrnn3")
    with pytest.raises(ValueError, match="unknown preset"):
        M.create("tau", preset="huge")
    with pytest.raises(TypeError, match="create"):
        M.create("tau", num_hidden="1,2")
    with pytest.raises(ValueError, match="num_hidden"):
        M.create("predrnn", num_hidden="a,b")
    with pytest.raises(ValueError, match="patch_size"):
        M.create("predrnn", in_shape=(10, 1, 30, 30), patch_size=4)
    with pytest.raises(ValueError, match="equal num_hidden"):
        M.create("predrnn", num_hidden="8,16")


# ---- torch.compile --------------------------------------------------------------------------------------
def test_compile_simvp_and_cell():
    # the whole TAU model through dynamo + AOTAutograd (graph capture, fake tensors and the custom ops'
    # registrations; inductor's code generation for a whole model costs minutes on this CPU) ...
    m = tiny("tau", dtype=torch.float32, backend=None).eval()
    x = torch.rand(1, 3, 1, 16, 16)
    torch.testing.assert_close(torch.compile(m, backend="aot_eager")(x), m(x), rtol=1e-4, atol=1e-5)
    # ... and a recurrent cell with the default (inductor) backend
    r = tiny("predrnn", dtype=torch.float32, backend=None).eval()
    cell = r.cell_list[1]
    args = [torch.rand(1, 8, 8, 8) for _ in range(4)]
    for a, b in zip(torch.compile(cell)(*args), cell(*args)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- mixed precision ------------------------------------------------------------------------------------
def _step_grads(model, frames, name, amp_dtype=None):
    """One training step (loss + backward) with fixed random draws; amp_dtype runs it under torch.autocast.
    Returns (loss as float64, {parameter: grad as float64}, {parameter: grad dtype})."""
    dev = frames.device.type
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(7)  # same DropPath draws
    g = torch.Generator().manual_seed(3)  # same sampling masks
    with torch.autocast(dev, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss, _ = model.training_loss(frames, 10, generator=g) if name in RNNS else model.training_loss(frames, 10)
    loss.backward()
    grads = {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}
    dtypes = {k: p.grad.dtype for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach().double(), grads, dtypes


def _assert_bounded(out, ref_same, ref64, factor, floor, what):
    """|out - ref64| <= factor * |ref_same - ref64| + floor * |ref64| in the Frobenius norm: out may round
    differently from the torch reference at the same precision, but not much worse (a norm rather than the
    maximum, because one step of a recurrent model spreads rounding over every element of a gradient)."""
    ref = ref64.double()
    err = (out.double() - ref).norm()
    base = (ref_same.double() - ref).norm()
    bound = factor * base + floor * ref.norm()
    assert err <= bound, (f"{what}: error {err.item():.3e} vs the float64 reference exceeds {factor} x the torch "
                          f"reference's own error {base.item():.3e} + {floor} x norm {ref.norm().item():.3e}")


_F64_STEPS: dict = {}


def _mixed_precision_case(name, backends, device, preset, batch, amp_dtype, factor, floor, **over):
    """Every backend's training step against backend="torch" at the same precision, both bounded by their
    distance to a float64 step of the torch reference."""
    import copy

    torch.manual_seed(0)
    src = M.create(name, preset=preset, backend="torch", **over).train()
    _, C, H, W = src.config["in_shape"]
    T = src.pre_seq_length + src.aft_seq_length
    frames = torch.rand(batch, T, C, H, W, generator=torch.Generator().manual_seed(1)).to(device)
    key = (name, device, preset, batch, tuple(sorted(over.items())))
    if key not in _F64_STEPS:  # the same float64 step serves every precision of a case
        _F64_STEPS.clear()
        _F64_STEPS[key] = _step_grads(copy.deepcopy(src).to(device, torch.float64), frames.double(), name)
    l64, g64, _ = _F64_STEPS[key]
    lt, gt, dt = _step_grads(copy.deepcopy(src).to(device), frames, name, amp_dtype)
    assert torch.isfinite(lt)
    assert set(gt) == set(g64) and set(dt.values()) == {torch.float32}, dt
    for backend in backends:
        model = M.create(name, preset=preset, backend=backend, **over).train().to(device)
        model.load_state_dict(src.state_dict())
        lb, gb, db = _step_grads(model, frames, name, amp_dtype)
        assert torch.isfinite(lb), backend
        assert set(gb) == set(g64), (backend, set(g64) ^ set(gb))
        assert set(db.values()) == {torch.float32}, (backend, db)  # parameters keep float32 gradients
        _assert_bounded(lb, lt, l64, factor, floor, f"{backend} loss")
        for k in g64:
            _assert_bounded(gb[k], gt[k], g64[k], factor, floor, f"{backend} grad {k}")


@pytest.mark.parametrize("name", ORIGINAL)
def test_cpu_bf16_autocast_training_step(name):
    """Every model trains under CPU bf16 autocast with backend="torch" and the default backend: finite loss,
    float32 parameter gradients, and the default backend within 8x the torch path's own bf16 error (+1%)."""
    over = dict(in_shape=(3, 1, 16, 16), pre_seq_length=3, aft_seq_length=2)
    if name in RNNS:
        over["patch_size"] = 2
    _mixed_precision_case(name, [None], "cpu", "small", 2, torch.bfloat16, 8, 1e-2, **over)


def test_cells_take_autocast_dtypes():
    """Under autocast a cell takes a bf16 input next to float32 states (as nn.Conv2d takes a bf16 input with
    float32 weights); outside autocast mixed dtypes stay an error, as for F.conv2d."""
    from vpfast.nn import ConvLSTMCell, SpatioTemporalLSTMCell
    from vpfast.train import recording_backends
    x = torch.rand(2, 4, 8, 8).bfloat16()
    s = torch.zeros(2, 8, 8, 8)
    for backend in ("torch", None):
        st = SpatioTemporalLSTMCell(4, 8, 8, 8, 3, 1, False, variant="highway", backend=backend)
        cl = ConvLSTMCell(4, 8, 8, 8, 3, 1, False, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16), recording_backends() as used:
            h, c, m, hw = st(x, s, s, s, s.bfloat16())
            h2, c2 = cl(x, s, s)
        # the cell's prediction of auto's choice (which decides merged convolutions or the reference's) is what
        # the op then picks itself from the cast inputs: one backend per op
        assert all(len(b) == 1 for b in used.values()), used
        from vpfast.ops.stlstm import GATES
        if backend is None and not GATES.static_reasons("cpp"):
            # a bf16 x, but the gates get float32 after promotion with the float32 states: the cpp kernels run
            assert used == {"stlstm_gates": {"cpp"}, "stlstm_output": {"cpp"}, "convlstm": {"cpp"}}, used
        assert all(t.is_floating_point() and t.shape == s.shape for t in (h, c, m, hw, h2, c2))
        assert c.dtype == m.dtype == c2.dtype == torch.float32  # a float32 state stays float32
        with pytest.raises(TypeError, match="dtype"):
            st(x, s, s, s, s)
        with pytest.raises(TypeError, match="dtype"):
            cl(x.float(), s, s.double())


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backends():
    """torch, cuda, triton (when built / installed) and the default (None = auto)."""
    from vpfast import _ext
    out = ["torch"]
    if _ext.built_with_cuda() and not _ext.LOAD_ERROR:
        out.append("cuda")
    if _ext.TRITON_INSTALLED and not _ext.triton_interpret():
        out.append("triton")
    return out + [None]



@needs_cuda
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("name", ORIGINAL)
def test_gpu_mmnist_training_step_every_backend(name, precision, no_tf32):
    """The published Moving-MNIST configuration at batch 16 on the GPU: one training step with every available
    backend (torch, cuda, triton, default) against backend="torch" at the same precision (float32, or bf16
    autocast), both measured against a float64 step of the torch reference."""
    amp = torch.bfloat16 if precision == "bf16-mixed" else None
    factor, floor = (8, 1e-2) if amp is not None else (8, 1e-5)
    _mixed_precision_case(name, _gpu_backends(), "cuda", "mmnist", 16, amp, factor, floor)


@pytest.mark.parametrize("name", M.NAMES)
def test_layer_decisions_do_not_depend_on_the_fast_backend_name(name, monkeypatch):
    """Whether cells merge their convolutions and whether SimVP's encoder/decoder run channels_last is decided
    by the configuration alone, never by a fast backend's name (nor by device): backend=None (auto) and
    backend="cuda" build the same layers, so auto on a GPU runs what backend="cuda" runs wherever the ops pick
    cuda. Only "torch" (the reference arithmetic, verbatim) differs."""
    # create() refuses a backend that cannot run on this machine; the layers it would build are the question here
    monkeypatch.setattr(M, "require_backend", lambda b: b)

    def decisions(backend):
        with torch.device("meta"):
            m = M.create(name, preset="mmnist", backend=backend)
        return [(k, getattr(mod, "merge_convs", None), getattr(mod, "channels_last", None), type(mod).__name__)
                for k, mod in m.named_modules()]
    assert decisions("cuda") == decisions(None)
