from __future__ import annotations

import torch
from torch import nn

from ..ops.depthwise_conv2d import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """Drop-in for `nn.Conv2d(C, C, k, groups=C, ...)`: same constructor, parameters, initialisation and
    state_dict (weight [C, 1, kh, kw], bias [C]); the forward pass runs `vpfast.ops.depthwise_conv2d`.

    forward(x: Tensor[B, C, H, W]) -> Tensor[B, C, Ho, Wo]

    out_channels and groups default to in_channels and must equal it; kernel sizes must be odd; only
    padding_mode="zeros". backend: "torch" | "cpp" | "cuda" | "triton" | None (auto).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups: int | None = None, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, backend: str | None = None):
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        if out_channels != in_channels or groups != in_channels:
            raise ValueError(f"DepthwiseConv2d needs out_channels == groups == in_channels, got in_channels="
                             f"{in_channels}, out_channels={out_channels}, groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"DepthwiseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        if self.kernel_size[0] % 2 == 0 or self.kernel_size[1] % 2 == 0:
            raise ValueError(f"DepthwiseConv2d needs odd kernel sizes, got {self.kernel_size}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding if not isinstance(self.padding, str) else self.padding
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
