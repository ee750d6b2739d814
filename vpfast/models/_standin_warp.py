"""STAND-IN, torch only: thuml MotionRNN's Warp and MotionGRU (MODELS.md §4), used by vpfast.models.MotionRNN
only while vpfast.nn (issue 6, branch issue-warp) does not provide them. Same state_dict keys, zero
initialisations and arithmetic. To be deleted once issue-warp is merged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Warp(nn.Module):
    def __init__(self, inc, outc, neighbour=3, backend=None):
        super().__init__()
        if neighbour != 3:
            raise ValueError("the reference Warp only works with neighbour=3")
        self.neighbour = neighbour
        self.conv = nn.Conv2d(inc, outc, kernel_size=neighbour, stride=neighbour, bias=False)
        self.warp_gate = nn.Conv2d(inc, neighbour * neighbour, kernel_size=3, padding=1)
        nn.init.zeros_(self.warp_gate.weight)

    def forward(self, x, offset):
        B, C, H, W = x.shape
        k = self.neighbour
        N = k * k
        m = torch.sigmoid(self.warp_gate(x))  # [B, N, H, W]
        dy, dx = offset[:, :N], offset[:, N:]
        base = torch.arange(N, device=x.device)
        by = (base // k - k // 2).to(x.dtype).view(1, N, 1, 1)
        bx = (base % k - k // 2).to(x.dtype).view(1, N, 1, 1)
        gy = torch.arange(H, device=x.device, dtype=x.dtype).view(1, 1, H, 1)
        gx = torch.arange(W, device=x.device, dtype=x.dtype).view(1, 1, 1, W)
        py = gy + by + dy  # sample rows in input coordinates; outside the map reads zeros
        px = gx + bx + dx
        grid = torch.stack([2 * px / max(W - 1, 1) - 1, 2 * py / max(H - 1, 1) - 1], dim=-1)  # [B, N, H, W, 2]
        s = F.grid_sample(x, grid.view(B, N * H, W, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
        s = s.view(B, C, N, H, W) * m.unsqueeze(1)
        return torch.einsum("bcnhw,ocn->bohw", s, self.conv.weight.reshape(self.conv.weight.shape[0], C, N))


class MotionGRU(nn.Module):
    def __init__(self, in_channel, motion_hidden=18, neighbour=3, backend=None):
        super().__init__()
        c = in_channel + motion_hidden
        self.update = nn.Conv2d(c, motion_hidden, 3, 1, 1)
        self.reset = nn.Conv2d(c, motion_hidden, 3, 1, 1)
        self.output = nn.Conv2d(c, motion_hidden, 3, 1, 1)
        for conv in (self.update, self.reset, self.output):
            nn.init.zeros_(conv.weight)
        self.warp = Warp(in_channel, in_channel, neighbour)

    def forward(self, x, pre_offset, mean):
        stacked = torch.cat([x, pre_offset], dim=1)
        u = torch.sigmoid(self.update(stacked))
        r = torch.sigmoid(self.reset(stacked))
        o = torch.tanh(self.output(torch.cat([x, pre_offset * r], dim=1)))
        offset = pre_offset * (1 - u) + o * u
        mean = mean + 0.5 * (pre_offset - mean)
        offset = offset + mean
        return self.warp(x, offset), offset, mean
