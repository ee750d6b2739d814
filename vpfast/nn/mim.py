"""Drop-in MIM layers (OpenSTL's Memory In Memory modules), MODELS.md §11: the MIM-N module and the MIM block
with its MIM-S cell.

No fused kernel of their own: their output gates, h = σ(a + b) ⊙ tanh(y), are the ST-LSTM's output stage, which
the fast backends run with the fused `vpfast.ops.stlstm_output` (same sums, in the same order); everything
else is the reference arithmetic below on every backend. Unlike
OpenSTL's MIMBlock, the MIM-S state S is an argument and a result of `MIMBlock.forward`, never an attribute:
nothing is carried from one call to the next (the model decides what S a sequence starts from).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.stlstm import OUTPUT as _STLSTM_OUTPUT, stlstm_output
from ._recurrent import check_input, check_state, conv_block, fused_backend, keep_cell_args, state_shape


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


class MIMN(nn.Module):
    """MIM-N (OpenSTL `MIMN`, the model's `stlstm_layer_diff.j`): a peephole LSTM over the differences of the
    hidden states below.

    MIMN(in_channel, num_hidden, height, width, filter_size, stride, layer_norm=False, backend=None)

    Parameters (C = num_hidden, k = filter_size, no biases): ct_weight [2C, height, width] and oc_weight
    [C, height, width] (per-position peepholes, initialised to 0), conv_h_concat.0.weight [4C, C, k, k],
    conv_x_concat.0.weight [4C, in_channel, k, k] (gates i, g, f, o), conv_last.weight [C, 2C, 1, 1], which
    the reference builds and never uses (kept for the state_dict).

    forward(x: Tensor[B, in_channel, H, W], h, c: Tensor[B, C, H, W]) -> (h', c'), with
      c' = σ(f_h + f_x + c ⊙ ct_f + 1) ⊙ c + σ(i_h + i_x + c ⊙ ct_i) ⊙ tanh(g_h + g_x),
      h' = σ(o_h + o_x + c' ⊙ oc_weight) ⊙ tanh(c')
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool = False, backend: Optional[str] = None):
        super().__init__()
        _check_layer_norm(layer_norm)
        _peephole_cell_init(self, in_channel, num_hidden, height, width, filter_size, stride, backend)
        C, k = num_hidden, filter_size
        self.conv_h_concat = conv_block(C, 4 * C, k, stride, False, height, width)
        self.conv_x_concat = conv_block(in_channel, 4 * C, k, stride, False, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)  # unused

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """h', c' = mimn(x, h, c); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x_concat[0].weight)
        shape = state_shape(self, x)
        check_state("h", h, "x", x, shape)
        check_state("c", c, "x", x, shape)
        _check_map(shape, self.oc_weight)
        return _peephole_lstm(self.conv_h_concat, self.conv_x_concat, self.ct_weight, self.oc_weight, x, h, c,
                              self._forget_bias, self.backend)


def _check_map(shape, oc_weight):
    if tuple(shape[2:]) != tuple(oc_weight.shape[1:]):
        raise ValueError(f"the state maps must be {tuple(oc_weight.shape[1:])} (the peephole weights are built for "
                         f"height x width), got {tuple(shape[2:])}")


class MIMBlock(nn.Module):
    """MIM block (OpenSTL `MIMBlock`, the model's `stlstm_layer.l` for l >= 1).

    MIMBlock(in_channel, num_hidden, height, width, filter_size, stride, layer_norm=False, backend=None)

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
    detaches it before the next step (vpfast.models.MIM does so unless s_bptt=True).
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool = False, backend: Optional[str] = None):
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

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, x: torch.Tensor, diff_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor,
                s: torch.Tensor):
        """h, c, m, s = block(x, diff_h, h, c, m, s); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x_cc[0].weight)
        shape = state_shape(self, x)
        for name, t in (("diff_h", diff_h), ("h", h), ("c", c), ("m", m), ("s", s)):
            check_state(name, t, "x", x, shape)
        _check_map(shape, self.oc_weight)
        C = self.num_hidden
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
