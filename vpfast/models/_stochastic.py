"""Pieces the stochastic and generative predictors share (diffusion, vae, gan, vptr)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _base

MMNIST = dict(in_shape=(10, 1, 64, 64), pre_seq_length=10, aft_seq_length=10)  # the presets' frames


def seq_shape(in_shape, pre_seq_length, aft_seq_length) -> tuple[int, int, int, int, int, int]:
    """(T, C, H, W, pre, aft) from the constructor arguments: pre defaults to and must equal in_shape[0] (the
    models read the observed frames as one block), aft defaults to pre."""
    T, C, H, W = _base.as_shape(in_shape)
    pre = T if pre_seq_length is None else _base.positive_int("pre_seq_length", pre_seq_length)
    if pre != T:
        raise ValueError(f"pre_seq_length ({pre}) must equal in_shape[0] ({T})")
    aft = pre if aft_seq_length is None else _base.positive_int("aft_seq_length", aft_seq_length)
    return T, C, H, W, pre, aft


def nonnegative(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    return float(v)


def randn(shape, like: torch.Tensor, generator: Optional[torch.Generator] = None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normal Tensor[shape] on like's device (dtype: like's unless given), drawn from `generator` on
    its own device (so a CPU generator gives the same draws whatever the model's device) or from the global
    generator of like's device."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=dtype or like.dtype).to(like.device)
