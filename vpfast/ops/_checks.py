"""Argument checks shared by the public ops: clear Python errors that name the argument."""
from __future__ import annotations

import torch


def tensor(name: str, x, ndim: int | None = None, shape_doc: str = "") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + shape_doc if shape_doc else ''}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def same(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, shape: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}")
    if shape and a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def positive(name: str, v) -> float:
    if not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)
