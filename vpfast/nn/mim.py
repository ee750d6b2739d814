"""Drop-in MIM layers (OpenSTL's Memory In Memory modules), MODELS.md §11: the MIM-N module and the MIM block
with its MIM-S cell.

No fused kernel of their own; on the fast backends they run existing ops whose arithmetic is theirs:
- output gates h = σ(a + b) ⊙ tanh(y): `vpfast.ops.stlstm_output` (the ST-LSTM's output stage);
- MIM-N's cell update c' = σ(f + 1) ⊙ c + σ(i) ⊙ tanh(g): `vpfast.ops.convlstm` with forget bias 1 (its h output,
  which lacks MIM-N's peephole, is not used);
- in a MIM block, the MIM-S cell update and the memory update m_t (both with forget bias 1) together: the two
  halves of `vpfast.ops.stlstm_gates` (c-half: S, m-half: m), which writes [S_t, m_t] into one buffer.
The peephole terms c ⊙ ct_weight are added in place into the gate convolution's output, the convolutions over
x and h of MIM-N and MIM-S are merged into one over [x, h] (`merge_convs`, as the ST-LSTM cell does), the
gates' channel order becomes the ops' i, f, g, o by reordering the weights (derived once per
`with cell.unroll():`), and conv_last runs over [c_t, m_t] without saving their concatenation.
With merged convolutions on the compiled backends (cpp, cuda) and autocast off, each MIM-N and MIM block step is
one autograd node instead (nn/_mim_step.py: the same kernels and saved maps, backward written out), which is
what vpfast.models.MIM runs; the multi-node path below serves the other cases.
backend="torch" runs the reference arithmetic verbatim. Unlike
OpenSTL's MIMBlock, the MIM-S state S is an argument and a result of `MIMBlock.forward`, never an attribute:
nothing is carried from one call to the next (the model decides what S a sequence starts from).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.convlstm import OP as _CONVLSTM, convlstm
from ..ops.stlstm import GATES as _GATES, OUTPUT as _STLSTM_OUTPUT, stlstm_gates, stlstm_output
from . import _mim_step
from ._recurrent import (MergedWeightsMixin, _pair, cat_conv, check_input, check_state, choose_merge, conv_block,
                         fused_backend, keep_cell_args, permute_blocks, state_shape)

_IGFO_TO_IFGO = (0, 2, 1, 3)  # the reference's gate order i, g, f, o -> the fused ops' i, f, g, o


def _output_gate(backend, o_part, o_m, y):
    """σ(o_part + o_m) ⊙ tanh(y), all Tensor[B, C, H, W]: fused stlstm_output unless the backend is torch."""
    if fused_backend(_STLSTM_OUTPUT, backend, y, [tuple(y.shape)] * 3, ()) == "torch":
        return torch.sigmoid(o_part + o_m) * torch.tanh(y)
    return stlstm_output(o_part, o_m, y, backend=backend)


def _peephole_lstm(conv_h, conv_x, ct_weight, oc_weight, x, h, c, forget_bias, backend):
    """The peephole LSTM shared by MIM-N and MIM-S: gates split i, g, f, o; Hadamard peepholes."""
    C = c.shape[1]
    i_h, g_h, f_h, o_h = torch.split(conv_h(h), C, dim=1)
    i_x, g_x, f_x, o_x = torch.split(conv_x(x), C, dim=1)
    i_c, f_c = torch.split(c.repeat(1, 2, 1, 1) * ct_weight, C, dim=1)
    i_t = torch.sigmoid(i_h + i_x + i_c)
    f_t = torch.sigmoid(f_h + f_x + f_c + forget_bias)
    c_new = f_t * c + i_t * torch.tanh(g_h + g_x)
    return _output_gate(backend, o_h + o_x, c_new * oc_weight, c_new), c_new


class _Peepholes(torch.autograd.Function):
    """gates [B, 4C, H, W] (i, f, g, o) with c ⊙ ct_weight[:C] added to i and c ⊙ ct_weight[C:] to f, in place
    (the convolution's output is not needed by its backward), and optionally a copy of the o gates.

    One node instead of autograd's in-place-on-slice (CopySlices) and slice nodes, whose backward zero-fills a
    full-size gradient per slice and adds them up (~6% of a MIM training step here); backward saves c and
    ct_weight only (c is alive anyway)."""

    @staticmethod
    def forward(ctx, gates, c, ct_weight, with_o):
        C = c.shape[1]
        gates[:, :C].addcmul_(c, ct_weight[:C])
        gates[:, C: 2 * C].addcmul_(c, ct_weight[C:])
        ctx.mark_dirty(gates)
        ctx.save_for_backward(c, ct_weight)
        return (gates, gates[:, 3 * C:].clone()) if with_o else gates

    @staticmethod
    def backward(ctx, g, g_o=None):
        c, ct_weight = ctx.saved_tensors
        C = c.shape[1]
        g_i, g_f = g[:, :C], g[:, C: 2 * C]
        g_c = g_ct = None
        if ctx.needs_input_grad[1]:
            g_c = g_i * ct_weight[:C] + g_f * ct_weight[C:]
        if ctx.needs_input_grad[2]:
            g_ct = torch.cat(((g_i * c).sum(0), (g_f * c).sum(0)), 0)
        if g_o is not None:
            g = torch.cat((g[:, :3 * C], g[:, 3 * C:] + g_o), 1)
        return g, g_c, g_ct, None


def _add_peepholes(gates, c, ct_weight, with_o=False):
    """_Peepholes; under autocast the bf16 gates are promoted first, as the reference's sums would be."""
    dt = torch.promote_types(gates.dtype, torch.promote_types(c.dtype, ct_weight.dtype))
    return _Peepholes.apply(gates.to(dt), c.to(dt), ct_weight.to(dt), with_o)


class _BlockGates(torch.autograd.Function):
    """The MIM block's sums of its three convolutions (x_g: i, f, g, o over x; s_g: i, f, g, o over m; t_g: i, g, o
    over h_{t-1}) -> (memory gates [i_x+i_s, f_x+f_s, g_x+g_s], i_x+i_t, g_x+g_t, o_x+o_t, o_s). One node whose
    backward writes each convolution's gradient with one cat (autograd's slices would zero-fill a full-size
    gradient per slice and add them)."""

    @staticmethod
    def forward(ctx, x_g, s_g, t_g):
        C = t_g.shape[1] // 3
        x_i, _, x_gg, x_o = x_g.split(C, 1)
        t_i, t_gg, t_o = t_g.split(C, 1)
        return x_g[:, :3 * C] + s_g[:, :3 * C], x_i + t_i, x_gg + t_gg, x_o + t_o, s_g[:, 3 * C:].clone()

    @staticmethod
    def backward(ctx, g_m, g_i, g_g, g_o, g_os):
        gm_i, gm_f, gm_g = g_m.chunk(3, 1)
        return (torch.cat((gm_i + g_i, gm_f, gm_g + g_g, g_o), 1), torch.cat((g_m, g_os), 1),
                torch.cat((g_i, g_g, g_o), 1))


def _derive_peephole_weights(cell, conv_x, conv_h):
    """(merged [4C, Cx + Ch, k, k]) or (x weight, h weight), gates reordered to i, f, g, o."""
    C, wx, wh = cell.num_hidden, conv_x[0].weight, conv_h[0].weight
    if cell.merge_convs:
        return (permute_blocks(torch.cat((wx, wh), 1), _IGFO_TO_IFGO, C),)
    return permute_blocks(wx, _IGFO_TO_IFGO, C), permute_blocks(wh, _IGFO_TO_IFGO, C)


def _peephole_gates(cell, weights, x, h):
    """The peephole LSTM's convolutions (i, f, g, o, without peepholes) from `_derive_peephole_weights`."""
    pad = cell.filter_size // 2
    if len(weights) == 1:
        gates = cat_conv(x, h, weights[0], cell.stride, pad)
    else:
        gates = F.conv2d(x, weights[0], None, cell.stride, pad) + F.conv2d(h, weights[1], None, cell.stride, pad)
    return gates


def _peephole_cell_init(cell, in_channel, num_hidden, height, width, filter_size, stride, backend):
    """What MIM-N and the MIM block build first: their arguments and the peephole weights ct_weight
    [2C, height, width] and oc_weight [C, height, width], zeros, registered in the reference's order."""
    keep_cell_args(cell, in_channel, num_hidden, backend, filter_size=filter_size, stride=stride)
    cell.ct_weight = nn.Parameter(torch.zeros(2 * num_hidden, height, width))
    cell.oc_weight = nn.Parameter(torch.zeros(num_hidden, height, width))


def _check_layer_norm(layer_norm):
    if layer_norm:
        raise ValueError("layer_norm=True is not supported by the MIM layers (OpenSTL's MIM configurations run "
                         "without it)")


class MIMN(MergedWeightsMixin, nn.Module):
    """MIM-N (OpenSTL `MIMN`, the model's `stlstm_layer_diff.j`): a peephole LSTM over the differences of the
    hidden states below.

    MIMN(in_channel, num_hidden, height, width, filter_size, stride, layer_norm=False, backend=None,
         merge_convs=None)

    Parameters (C = num_hidden, k = filter_size, no biases): ct_weight [2C, height, width] and oc_weight
    [C, height, width] (per-position peepholes, initialised to 0), conv_h_concat.0.weight [4C, C, k, k],
    conv_x_concat.0.weight [4C, in_channel, k, k] (gates i, g, f, o), conv_last.weight [C, 2C, 1, 1], which
    the reference builds and never uses (kept for the state_dict).

    forward(x: Tensor[B, in_channel, H, W], h, c: Tensor[B, C, H, W]) -> (h', c'), with
      c' = σ(f_h + f_x + c ⊙ ct_f + 1) ⊙ c + σ(i_h + i_x + c ⊙ ct_i) ⊙ tanh(g_h + g_x),
      h' = σ(o_h + o_x + c' ⊙ oc_weight) ⊙ tanh(c')
    merge_convs (fast backends): one convolution over [x, h] with weights assembled from conv_x_concat and
      conv_h_concat (exact: the sums happen inside it); None = when they have at most MERGE_AUTO_MAX_ELEMENTS
      elements (the small presets merge, the Moving-MNIST ones do not), as SpatioTemporalLSTMCell.
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool = False, backend: Optional[str] = None, merge_convs: Optional[bool] = None):
        super().__init__()
        _check_layer_norm(layer_norm)
        _peephole_cell_init(self, in_channel, num_hidden, height, width, filter_size, stride, backend)
        C, k = num_hidden, filter_size
        self.merge_convs = choose_merge(merge_convs, False, 4 * C * (in_channel + C) * k * k)
        self.conv_h_concat = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_x_concat = conv_block(in_channel, 4 * C, k, stride, False, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)  # unused

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, merge_convs={self.merge_convs}"

    def _derive_merged_weights(self):
        return _derive_peephole_weights(self, self.conv_x_concat, self.conv_h_concat)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """h', c' = mimn(x, h, c); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x_concat[0].weight)
        shape = state_shape(self, x)
        check_state("h", h, "x", x, shape)
        check_state("c", c, "x", x, shape)
        _check_map(shape, self.oc_weight)
        C = self.num_hidden
        name = fused_backend(_CONVLSTM, self.backend, x, [(shape[0], 4 * C) + shape[2:]], (c,))
        if name == "torch":
            return _peephole_lstm(self.conv_h_concat, self.conv_x_concat, self.ct_weight, self.oc_weight, x, h, c,
                                  self._forget_bias, self.backend)
        if _mim_step.usable(name, self.merge_convs,
                            (x, h, c, self.ct_weight, self.oc_weight, self.conv_x_concat[0].weight)):
            (w,) = self.merged_weights()
            pad = self.filter_size // 2
            return _mim_step.MIMNStep.apply(x, h, c, w, self.ct_weight, self.oc_weight, _pair(self.stride),
                                            (pad, pad), self._forget_bias)
        gates, o = _add_peepholes(_peephole_gates(self, self.merged_weights(), x, h), c, self.ct_weight, True)
        _, c_new = convlstm(None, gates, c, self._forget_bias, True, backend=self.backend)
        return _output_gate(self.backend, o, c_new * self.oc_weight, c_new), c_new


def _check_map(shape, oc_weight):
    if tuple(shape[2:]) != tuple(oc_weight.shape[1:]):
        raise ValueError(f"the state maps must be {tuple(oc_weight.shape[1:])} (the peephole weights are built for "
                         f"height x width), got {tuple(shape[2:])}")


class MIMBlock(MergedWeightsMixin, nn.Module):
    """MIM block (OpenSTL `MIMBlock`, the model's `stlstm_layer.l` for l >= 1).

    MIMBlock(in_channel, num_hidden, height, width, filter_size, stride, layer_norm=False, backend=None,
             merge_convs=None)

    Parameters (C = num_hidden, k = filter_size, no biases): ct_weight [2C, height, width], oc_weight
    [C, height, width] (the MIM-S peepholes, initialised to 0); conv_t_cc.0.weight [3C, in_channel, k, k]
    over h_{t-1} (i_t, g_t, o_t); conv_s_cc.0.weight [4C, C, k, k] over m (i_s, g_s, f_s, o_s);
    conv_x_cc.0.weight [4C, C, k, k] over x (i_x, g_x, f_x, o_x); conv_h_concat / conv_x_concat [4C, C, k, k]
    (MIM-S over c_{t-1} and D); conv_last.weight [C, 2C, 1, 1]. The reference declares conv_t_cc with
    in_channel inputs and conv_x_cc with C inputs although it applies them the other way round, so
    in_channel must equal num_hidden (it does in every configuration, 128 x 4).

    forward(x, diff_h, h, c, m, s), all Tensor[B, C, H, W] -> (h, c, m, s):
      m_t = σ(f_x + f_s + 1) ⊙ m + σ(i_x + i_s) ⊙ tanh(g_x + g_s)
      (T_t, s_t) = MIM-S peephole LSTM of (x = diff_h, h = c_{t-1}, c = s)
      c_t = T_t + σ(i_x + i_t) ⊙ tanh(g_x + g_t)
      h_t = σ(o_x + o_t + o_s) ⊙ tanh(conv_last([c_t, m_t]))
    diff_h is the MIM-N output for this layer (zeros at the first step). The returned s is not detached; OpenSTL
    detaches it before the next step (vpfast.models.MIM does so unless s_bptt=True). On the fast path the
    returned s and m are views of one [B, 2C, H, W] buffer (s first): treat them as read-only.
    merge_convs: MIM-S's convolutions over D and c_{t-1} merged into one over [D, c_{t-1}], as in MIMN.
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool = False, backend: Optional[str] = None, merge_convs: Optional[bool] = None):
        super().__init__()
        _check_layer_norm(layer_norm)
        if in_channel != num_hidden:
            raise ValueError(f"MIMBlock needs in_channel == num_hidden (the reference declares conv_t_cc and "
                             f"conv_x_cc with their inputs swapped), got {in_channel} and {num_hidden}")
        _peephole_cell_init(self, in_channel, num_hidden, height, width, filter_size, stride, backend)
        C, k = num_hidden, filter_size
        self.conv_t_cc = conv_block(in_channel, 3 * C, k, stride, False, height, width)
        self.conv_s_cc = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_x_cc = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_h_concat = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_x_concat = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)
        self.merge_convs = choose_merge(merge_convs, False, 8 * C * C * k * k)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, merge_convs={self.merge_convs}"

    def _derive_merged_weights(self):
        C = self.num_hidden
        return (_derive_peephole_weights(self, self.conv_x_concat, self.conv_h_concat),
                permute_blocks(self.conv_x_cc[0].weight, _IGFO_TO_IFGO, C),
                permute_blocks(self.conv_s_cc[0].weight, _IGFO_TO_IFGO, C))

    def _cast_merged(self, w, dt):
        return w if dt is None else tuple(MergedWeightsMixin._cast_merged(t, dt) for t in w)

    def _forward_fused(self, x, diff_h, h, c, m, s):
        C, k, st = self.num_hidden, self.filter_size, self.stride
        w_mims, w_x, w_s = self.merged_weights()
        x_g = F.conv2d(x, w_x, None, st, k // 2)  # i, f, g, o
        s_g = F.conv2d(m, w_s, None, st, k // 2)  # i, f, g, o
        t_g = self.conv_t_cc(h)  # i, g, o (the reference's order)
        m_g, a_i, a_g, o_xt, o_s = _BlockGates.apply(x_g, s_g, t_g)
        s_g = _add_peepholes(_peephole_gates(self, w_mims, diff_h, c), s, self.ct_weight)
        sm, o_mims, _ = stlstm_gates(None, s_g, m_g, s, m, self._forget_bias, False, backend=self.backend)
        s_new, m_new = sm.split(C, 1)
        t_mem = _output_gate(self.backend, o_mims, s_new * self.oc_weight, s_new)
        c_new = t_mem + torch.sigmoid(a_i) * torch.tanh(a_g)
        last = cat_conv(c_new, m_new, self.conv_last.weight, 1, 0)
        h_new = _output_gate(self.backend, o_xt, o_s, last)
        return h_new, c_new, m_new, s_new

    def _forward_one_node(self, x, diff_h, h, c, m, s):
        (w_mims,), w_x, w_s = self.merged_weights()
        pad = self.filter_size // 2
        return _mim_step.MIMBlockStep.apply(x, diff_h, h, c, m, s, w_x, w_s, self.conv_t_cc[0].weight, w_mims,
                                            self.ct_weight, self.oc_weight, self.conv_last.weight,
                                            _pair(self.stride), (pad, pad), self._forget_bias)

    def forward(self, x: torch.Tensor, diff_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor,
                s: torch.Tensor):
        """h, c, m, s = block(x, diff_h, h, c, m, s); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x_cc[0].weight)
        shape = state_shape(self, x)
        for name, t in (("diff_h", diff_h), ("h", h), ("c", c), ("m", m), ("s", s)):
            check_state(name, t, "x", x, shape)
        _check_map(shape, self.oc_weight)
        C = self.num_hidden
        gate_shapes = [(shape[0], 4 * C) + shape[2:], (shape[0], 3 * C) + shape[2:]]
        name = fused_backend(_GATES, self.backend, x, gate_shapes, (s, m))
        if name != "torch":
            if _mim_step.usable(name, self.merge_convs,
                                (x, diff_h, h, c, m, s, self.ct_weight, self.oc_weight, self.conv_x_cc[0].weight)):
                return self._forward_one_node(x, diff_h, h, c, m, s)
            return self._forward_fused(x, diff_h, h, c, m, s)
        i_t, g_t, o_t = torch.split(self.conv_t_cc(h), C, dim=1)
        i_s, g_s, f_s, o_s = torch.split(self.conv_s_cc(m), C, dim=1)
        i_x, g_x, f_x, o_x = torch.split(self.conv_x_cc(x), C, dim=1)
        m_new = (torch.sigmoid(f_x + f_s + self._forget_bias) * m
                 + torch.sigmoid(i_x + i_s) * torch.tanh(g_x + g_s))
        t_mem, s_new = _peephole_lstm(self.conv_h_concat, self.conv_x_concat, self.ct_weight, self.oc_weight,
                                      diff_h, c, s, self._forget_bias, self.backend)
        c_new = t_mem + torch.sigmoid(i_x + i_t) * torch.tanh(g_x + g_t)
        h_new = _output_gate(self.backend, o_x + o_t, o_s, self.conv_last(torch.cat((c_new, m_new), 1)))
        return h_new, c_new, m_new, s_new
