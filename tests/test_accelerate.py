"""vpfast.accelerate on a model built from reference-style modules (same class names, structure and
arithmetic as OpenSTL / thuml, written here from MODELS.md): swaps, shared parameters, equal outputs and
gradients, a pre-built optimizer keeps working, and a report of what was left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpfast
from test_models import ref_motiongru, ref_stlstm


class SpatioTemporalLSTMCell(nn.Module):  # OpenSTL's PredRNN cell (and thuml's highway cell when highway=True)
    def __init__(self, in_channel, num_hidden, k, highway=False):
        super().__init__()
        self.num_hidden, self._forget_bias, self.k = num_hidden, 1.0, k
        conv = lambda i, o, kk: nn.Sequential(nn.Conv2d(i, o, kk, 1, kk // 2, bias=False))  # noqa: E731
        self.conv_x, self.conv_h = conv(in_channel, 7 * num_hidden, k), conv(num_hidden, 4 * num_hidden, k)
        self.conv_m, self.conv_o = conv(num_hidden, 3 * num_hidden, k), conv(2 * num_hidden, num_hidden, k)
        self.conv_last = nn.Conv2d(2 * num_hidden, num_hidden, 1, bias=False)

    def forward(self, x_t, h_t, c_t, m_t):
        h, c, m, _, _ = ref_stlstm(dict(self.named_parameters()), "", x_t, h_t, c_t, m_t, self.k)
        return h, c, m


class HighwayCell(SpatioTemporalLSTMCell):
    def forward(self, x_t, h_t, c_t, m_t, motion_highway):
        h, c, m, _, _ = ref_stlstm(dict(self.named_parameters()), "", x_t, h_t, c_t, m_t, self.k, motion_highway)
        return h, c, m, h


HighwayCell.__name__ = "SpatioTemporalLSTMCell"


class AttentionModule(nn.Module):  # OpenSTL gSTA gating unit
    def __init__(self, dim, temporal=False):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim if temporal else 2 * dim, 1)
        if temporal:
            self.fc = nn.Sequential(nn.Linear(dim, dim // 4, bias=False), nn.ReLU(True),
                                    nn.Linear(dim // 4, dim, bias=False), nn.Sigmoid())
        self.temporal = temporal

    def forward(self, x):
        a = self.conv1(self.conv_spatial(self.conv0(x)))
        if self.temporal:
            return self.fc(x.mean((2, 3)))[:, :, None, None] * a * x
        f, g = a.chunk(2, 1)
        return torch.sigmoid(g) * f


class TemporalAttentionModule(AttentionModule):
    def __init__(self, dim):
        super().__init__(dim, temporal=True)


class SpatialAttention(nn.Module):
    def __init__(self, d, unit=AttentionModule):
        super().__init__()
        self.proj_1, self.activation = nn.Conv2d(d, d, 1), nn.GELU()
        self.spatial_gating_unit, self.proj_2, self.attn_shortcut = unit(d), nn.Conv2d(d, d, 1), True

    def forward(self, x):
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class TemporalAttention(SpatialAttention):
    def __init__(self, d):
        super().__init__(d, TemporalAttentionModule)


class Warp(nn.Module):  # thuml
    def __init__(self, inc, outc, neighbour=3):
        super().__init__()
        self.neighbour = neighbour
        self.conv = nn.Conv2d(inc, outc, neighbour, stride=neighbour, bias=False)
        self.warp_gate = nn.Conv2d(inc, neighbour * neighbour, 3, padding=1)


class MotionGRU(nn.Module):  # thuml
    def __init__(self, in_channel, motion_hidden=18, neighbour=3):
        super().__init__()
        c = in_channel + motion_hidden
        self.update, self.reset = nn.Conv2d(c, motion_hidden, 3, 1, 1), nn.Conv2d(c, motion_hidden, 3, 1, 1)
        self.output = nn.Conv2d(c, motion_hidden, 3, 1, 1)
        self.warp = Warp(in_channel, in_channel, neighbour)

    def forward(self, x, F_prev, D_prev):
        return ref_motiongru(dict(self.named_parameters()), "", x, F_prev, D_prev)


class NotACell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)


NotACell.__name__ = "SpatioTemporalLSTMCell"


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        C = 8
        self.cells = nn.ModuleList([SpatioTemporalLSTMCell(4, C, 3), SpatioTemporalLSTMCell(C, C, 3)])
        self.hw = HighwayCell(C, C, 3)
        self.attn = SpatialAttention(C)
        self.tattn = TemporalAttention(C)
        self.mlp = nn.Sequential(nn.Conv2d(C, 2 * C, 1), nn.Conv2d(2 * C, 2 * C, 3, padding=1, groups=2 * C))
        self.grouped = nn.Conv2d(2 * C, 2 * C, 3, padding=1, groups=2)  # not depthwise: untouched
        self.gru = MotionGRU(C)
        self.odd = NotACell()

    def forward(self, x):
        B, _, H, W = x.shape
        z = x.new_zeros(B, 8, H, W)
        h0, c0, m = self.cells[0](x, z, z, z)
        h1, c1, m = self.cells[1](h0, z, z, m)
        h2, _, _, hw = self.hw(h1, z, z, m, h0)
        y = self.tattn(self.attn(h2 + hw))
        y = self.grouped(self.mlp(y))
        off = torch.tanh(torch.cat([y, y[:, :2]], 1)) * 2  # 18 offset channels
        w, Fn, D = self.gru(y[:, :8], off, off * 0.5)
        return y.sum((1,)) + w.mean(1) + Fn.mean(1)


def _model_and_copy(cls, std):
    """A float64 model with N(0, std) parameters (so every path carries signal) and an untouched deep copy."""
    torch.manual_seed(0)
    model = cls().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model, copy.deepcopy(model)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_accelerate_swaps_and_keeps_parameters():
    pytest.importorskip("torchvision")
    model, ref = _model_and_copy(Zoo, 0.2)
    params_before = {k: id(p) for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = vpfast.accelerate(model)
    swapped = {path: new for path, _, new in report.swapped}
    assert swapped == {"cells.0": "SpatioTemporalLSTMCell", "cells.1": "SpatioTemporalLSTMCell",
                       "hw": "SpatioTemporalLSTMCell", "attn": "SpatialAttention",
                       "tattn": "TemporalAttention", "mlp.1": "DepthwiseConv2d", "gru": "MotionGRU"}
    assert model.hw.variant == "highway" and model.cells[0].variant == "predrnn"
    assert [path for path, _, _ in report.left] == ["odd"] and "no convolution" in report.left[0][2]
    assert "swapped 7" in str(report)
    assert {k: id(p) for k, p in model.named_parameters()} == params_before  # same Parameter objects
    assert list(model.state_dict()) == list(ref.state_dict())

    x = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    y_ref, y = ref(x), model(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11)
    y_ref.sum().backward()
    y.sum().backward()
    g_ref, g = _grads(ref), _grads(model)
    assert g_ref.keys() == g.keys() and len(g) > 40
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-8, atol=1e-10, msg=k)
    before = model.attn.proj_1.weight.detach().clone()
    opt.step()  # the optimizer built before the swap updates the swapped layers' parameters
    assert not torch.equal(model.attn.proj_1.weight, before)


def test_accelerate_sets_backend_on_vpfast_layers_and_validates():
    m = vpfast.models.create("tau", in_shape=(2, 1, 16, 16), hid_S=4, hid_T=8, N_T=2, N_S=2, backend="torch")
    rep = vpfast.accelerate(m, backend="cpp")
    assert len(rep) == 0
    assert all(getattr(s, "backend", "cpp") == "cpp" for s in m.modules() if hasattr(s, "backend")
               and s is not m)
    with pytest.raises(TypeError):
        vpfast.accelerate("not a module")
    with pytest.raises(ValueError):
        vpfast.accelerate(m, backend="fortran")


class BasicConv2d(nn.Module):  # OpenSTL's SimVP ConvSC body (conv [-> PixelShuffle] -> GroupNorm -> SiLU)
    def __init__(self, cin, cout, k=3, stride=1, padding=1, upsampling=False, act_norm=True, groups_norm=2):
        super().__init__()
        self.act_norm = act_norm
        if upsampling:
            self.conv = nn.Sequential(nn.Conv2d(cin, cout * 4, k, 1, padding), nn.PixelShuffle(2))
        else:
            self.conv = nn.Conv2d(cin, cout, k, stride, padding)
        self.norm = nn.GroupNorm(groups_norm, cout)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.norm(y)) if self.act_norm else y


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = BasicConv2d(1, 8, stride=2)
        self.mid = BasicConv2d(8, 8, act_norm=False)
        self.up = BasicConv2d(8, 8, upsampling=True)
        self.other = BasicConv2d(8, 8, groups_norm=4)  # not the reference's GroupNorm(2): left alone

    def forward(self, x):
        y = self.other(self.up(self.mid(self.down(x))))
        return y.view(y.shape[0], -1)  # as OpenSTL does: the swapped layers must keep the NCHW layout


def test_accelerate_swaps_simvp_basic_conv2d():
    model, ref = _model_and_copy(EncDec, 0.4)
    ids = {k: id(p) for k, p in model.named_parameters()}
    report = vpfast.accelerate(model)
    assert {path for path, _, _ in report.swapped} == {"down", "mid", "up"}
    assert [(p, why) for p, _, why in report.left] == [("other", "norm is not GroupNorm(2, C)")]
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.rand(3, 1, 12, 10, dtype=torch.float64)
    y_ref, y = ref(x), model(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys() and len(g) == 14  # mid (act_norm=False) leaves its norm unused
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-9, atol=1e-11, msg=k)


# ---- mixed precision ------------------------------------------------------------------------------------
def _amp_params():
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=cuda),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=cuda)]


def _backends(device):
    """backend="torch", the default, and on a GPU the cuda / triton backends where built / installed."""
    from vpfast import _ext
    out = ["torch", None]
    if device == "cuda":
        if _ext.built_with_cuda() and not _ext.LOAD_ERROR:
            out.append("cuda")
        if _ext.TRITON_INSTALLED and not _ext.triton_interpret():
            out.append("triton")
    return out


def _randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.6 / fan_in ** 0.5) + (1.0 if p.dim() == 3 else 0.0))
    return m


def _layer_case(kind):
    """(module, inputs) of one vpfast.nn layer, float32 on the CPU."""
    from vpfast.models.simvp import BasicConv2d as VBasicConv2d
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    vnn = vpfast.nn
    if kind == "depthwise":
        return vnn.DepthwiseConv2d(8, 8, 5, padding=2), (r(2, 8, 9, 11),)
    if kind in ("spatial_attention", "temporal_attention"):
        cls = vnn.SpatialAttention if kind == "spatial_attention" else vnn.TemporalAttention
        return cls(16), (r(2, 16, 9, 11),)
    if kind == "warp":
        return vnn.Warp(4, 4, 3), (r(2, 4, 8, 8), r(2, 18, 8, 8))
    if kind == "motion_gru":
        return vnn.MotionGRU(4, 18, 3), (r(2, 4, 8, 8), r(2, 18, 8, 8), r(2, 18, 8, 8))
    if kind == "ddr_loss":
        return vnn.DDRLoss(), (torch.rand(2, 3, 1, 8, 8, generator=g), torch.rand(2, 3, 1, 8, 8, generator=g))
    if kind.startswith("stlstm"):
        variant, ln = kind.split("-")[1], kind.endswith("-ln")
        cell = vnn.SpatioTemporalLSTMCell(4, 8, 8, 8, 3, 1, ln, variant=variant)
        return cell, (r(2, 4, 8, 8),) + tuple(r(2, 8, 8, 8) for _ in range(4 if variant == "highway" else 3))
    if kind == "convlstm":
        return vnn.ConvLSTMCell(4, 8, 8, 8, 3, 1, False), (r(2, 4, 8, 8), r(2, 8, 8, 8), r(2, 8, 8, 8))
    if kind in ("basic_conv2d", "basic_conv2d-up"):
        m = VBasicConv2d(4, 8, 3, 1, 1, upsampling=kind.endswith("-up"))
        m.channels_last = True  # as SimVP's encoder and decoder run it
        return m, (r(2, 4, 8, 6),)
    raise ValueError(kind)


LAYERS = ["depthwise", "spatial_attention", "temporal_attention", "warp", "motion_gru", "ddr_loss",
          "stlstm-predrnn", "stlstm-predrnnv2", "stlstm-highway", "stlstm-predrnn-ln", "convlstm", "basic_conv2d",
          "basic_conv2d-up"]


def _layer_step(m, inputs, backend, amp_dtype):
    """Outputs and gradients (parameters, then inputs) of sum(out^2) for m with `backend` set everywhere."""
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = backend
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    dev = xs[0].device.type
    with torch.autocast(dev, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = m(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum(o.float().square().sum() for o in outs)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(loss, params + xs, allow_unused=True)
    return outs, list(zip([f"param {k}" for k, _ in m.named_parameters()] + [f"input {i}" for i in range(len(xs))],
                          grads)), [p.dtype for p in params]


@pytest.mark.parametrize("device,amp_dtype", _amp_params())
@pytest.mark.parametrize("kind", LAYERS)
def test_every_layer_under_autocast(kind, device, amp_dtype):
    """Every vpfast.nn layer (and SimVP's BasicConv2d) runs under torch.autocast with every backend: finite
    outputs, float32 gradients for float32 parameters and inputs, and results within 8x the torch backend's
    own error at that precision (+1%), measured against the layer in float64."""
    from test_models import _assert_bounded
    m, inputs = _layer_case(kind)
    _randomise(m)
    m = m.to(device)
    inputs = [x.to(device) for x in inputs]
    out64, g64, _ = _layer_step(copy.deepcopy(m).double(), [x.double() for x in inputs], "torch", None)
    ref, gref, _ = _layer_step(m, inputs, "torch", amp_dtype)
    for backend in _backends(device):
        out, grads, _ = _layer_step(m, inputs, backend, amp_dtype)
        assert len(out) == len(out64)
        for i, (o, o_ref, o64) in enumerate(zip(out, ref, out64)):
            assert torch.isfinite(o).all(), (backend, i)
            _assert_bounded(o, o_ref, o64, 8, 1e-2, f"{backend} output {i}")
        for (k, gv), (_, gr), (_, g6) in zip(grads, gref, g64):
            if g6 is None:
                assert gv is None, (backend, k)
                continue
            assert gv.dtype == torch.float32, (backend, k, gv.dtype)
            _assert_bounded(gv, gr, g6, 8, 1e-2, f"{backend} grad {k}")


@pytest.mark.parametrize("device,amp_dtype", _amp_params())
def test_accelerated_model_under_autocast(device, amp_dtype):
    """A model of reference-style modules, accelerated, trains under autocast with backend="torch" and the
    default; its gradients are float32 and within 8x the torch backend's own error (+1%) of float64."""
    from test_models import _assert_bounded
    model, _ = _model_and_copy(Zoo, 0.2)
    vpfast.accelerate(model, backend="torch")
    model = model.float().to(device)
    x = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(device)
    out64, g64, _ = _layer_step(copy.deepcopy(model).double(), [x.double()], "torch", None)
    ref, gref, _ = _layer_step(model, [x], "torch", amp_dtype)
    for backend in _backends(device):
        out, grads, _ = _layer_step(model, [x], backend, amp_dtype)
        assert torch.isfinite(out[0]).all()
        _assert_bounded(out[0], ref[0], out64[0], 8, 1e-2, f"{backend} output")
        for (k, gv), (_, gr), (_, g6) in zip(grads, gref, g64):
            if g6 is not None:
                assert gv.dtype == torch.float32, (backend, k, gv.dtype)
                _assert_bounded(gv, gr, g6, 8, 1e-2, f"{backend} grad {k}")
