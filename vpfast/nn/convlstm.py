"""Drop-in ConvLSTM cell (OpenSTL), MODELS.md §2."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.convlstm import OP as _OP, convlstm
from ._recurrent import (MergedWeightsMixin, cat_conv, check_input, check_state, choose_merge, conv_block,
                         fused_backend, out_size)


class ConvLSTMCell(MergedWeightsMixin, nn.Module):
    """ConvLSTM cell with OpenSTL's constructor and state_dict.

    ConvLSTMCell(in_channel, num_hidden, height, width, filter_size, stride, layer_norm,
                 tanh_c=True, backend=None, merge_convs=None)

    Parameters (C = num_hidden, k = filter_size, no biases): conv_x.0.weight [4C, in_channel, k, k] and
    conv_h.0.weight [4C, C, k, k] (gates i, f, g, o); conv_o.0.weight [C, 2C, k, k] and
    conv_last.weight [C, 2C, 1, 1], which the reference constructs but its forward never uses (kept for
    state_dict compatibility); with layer_norm the `.1.{weight,bias}` LayerNorm affines.

    forward(x: Tensor[B, in_channel, H, W], h: Tensor[B, C, H, W], c: Tensor[B, C, H, W]) -> (h, c)
      i = σ(i_x + i_h), f = σ(f_x + f_h), g = tanh(g_x + g_h), o = σ(o_x + o_h), c = f ⊙ c + i ⊙ g,
      h = o ⊙ tanh(c)  (tanh_c=True, OpenSTL today)  or  h = o ⊙ g  (tanh_c=False, OpenSTL <= v0.3.0,
      which produced OpenSTL's published Moving-MNIST ConvLSTM weights).

    backend: "torch" runs the reference arithmetic verbatim; "cpp" / "cuda" / "triton" the fused kernel;
      None = $VPFAST_BACKEND or "auto".
    merge_convs: with layer_norm off, one convolution over [x, h] whose weight is assembled from conv_x and
      conv_h on every use; `with cell.unroll():` assembles it once per time loop. None = merge when
      layer_norm is off and the assembled weight is small (at most MERGE_AUTO_MAX_ELEMENTS elements, see
      vpfast/nn/_recurrent.py for the measurements behind it).
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool, tanh_c: bool = True, backend: Optional[str] = None,
                 merge_convs: Optional[bool] = None):
        super().__init__()
        self.in_channel = in_channel
        self.num_hidden = num_hidden
        self.filter_size = filter_size
        self.stride = stride
        self.padding = filter_size // 2
        self.layer_norm = bool(layer_norm)
        self.tanh_c = bool(tanh_c)
        self.backend = backend
        C, k = num_hidden, filter_size
        self.merge_convs = choose_merge(merge_convs, self.layer_norm, 4 * C * (in_channel + C) * k * k)
        self.conv_x = conv_block(in_channel, 4 * C, k, stride, layer_norm, height, width)
        self.conv_h = conv_block(C, 4 * C, k, stride, layer_norm, height, width)
        self.conv_o = conv_block(2 * C, C, k, 1, layer_norm, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)

    def extra_repr(self) -> str:
        return (f"tanh_c={self.tanh_c}, backend={self.backend!r}, merge_convs={self.merge_convs}, "
                f"layer_norm={self.layer_norm}")

    def _forward_reference(self, x, h, c):
        C = self.num_hidden
        x_concat = self.conv_x(x)
        h_concat = self.conv_h(h)
        i_x, f_x, g_x, o_x = torch.split(x_concat, C, dim=1)
        i_h, f_h, g_h, o_h = torch.split(h_concat, C, dim=1)
        i_t = torch.sigmoid(i_x + i_h)
        f_t = torch.sigmoid(f_x + f_h)
        g_t = torch.tanh(g_x + g_h)
        c_new = f_t * c + i_t * g_t
        o_t = torch.sigmoid(o_x + o_h)
        h_new = o_t * torch.tanh(c_new) if self.tanh_c else o_t * g_t
        return h_new, c_new

    def _derive_merged_weights(self):
        return torch.cat((self.conv_x[0].weight, self.conv_h[0].weight), 1)  # [4C, Cin + C, k, k]

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """h, c = cell(x, h, c); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x[0].weight)
        B, _, H, W = x.shape
        k = self.filter_size
        shape = (B, self.num_hidden, out_size(H, k, self.stride), out_size(W, k, self.stride))
        check_state("h", h, "x", x, shape)
        check_state("c", c, "x", x, shape)
        backend = fused_backend(_OP, self.backend, x, [(B, 4 * self.num_hidden) + shape[2:]], (c,))
        if backend == "torch":
            return self._forward_reference(x, h, c)
        if self.merge_convs:
            h_g = cat_conv(x, h, self.merged_weights(), self.stride, self.padding)
            x_g = None
        else:
            x_g, h_g = self.conv_x(x), self.conv_h(h)
        return convlstm(x_g, h_g, c, 0.0, self.tanh_c, backend=self.backend)
