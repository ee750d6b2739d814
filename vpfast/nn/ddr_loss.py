from __future__ import annotations

import torch
from torch import nn

from ..ops.ddr_loss import ddr_loss


class DDRLoss(nn.Module):
    """TAU's differential divergence regularisation as a module (see `vpfast.ops.ddr_loss`).

    forward(pred: Tensor[B, T, C, H, W], target: Tensor[B, T, C, H, W]) -> Tensor[]
    """

    def __init__(self, tau: float = 0.1, eps: float = 1e-12, backend: str | None = None):
        super().__init__()
        self.tau, self.eps, self.backend = tau, eps, backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ddr_loss(pred, target, self.tau, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, eps={self.eps}, backend={self.backend!r}"
