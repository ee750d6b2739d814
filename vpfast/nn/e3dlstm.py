"""Drop-in Eidetic 3D LSTM cell (OpenSTL's e3dlstm_modules), MODELS.md §12.

Every state is 5-D, [B, C, window, H, W]. The 3-D convolutions stay with PyTorch. The recall attention runs
as written (bmm, softmax, bmm) with backend="torch"; every other backend hands it to PyTorch's
scaled_dot_product_attention with scale 1, the same softmax(Q Kᵀ) V computed blockwise, without keeping the
[B, N, n*N] attention matrix for backward. Measured here (1 thread, float32, B=4, C=16, N=512 rows, 5120
keys): forward+backward 0.28 s vs 0.66 s; float64 results differ from the reference by rounding (3e-14).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import resolve
from ._recurrent import keep_cell_args


def _triple(k):
    return (k, k, k) if isinstance(k, int) else tuple(int(v) for v in k)


class TFConv3d(nn.Module):
    """OpenSTL's `tf_Conv3d`: Conv3d without bias (key `conv3d.weight`), then nearest interpolation back to the
    input's (T, H, W). With the cell's (2, k, k) kernel on a 2-frame window and no temporal padding the
    convolution yields one time slice, which the interpolation repeats: both slices of every gate are equal.

    TFConv3d(in_channels, out_channels, kernel_size, stride=1, padding=0)
    forward(x: Tensor[B, in_channels, T, H, W]) -> Tensor[B, out_channels, T, H, W]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv3d(x), size=x.shape[-3:], mode="nearest")


def recall(q: torch.Tensor, history: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The eidetic recall as OpenSTL computes it: a raw-reshape attention.

    q: Tensor[B, C, T, H, W]; history: Tensor[B, n*C, T, H, W] (past cell states on the channel axis).
    Each sample's q, flattened in (C, T, H, W) order, is cut into T*H*W rows of C consecutive values; the
    history is cut the same way into n*T*H*W rows, which serve as keys and values; A = softmax over the keys
    of Q Kᵀ (no 1/sqrt(C) scale), and A V is folded back by the same flat layout -> Tensor[B, C, T, H, W].
    fused: compute it with F.scaled_dot_product_attention (same arithmetic, blockwise; see the module docstring).
    """
    B, C = q.shape[:2]
    query = q.reshape(B, -1, C)
    keys = history.reshape(B, -1, C)
    if fused:  # under autocast SDPA casts like bmm does (both to the autocast dtype on CPU and CUDA)
        out = F.scaled_dot_product_attention(query[:, None], keys[:, None], keys[:, None], scale=1.0)
        return out[:, 0].reshape(q.shape)
    attn = torch.softmax(torch.bmm(query, keys.transpose(1, 2)), dim=2)
    return torch.bmm(attn, keys).reshape(q.shape)


class Eidetic3DLSTMCell(nn.Module):
    """Eidetic 3D LSTM cell with OpenSTL's constructor and state_dict.

    Eidetic3DLSTMCell(in_channel, num_hidden, window_length, height, width, filter_size=(2, 5, 5), stride=1,
                      layer_norm=False, update_memory=False, backend=None)

    Parameters (C = num_hidden, kernel filter_size with padding (0, k//2, k//2), no biases):
      _norm_c_t.{weight,bias} [C, window_length, height, width] (LayerNorm, always on)
      conv_x.0.conv3d.weight [7C, in_channel, ...]   i, g, r, o, i', g', f'
      conv_h.0.conv3d.weight [4C, C, ...]            i, g, r, o
      conv_gm.0.conv3d.weight [4C, C, ...]           i, f, g, m̂ from the global memory M
      conv_new_cell / conv_new_gm .0.conv3d.weight [C, C, ...]
      conv_last.conv3d.weight [C, 2C, 1, 1, 1]

    forward(x: Tensor[B, in_channel, T, H, W], h, c, m: Tensor[B, C, T, H, W],
            history: Tensor[B, n*C, T, H, W]) -> (h, c, m):
      i = σ(i_x + i_h), r = σ(r_x + r_h), g = tanh(g_x + g_h)
      c_t = LN(c + recall(r, history)) + i ⊙ g
      M_t = σ(f'_x + f_m + 1) ⊙ tanh(m̂) + σ(i'_x + i_m) ⊙ tanh(g'_x + g_m)
      o = tanh(o_x + o_h + conv_new_cell(c_t) + conv_new_gm(M_t)),  h_t = tanh(conv_last([c_t, M_t])) ⊙ σ(o)
    update_memory: False (OpenSTL, and the TF original) returns the memory m it was given, so a model's global
      memory stays at its initial zeros, conv_gm and the f' rows of conv_x never get a gradient; True returns
      M_t, the eidetic memory flow the paper describes (OpenSTL's checkpoints were trained without it).
    """

    def __init__(self, in_channel: int, num_hidden: int, window_length: int, height: int, width: int,
                 filter_size=(2, 5, 5), stride=1, layer_norm: bool = False, update_memory: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if layer_norm:
            raise ValueError("layer_norm=True is not supported by Eidetic3DLSTMCell (OpenSTL's E3D-LSTM "
                             "configurations run without the gate LayerNorms; _norm_c_t is always on)")
        k = _triple(filter_size)
        keep_cell_args(self, in_channel, num_hidden, backend, window_length=window_length,
                       update_memory=bool(update_memory))
        C = num_hidden
        pad = (0, k[1] // 2, k[2] // 2)

        def conv(cin, cout):
            return nn.Sequential(TFConv3d(cin, cout, k, stride, pad))

        self._norm_c_t = nn.LayerNorm([C, window_length, height, width])
        self.conv_x = conv(in_channel, 7 * C)
        self.conv_h = conv(C, 4 * C)
        self.conv_gm = conv(C, 4 * C)
        self.conv_new_cell = conv(C, C)
        self.conv_new_gm = conv(C, C)
        self.conv_last = TFConv3d(2 * C, C, 1, 1, 0)

    def extra_repr(self) -> str:
        return f"update_memory={self.update_memory}, backend={self.backend!r}"

    def _check(self, x, h, c, m, history):
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.in_channel:
            raise ValueError(f"x must be a Tensor[B, in_channel={self.in_channel}, T, H, W], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        shape = (x.shape[0], self.num_hidden) + tuple(x.shape[2:])
        if tuple(self._norm_c_t.normalized_shape) != shape[1:]:
            raise ValueError(f"x must be [B, {self.in_channel}, {self.window_length}, H, W] with (H, W) = "
                             f"{tuple(self._norm_c_t.normalized_shape[2:])} (the cell's LayerNorm size), got "
                             f"{tuple(x.shape)}")
        for name, t in (("h", h), ("c", c), ("m", m)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be a Tensor of shape {shape}, got {getattr(t, 'shape', type(t))}")
        if (not isinstance(history, torch.Tensor) or history.dim() != 5 or history.shape[0] != shape[0]
                or history.shape[1] % self.num_hidden or tuple(history.shape[2:]) != shape[2:]
                or history.shape[1] == 0):
            raise ValueError(f"history must be a Tensor[B, n*{self.num_hidden}, {', '.join(map(str, shape[2:]))}] "
                             f"(n >= 1 past cell states on the channel axis), got "
                             f"{getattr(history, 'shape', type(history))}")

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor, history: torch.Tensor):
        """h, c, m = cell(x, h, c, m, history); see the class docstring."""
        self._check(x, h, c, m, history)
        C = self.num_hidden
        i_x, g_x, r_x, o_x, i_xp, g_xp, f_xp = torch.split(self.conv_x(x), C, dim=1)
        i_h, g_h, r_h, o_h = torch.split(self.conv_h(h), C, dim=1)
        i_m, f_m, g_m, m_m = torch.split(self.conv_gm(m), C, dim=1)
        i_t = torch.sigmoid(i_x + i_h)
        r_t = torch.sigmoid(r_x + r_h)
        g_t = torch.tanh(g_x + g_h)
        c_new = self._norm_c_t(c + recall(r_t, history, fused=resolve(self.backend) != "torch")) + i_t * g_t
        i_tp = torch.sigmoid(i_xp + i_m)
        f_tp = torch.sigmoid(f_xp + f_m + self._forget_bias)
        g_tp = torch.tanh(g_xp + g_m)
        m_new = f_tp * torch.tanh(m_m) + i_tp * g_tp
        o_t = torch.tanh(o_x + o_h + self.conv_new_cell(c_new) + self.conv_new_gm(m_new))
        h_new = torch.tanh(self.conv_last(torch.cat([c_new, m_new], 1))) * torch.sigmoid(o_t)
        return h_new, c_new, (m_new if self.update_memory else m)
