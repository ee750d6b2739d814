"""Drop-in ST-LSTM cell (OpenSTL's PredRNN / PredRNN-v2 cell, thuml MotionRNN's highway cell), MODELS.md §1."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.stlstm import GATES as _GATES, stlstm_gates, stlstm_output
from . import _mim_step
from ._recurrent import (MergedWeightsMixin, cat_conv, check_input, check_state, choose_merge, conv_block,
                         fused_backend, out_size)

VARIANTS = ("predrnn", "predrnnv2", "highway")


class SpatioTemporalLSTMCell(MergedWeightsMixin, nn.Module):
    """Spatiotemporal LSTM cell with the reference constructor and state_dict.

    SpatioTemporalLSTMCell(in_channel, num_hidden, height, width, filter_size, stride, layer_norm,
                           variant="predrnn", backend=None, merge_convs=None)

    Parameters (keys and shapes as in OpenSTL, C = num_hidden, k = filter_size; no biases):
      conv_x.0.weight [7C, in_channel, k, k]   gates i, f, g, i', f', g', o from x
      conv_h.0.weight [4C, C, k, k]            i, f, g, o from h
      conv_m.0.weight [3C, C, k, k]            i', f', g' from m
      conv_o.0.weight [C, 2C, k, k]            o from [c_t, m_t]
      conv_last.weight [C, 2C, 1, 1]
      with layer_norm: conv_{x,h,m,o}.1.{weight,bias} of shape [channels, height, width]

    forward, by variant (x: Tensor[B, in_channel, H, W]; h, c, m, highway: Tensor[B, C, H, W]):
      "predrnn"   (PredRNN):       h, c, m = cell(x, h, c, m)
      "predrnnv2" (PredRNN-v2):    h, c, m, delta_c, delta_m = cell(x, h, c, m)
                                   delta_c = i ⊙ g, delta_m = i' ⊙ g' (for the decoupling loss)
      "highway"   (MotionRNN):     h, c, m, highway = cell(x, h, c, m, highway)
                                   h = o ⊙ tanh(conv_last([c, m])) + (1 − o) ⊙ highway; the returned
                                   highway is the new h (the same tensor)
    On the fused path, the returned c and m are views of one [B, 2C, H, W] buffer (c first), and
    delta_c / delta_m views of another; treat them as read-only (as any autograd-saved tensor).

    backend: "torch" runs the reference arithmetic verbatim (separate convolutions, split, cat);
      "cpp" / "cuda" / "triton" run the fused pointwise kernels; None = $VPFAST_BACKEND or "auto". The
      "predrnn" variant with merged convolutions on cpp / cuda (no LayerNorm, autocast off, one dtype and
      device, not under torch.compile) runs each step as one autograd node, `nn._mim_step.STLSTMStep`, whose
      forward and backward are one call each of the compiled composition vpfast::mim_stlstm_step.
    merge_convs: with layer_norm off, compute the gates with two convolutions, over [x, h] (i, f, g, o)
      and over [x, m] (i', f', g'), whose weights are assembled from conv_x/conv_h/conv_m on every use
      (exact: the sums i_x + i_h happen inside the convolution). None = merge when layer_norm is off and the
      assembled weights are small (at most MERGE_AUTO_MAX_ELEMENTS elements: the `small` presets' cells merge,
      PredRNN's Moving-MNIST cells do not). Measured here: a 10-step unrolled training step (B=16, 16x16, k=5) peaked at
      0.71x the reference's memory with separate convolutions vs 0.77x merged at C=128 (0.67x vs 0.70x at
      C=64: the assembled weights and their gradients cost more than the merge saves, and the speed
      difference was within this shared machine's noise); at C=16, k=3 the merge was faster at equal memory.
      Wrap a time loop in `with cell.unroll():` to assemble them once per loop instead of once per step.
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool, variant: str = "predrnn", backend: Optional[str] = None,
                 merge_convs: Optional[bool] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.in_channel = in_channel
        self.num_hidden = num_hidden
        self.filter_size = filter_size
        self.stride = stride
        self.padding = filter_size // 2
        self.layer_norm = bool(layer_norm)
        self._forget_bias = 1.0
        self.variant = variant
        self.backend = backend
        C, k = num_hidden, filter_size
        self.merge_convs = choose_merge(merge_convs, self.layer_norm, 7 * C * (in_channel + C) * k * k)
        self.conv_x = conv_block(in_channel, 7 * C, k, stride, layer_norm, height, width)
        self.conv_h = conv_block(C, 4 * C, k, stride, layer_norm, height, width)
        self.conv_m = conv_block(C, 3 * C, k, stride, layer_norm, height, width)
        self.conv_o = conv_block(2 * C, C, k, 1, layer_norm, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, backend={self.backend!r}, merge_convs={self.merge_convs}, "
                f"layer_norm={self.layer_norm}")

    # ---- the reference arithmetic, verbatim ------------------------------------------------------------
    def _forward_reference(self, x, h, c, m, highway):
        C = self.num_hidden
        x_concat = self.conv_x(x)
        h_concat = self.conv_h(h)
        m_concat = self.conv_m(m)
        i_x, f_x, g_x, i_x_prime, f_x_prime, g_x_prime, o_x = torch.split(x_concat, C, dim=1)
        i_h, f_h, g_h, o_h = torch.split(h_concat, C, dim=1)
        i_m, f_m, g_m = torch.split(m_concat, C, dim=1)
        i_t = torch.sigmoid(i_x + i_h)
        f_t = torch.sigmoid(f_x + f_h + self._forget_bias)
        g_t = torch.tanh(g_x + g_h)
        delta_c = i_t * g_t
        c_new = f_t * c + delta_c
        i_t_prime = torch.sigmoid(i_x_prime + i_m)
        f_t_prime = torch.sigmoid(f_x_prime + f_m + self._forget_bias)
        g_t_prime = torch.tanh(g_x_prime + g_m)
        delta_m = i_t_prime * g_t_prime
        m_new = f_t_prime * m + delta_m
        mem = torch.cat((c_new, m_new), 1)
        o_t = torch.sigmoid(o_x + o_h + self.conv_o(mem))
        h_new = o_t * torch.tanh(self.conv_last(mem))
        if self.variant == "highway":
            h_new = h_new + (1 - o_t) * highway
            return h_new, c_new, m_new, h_new
        if self.variant == "predrnnv2":
            return h_new, c_new, m_new, delta_c, delta_m
        return h_new, c_new, m_new

    # ---- the fused path --------------------------------------------------------------------------------
    def _derive_merged_weights(self):
        C = self.num_hidden
        wx, wh, wm = self.conv_x[0].weight, self.conv_h[0].weight, self.conv_m[0].weight
        w_xh = torch.cat((torch.cat((wx[: 3 * C], wx[6 * C:]), 0), wh), 1)  # [4C, Cin + C, k, k]: i, f, g, o
        w_xm = torch.cat((wx[3 * C: 6 * C], wm), 1)  # [3C, Cin + C, k, k]: i', f', g'
        return w_xh, w_xm

    def _forward_fused(self, backend, x, h, c, m, highway):
        C = self.num_hidden
        if self.merge_convs:
            w_xh, w_xm = self.merged_weights()
            h_g = cat_conv(x, h, w_xh, self.stride, self.padding)
            m_g = cat_conv(x, m, w_xm, self.stride, self.padding)
            x_g = None
        else:
            x_g, h_g, m_g = self.conv_x(x), self.conv_h(h), self.conv_m(m)
        with_delta = self.variant == "predrnnv2"
        # the public ops, not their kernels: they cast by their autocast policy, run the kernel with autocast
        # off, and auto picks by what they are actually handed (fused_backend predicted that choice)
        cm, o_part, delta = stlstm_gates(x_g, h_g, m_g, c, m, self._forget_bias, with_delta,
                                        backend=self.backend)
        o_m = self.conv_o(cm)
        last = self.conv_last(cm)
        h_new = stlstm_output(o_part, o_m, last, highway if self.variant == "highway" else None,
                              backend=self.backend)
        c_new, m_new = cm[:, :C], cm[:, C:]
        if self.variant == "highway":
            return h_new, c_new, m_new, h_new
        if with_delta:
            return h_new, c_new, m_new, delta[:, :C], delta[:, C:]
        return h_new, c_new, m_new

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor,
                highway: Optional[torch.Tensor] = None):
        """One step; see the class docstring for what each variant returns."""
        w = self.conv_x[0].weight
        check_input(x, self.in_channel, w)
        B, _, H, W = x.shape
        k = self.filter_size
        shape = (B, self.num_hidden, out_size(H, k, self.stride), out_size(W, k, self.stride))
        check_state("h", h, "x", x, shape)
        check_state("c", c, "x", x, shape)
        check_state("m", m, "x", x, shape)
        if self.variant == "highway":
            if highway is None:
                raise TypeError("the highway variant needs forward(x, h, c, m, highway)")
            check_state("highway", highway, "x", x, shape)
        elif highway is not None:
            raise TypeError(f"highway is only accepted by variant='highway', this cell is {self.variant!r}")
        C = self.num_hidden
        gate_shapes = [(B, 4 * C) + shape[2:], (B, 3 * C) + shape[2:]]
        backend = fused_backend(_GATES, self.backend, x, gate_shapes, (c, m))
        if backend == "torch":
            return self._forward_reference(x, h, c, m, highway)
        if self.variant == "predrnn" and not self.layer_norm and not torch.compiler.is_compiling() and \
                _mim_step.usable(backend, self.merge_convs, (x, h, c, m, w)):
            # PredRNN's merged step as one autograd node (nn/_mim_step.py STLSTMStep, MIM's layer 0): one call of
            # the compiled composition each way instead of ~10 op calls and their autograd bridges
            w_xh, w_xm = self.merged_weights()
            return _mim_step.STLSTMStep.apply(x, h, c, m, w_xh, w_xm, self.conv_o[0].weight, self.conv_last.weight,
                                              (self.stride,) * 2, (self.padding,) * 2, self._forget_bias)
        return self._forward_fused(backend, x, h, c, m, highway)
