"""thuml MotionRNN's Warp and MotionGRU as drop-in layers (MODELS.md §4), same constructor arguments and
state_dict keys (`conv.weight`, `warp_gate.weight/bias`; `update.*`, `reset.*`, `output.*`, `warp.*`), same
zero initialisations, plus `backend=`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.deform_warp import deform_warp
from ..ops.motion_gru import motion_gru


class Warp(nn.Module):
    """Modulated deformable k x k warp (k = neighbour) with a learned mask, as thuml's Warp.

    forward(x: Tensor[B, inc, H, W], offset: Tensor[B, 2k², H, W]) -> Tensor[B, outc, H, W]
    (thuml's calling convention `warp([x, offset])` works too). offset is laid out
    [dy_0..dy_{k²-1}, dx_0..dx_{k²-1}]; mask = σ(warp_gate(x)) (3x3 conv, k² outputs, weight initialised
    to 0); the masked samples are contracted by `conv.weight` [outc, inc, k, k] (no bias).
    Unlike thuml's code (which only works for k = 3), any odd neighbour works.
    """

    def __init__(self, inc: int, outc: int, neighbour: int = 3, backend: str | None = None):
        super().__init__()
        if neighbour < 1 or neighbour % 2 == 0:
            raise ValueError(f"neighbour must be a positive odd number, got {neighbour}")
        self.neighbour = neighbour
        self.backend = backend
        # thuml's layout: a stride-k convolution over k x k tiles of samples; only its weight is used here
        self.conv = nn.Conv2d(inc, outc, kernel_size=neighbour, stride=neighbour, bias=False)
        self.warp_gate = nn.Conv2d(inc, neighbour * neighbour, kernel_size=3, padding=1, stride=1)
        nn.init.constant_(self.warp_gate.weight, 0)

    def forward(self, x, offset: torch.Tensor | None = None) -> torch.Tensor:
        if offset is None:  # thuml: warp([x, offset])
            x, offset = x
        m = torch.sigmoid(self.warp_gate(x))
        return deform_warp(x, offset, m, self.conv.weight, backend=self.backend)

    def extra_repr(self) -> str:
        return f"neighbour={self.neighbour}, backend={self.backend!r}"


class MotionGRU(nn.Module):
    """thuml's MotionGRU: motion (F) and trend (D) update, then the warp of x by the new motion.

    forward(x_t: Tensor[B, in_channel, H, W], pre_offset: Tensor[B, M, H, W], mean: Tensor[B, M, H, W])
        -> (x_out: Tensor[B, in_channel, H, W], offset: Tensor[B, M, H, W], mean: Tensor[B, M, H, W])
    i.e. `x_out, F, D = motion_gru(x, F_prev, D_prev)`, with M = motion_hidden = 2 * neighbour².
    update/reset/output are 3x3 convolutions with bias over the in_channel + M channels of [x, F_prev]
    (weights initialised to 0, biases PyTorch's default); warp = Warp(in_channel, in_channel, neighbour).
    """

    def __init__(self, in_channel: int, motion_hidden: int, neighbour: int, backend: str | None = None):
        super().__init__()
        if motion_hidden != 2 * neighbour * neighbour:
            raise ValueError(f"motion_hidden must be 2 * neighbour² = {2 * neighbour * neighbour} (the warp's "
                             f"offsets), got {motion_hidden}")
        self.backend = backend
        cin = in_channel + motion_hidden
        self.update = nn.Conv2d(cin, motion_hidden, kernel_size=3, stride=1, padding=1)
        nn.init.constant_(self.update.weight, 0)
        self.reset = nn.Conv2d(cin, motion_hidden, kernel_size=3, stride=1, padding=1)
        nn.init.constant_(self.reset.weight, 0)
        self.output = nn.Conv2d(cin, motion_hidden, kernel_size=3, stride=1, padding=1)
        nn.init.constant_(self.output.weight, 0)
        self.warp = Warp(in_channel, in_channel, neighbour, backend=backend)

    def forward(self, x_t: torch.Tensor, pre_offset: torch.Tensor, mean: torch.Tensor):
        offset, mean = motion_gru(x_t, pre_offset, mean, self.update.weight, self.update.bias,
                                  self.reset.weight, self.reset.bias, self.output.weight, self.output.bias,
                                  backend=self.backend)
        return self.warp(x_t, offset), offset, mean

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
