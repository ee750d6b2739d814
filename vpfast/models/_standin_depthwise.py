"""STAND-IN, torch only: the gSTA/TAU attention units and the depthwise convolution, used by the SimVP/TAU
models only while vpfast.nn (issue 4, branch issue-depthwise) does not provide them. Same state_dict keys and
arithmetic as OpenSTL (MODELS.md §5). To be deleted once issue-depthwise is merged.
"""
from __future__ import annotations

import torch
from torch import nn


class DepthwiseConv2d(nn.Conv2d):
    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, backend=None):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias)


class AttentionModule(nn.Module):
    def __init__(self, dim, kernel_size=21, dilation=3, backend=None):
        super().__init__()
        d_k = 2 * dilation - 1
        dd_k = kernel_size // dilation + ((kernel_size // dilation) % 2 - 1)
        self.conv0 = DepthwiseConv2d(dim, d_k, padding=(d_k - 1) // 2)
        self.conv_spatial = DepthwiseConv2d(dim, dd_k, padding=dilation * (dd_k - 1) // 2, dilation=dilation)
        self.conv1 = nn.Conv2d(dim, 2 * dim, 1)

    def forward(self, x):
        f, g = self.conv1(self.conv_spatial(self.conv0(x))).chunk(2, dim=1)
        return torch.sigmoid(g) * f


class TemporalAttentionModule(nn.Module):
    def __init__(self, dim, kernel_size=21, dilation=3, reduction=16, backend=None):
        super().__init__()
        d_k = 2 * dilation - 1
        dd_k = kernel_size // dilation + ((kernel_size // dilation) % 2 - 1)
        self.conv0 = DepthwiseConv2d(dim, d_k, padding=(d_k - 1) // 2)
        self.conv_spatial = DepthwiseConv2d(dim, dd_k, padding=dilation * (dd_k - 1) // 2, dilation=dilation)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        red = max(dim // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(dim, dim // red, bias=False), nn.ReLU(True),
                                nn.Linear(dim // red, dim, bias=False), nn.Sigmoid())

    def forward(self, x):
        static = self.conv1(self.conv_spatial(self.conv0(x)))
        se = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]
        return se * static * x


class _Attention(nn.Module):
    unit = AttentionModule

    def __init__(self, d_model, kernel_size=21, attn_shortcut=True, backend=None):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = self.unit(d_model, kernel_size)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)
        self.attn_shortcut = attn_shortcut

    def forward(self, x):
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return y + x if self.attn_shortcut else y


class SpatialAttention(_Attention):
    unit = AttentionModule


class TemporalAttention(_Attention):
    unit = TemporalAttentionModule
