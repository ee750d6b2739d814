"""gSTA's and TAU's attention units (OpenSTL's AttentionModule, SpatialAttention, TemporalAttentionModule,
TemporalAttention) with the same constructor arguments and state_dict keys, and a `backend=` argument.

The two depthwise stages of the large-kernel decomposition (conv0 -> conv_spatial) run through
`vpfast.ops.large_kernel_attention`, fused in the compiled backends; backend="torch" is the reference
arithmetic (plain nn.Conv2d calls).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.large_kernel_attention import large_kernel_attention
from .depthwise import DepthwiseConv2d


def _lka_geometry(kernel_size: int, dilation: int):
    # OpenSTL's decomposition of a kernel_size x kernel_size kernel: a (2d-1)^2 depthwise conv, then a
    # depthwise conv of dd_k taps with dilation d (both "same" padded), then 1x1
    d_k = 2 * dilation - 1
    d_p = (d_k - 1) // 2
    dd_k = kernel_size // dilation + ((kernel_size // dilation) % 2 - 1)
    dd_p = dilation * (dd_k - 1) // 2
    return d_k, d_p, dd_k, dd_p


class _LargeKernel(nn.Module):
    def __init__(self, dim: int, kernel_size: int, dilation: int, out_dim: int, backend: str | None):
        super().__init__()
        d_k, d_p, dd_k, dd_p = _lka_geometry(kernel_size, dilation)
        self.conv0 = DepthwiseConv2d(dim, dim, d_k, padding=d_p, groups=dim, backend=backend)
        self.conv_spatial = DepthwiseConv2d(dim, dim, dd_k, stride=1, padding=dd_p, groups=dim,
                                            dilation=dilation, backend=backend)
        self.conv1 = nn.Conv2d(dim, out_dim, 1)
        self.dilation = dilation
        self.backend = backend

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":  # the reference's module calls, one after the other
            return self.conv1(self.conv_spatial(self.conv0(x)))
        return large_kernel_attention(x, self.conv0.weight, self.conv0.bias, self.conv_spatial.weight,
                                      self.conv_spatial.bias, self.dilation, self.conv1.weight, self.conv1.bias,
                                      backend=self.backend)


class AttentionModule(_LargeKernel):
    """gSTA's gating unit (OpenSTL `AttentionModule`): large-kernel attention with a 2C-wide 1x1, split
    into f, g; returns sigmoid(g) * f.

    forward(x: Tensor[B, dim, H, W]) -> Tensor[B, dim, H, W]
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int = 3, backend: str | None = None):
        super().__init__(dim, kernel_size, dilation, 2 * dim, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f_g = self._static(x)
        f_x, g_x = torch.split(f_g, f_g.shape[1] // 2, dim=1)
        return torch.sigmoid(g_x) * f_x


class TemporalAttentionModule(_LargeKernel):
    """TAU's attention unit (OpenSTL `TemporalAttentionModule`): static large-kernel attention (1x1 to dim)
    times the SE-style dynamical attention sigmoid(fc(avgpool(x))) times the input.

    forward(x: Tensor[B, dim, H, W]) -> Tensor[B, dim, H, W]
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int = 3, reduction: int = 16,
                 backend: str | None = None):
        super().__init__(dim, kernel_size, dilation, dim, backend)
        # OpenSTL's quirk, kept for weight compatibility: the bottleneck is dim // max(dim // reduction, 4)
        self.reduction = max(dim // reduction, 4)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // self.reduction, bias=False),
            nn.ReLU(True),
            nn.Linear(dim // self.reduction, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f_x = self._static(x)
        b, c = x.shape[:2]
        se = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return se * f_x * x


class _AttentionBlock(nn.Module):
    def __init__(self, d_model: int, unit: nn.Module, attn_shortcut: bool):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = unit
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)
        self.attn_shortcut = attn_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return x + shortcut if self.attn_shortcut else x


class SpatialAttention(_AttentionBlock):
    """gSTA's attention (OpenSTL `SpatialAttention`): 1x1 -> GELU -> AttentionModule -> 1x1 (+ shortcut).

    forward(x: Tensor[B, d_model, H, W]) -> Tensor[B, d_model, H, W]
    """

    def __init__(self, d_model: int, kernel_size: int = 21, attn_shortcut: bool = True,
                 backend: str | None = None):
        super().__init__(d_model, AttentionModule(d_model, kernel_size, backend=backend), attn_shortcut)


class TemporalAttention(_AttentionBlock):
    """TAU's attention (OpenSTL `TemporalAttention`): 1x1 -> GELU -> TemporalAttentionModule -> 1x1
    (+ shortcut).

    forward(x: Tensor[B, d_model, H, W]) -> Tensor[B, d_model, H, W]
    """

    def __init__(self, d_model: int, kernel_size: int = 21, attn_shortcut: bool = True,
                 backend: str | None = None):
        super().__init__(d_model, TemporalAttentionModule(d_model, kernel_size, backend=backend), attn_shortcut)
