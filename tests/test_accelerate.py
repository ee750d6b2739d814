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
