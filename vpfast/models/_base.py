"""What every vpfast model shares: configuration bookkeeping, input checks, patching, sampling schedules."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .._dispatch import resolve


def as_int_list(name: str, v) -> list[int]:
    """num_hidden as the reference projects spell it: a list of ints or a comma string "128,128,128,128"."""
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
        try:
            out = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be integers separated by commas, got {v!r}") from None
    elif isinstance(v, int):
        out = [v]
    else:
        try:
            out = [int(p) for p in v]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a list of ints or a string like '128,128', got {v!r}") from None
    if not out or any(p <= 0 for p in out):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {v!r}")
    return out


def as_shape(in_shape) -> tuple[int, int, int, int]:
    try:
        T, C, H, W = (int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise ValueError(f"in_shape must be (T, C, H, W), got {in_shape!r}") from None
    if min(T, C, H, W) <= 0:
        raise ValueError(f"in_shape must be positive (T, C, H, W), got {in_shape!r}")
    return T, C, H, W


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _autocast_on(t: torch.Tensor) -> bool:
    return t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)


class VideoPredictionModel(nn.Module):
    """Base of the vpfast models.

    Subclasses set `name`, build their layers, and implement `training_loss(frames, itr)` and either
    `forward(x)` (eval-time prediction) or `_predict(x)`, which the default `forward` calls on checked input. `config` holds every constructor argument except `backend`, so
    `vpfast.models.create(model.name, **model.config)` rebuilds the same architecture.
    """

    name: str = ""

    def _init_config(self, config: dict, backend: Optional[str]) -> None:
        self.config = dict(config)
        self.backend = resolve(backend) if backend is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> Tensor[B, aft_seq_length, C, H, W]."""
        self.check_frames(x, self.pre_seq_length, "x")
        return self._predict(x)

    # ---- checks -------------------------------------------------------------------------------------
    def _param_like(self) -> torch.Tensor:
        return next(self.parameters())

    def check_frames(self, x, T: int, what: str = "x") -> torch.Tensor:
        """x must be Tensor[B, T, C, H, W] with this model's C, on its device, H/W divisible, and (outside
        autocast) of the parameters' dtype."""
        C = self.config["in_shape"][1]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor [B, {T}, {C}, H, W], got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"{what} must have 5 dimensions [B, T={T}, C={C}, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != T:
            raise ValueError(f"{what} must have {T} frames in dimension 1 ({self._frames_doc(what)}), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[2] != C:
            raise ValueError(f"{what} must have C={C} channels in dimension 2 (the model was built with in_shape "
                             f"{tuple(self.config['in_shape'])}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        p = self._param_like()
        if x.device != p.device:
            raise ValueError(f"{what} is on {x.device} but the model's parameters are on {p.device}")
        if x.dtype != p.dtype and not _autocast_on(x):  # under autocast any float dtype, as for nn.Conv2d
            raise TypeError(f"{what} has dtype {x.dtype} but the model's parameters have {p.dtype}")
        div, why = self._spatial_divisor()
        H, W = x.shape[-2:]
        if H % div or W % div:
            raise ValueError(f"{what}'s height and width must be divisible by {div} ({why}), got {H}x{W}")
        H0, W0 = self.config["in_shape"][2:]
        if (H, W) != (H0, W0):
            # the convolutions would run at any size, but on frames of another size than the weights were built
            # (and trained) for a model predicts silently worse; build one for that size (same weights)
            raise ValueError(f"{what} must have {H0}x{W0} frames (the model was built with in_shape "
                             f"{tuple(self.config['in_shape'])}), got {H}x{W}; for other frame sizes create the "
                             f"model with in_shape=(T, C, {H}, {W}): its state_dict loads unchanged"
                             + ("" if not self.config.get("layer_norm") else " unless layer_norm is on"))
        self._check_spatial(H, W, what)
        return x

    def _frames_doc(self, what: str) -> str:
        pre, aft = self.config["pre_seq_length"], self.config["aft_seq_length"]
        if what == "x":
            return f"pre_seq_length={pre}"
        return f"pre_seq_length + aft_seq_length = {pre} + {aft}"

    def _spatial_divisor(self) -> tuple[int, str]:
        return 1, ""

    def _check_spatial(self, H: int, W: int, what: str) -> None:
        pass

    @property
    def pre_seq_length(self) -> int:
        return self.config["pre_seq_length"]

    @property
    def aft_seq_length(self) -> int:
        return self.config["aft_seq_length"]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, backend={self.backend!r}"


# ---- patching (MODELS.md §3) ----------------------------------------------------------------------------
def patch(frames: torch.Tensor, p: int) -> torch.Tensor:
    """Tensor[B, T, C, H, W] -> Tensor[B, T, p*p*C, H/p, W/p], channels ordered (row-in-patch, col-in-patch, C)
    as the reference's reshape_patch of [B, T, H, W, C] frames followed by its permute to channels-first."""
    if p == 1:
        return frames
    B, T, C, H, W = frames.shape
    x = frames.reshape(B, T, C, H // p, p, W // p, p)
    x = x.permute(0, 1, 4, 6, 2, 3, 5)  # B, T, pr, pc, C, H/p, W/p
    return x.reshape(B, T, p * p * C, H // p, W // p)


def unpatch(x: torch.Tensor, p: int, C: int) -> torch.Tensor:
    """Inverse of `patch`: Tensor[B, T, p*p*C, H/p, W/p] -> Tensor[B, T, C, H, W]."""
    if p == 1:
        return x
    B, T, _, Hp, Wp = x.shape
    y = x.reshape(B, T, p, p, C, Hp, Wp).permute(0, 1, 4, 5, 2, 6, 3)  # B, T, C, H/p, pr, W/p, pc
    return y.reshape(B, T, C, Hp * p, Wp * p)


# ---- sampling schedules (MODELS.md §3) --------------------------------------------------------------------
def scheduled_sampling_eta(itr: int, stop_iter: int = 50000, start_value: float = 1.0,
                           changing_rate: float = 2e-5) -> float:
    """Probability that an output-side input is the true frame at training iteration `itr` (0-based).

    The reference keeps eta as running state, starting at `start_value` and decreasing by `changing_rate`
    on every call before it is used; with `itr` the number of earlier calls that is
    start_value - changing_rate * (itr + 1), and 0 from `stop_iter` on.
    """
    if itr >= stop_iter:
        return 0.0
    return max(0.0, start_value - changing_rate * (itr + 1))


def reverse_sampling_probs(itr: int, step_1: int = 25000, step_2: int = 50000,
                           exp_alpha: float = 5000.0) -> tuple[float, float]:
    """(input-side, output-side) probabilities of feeding the true frame under reverse scheduled sampling."""
    if itr < step_1:
        return 0.5, 0.5
    if itr < step_2:
        r_eta = 1.0 - 0.5 * math.exp(-float(itr - step_1) / exp_alpha)
        eta = 0.5 - (0.5 / (step_2 - step_1)) * (itr - step_1)
        return r_eta, eta
    return 1.0, 0.0


def bernoulli_mask(B: int, n: int, prob: float, like: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Tensor[B, n, 1, 1, 1] of 0/1, each entry 1 with probability `prob` (broadcasts over the frame).

    Drawn from `generator` on its own device (a CPU generator for masks that must not depend on the device), or
    from the global generator of like's device; the mask ends on like's device in like's dtype.
    """
    u = torch.rand((B, n), generator=generator, device=generator.device if generator is not None else like.device)
    return (u < prob).to(device=like.device, dtype=like.dtype).view(B, n, 1, 1, 1)


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



Shape = Sequence[int]
