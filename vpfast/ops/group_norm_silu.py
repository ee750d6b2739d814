"""GroupNorm followed by SiLU in one op: the norm + activation of SimVP/TAU's ConvSC blocks (MODELS.md §5).

Backends: torch (reference below), cpp and cuda (csrc/*/group_norm_silu.*, compiled ops
vpfast::group_norm_silu_forward / group_norm_silu_backward), triton (kernels/group_norm_silu.py).
The fused kernels work per (sample, group) (Triton splits each over several programs): the forward pass
reads x for the statistics, then normalises + activates; the backward pass recomputes xhat, a and sigmoid(a)
from x and the saved mean/rstd instead of saving them. Half inputs (bf16/fp16, cuda and triton) are computed
in float32 and their mean/rstd kept in float32 (stat_dtype); outputs and gradients come back in the input's
dtype. The weight and bias gradients are deterministic: per-(sample, channel) partial sums reduced over the
batch in a fixed order, never float atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from .. import _ext
from .._dispatch import Op
from . import _checks


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    x: Tensor[N, C, *], weight, bias: Tensor[C] or None -> Tensor like x
    """
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output with the layout the kernels write, step for step as csrc/cpu/group_norm_silu.cpp allocates it:
    x made dense (channels_last when x is channels_last and not also NCHW-contiguous, else NCHW-contiguous), then
    empty(sizes, memory_format=dense.suggest_memory_format()). Not empty_like(x): where x is both contiguous
    and channels_last (one channel, or 1x1 maps) empty_like copies x's strides of the size-1 dimensions, which
    differ from the allocation's (tests/test_fake_strides.py)."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    dense = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(dense))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved mean/rstd (and of the kernels' arithmetic) for inputs of `dtype`: float32 for the
    half types (a bf16 mean would shift every recomputed xhat), else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _forward_fake(x, groups, weight, bias, eps):
    N = x.shape[0]
    sd = stat_dtype(x.dtype)
    return _like(x), x.new_empty((N, groups), dtype=sd), x.new_empty((N, groups), dtype=sd)


def _backward_fake(grad, x, weight, bias, mean, rstd, groups, output_mask):
    C = x.shape[1]
    return (_like(x) if output_mask[0] else x.new_empty((0,)),
            x.new_empty((C,)) if output_mask[1] and weight is not None else x.new_empty((0,)),
            x.new_empty((C,)) if output_mask[2] and bias is not None else x.new_empty((0,)))


def _setup(ctx, inputs, output):
    x, groups, weight, bias, eps = inputs
    _, mean, rstd = output
    # only x, mean and rstd (and the parameters) are kept: xhat, a and sigmoid(a) are recomputed
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.groups = groups
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(backward_op):
    def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3]]
        gx, gw, gb = backward_op(grad_y, x, weight, bias, mean, rstd, ctx.groups, mask)
        return (gx if mask[0] else None), None, (gw if mask[1] else None), (gb if mask[2] else None), None

    return _backward


# ---- cpp / cuda: one compiled op, fake kernel and autograd here ---------------------------------------
if _ext.has_kernel("group_norm_silu_forward", "CPU") or _ext.has_kernel("group_norm_silu_forward", "CUDA"):
    torch.library.register_fake("vpfast::group_norm_silu_forward")(_forward_fake)
    torch.library.register_fake("vpfast::group_norm_silu_backward")(_backward_fake)
    torch.library.register_autograd(
        "vpfast::group_norm_silu_forward",
        _make_backward(lambda *a: torch.ops.vpfast.group_norm_silu_backward(*a)), setup_context=_setup)


def _compiled(x, num_groups, weight, bias, eps):
    return torch.ops.vpfast.group_norm_silu_forward(x, num_groups, weight, bias, eps)[0]


# ---- triton: a Python custom op around the launchers in kernels/group_norm_silu.py --------------------
@torch.library.custom_op("vpfast::group_norm_silu_forward_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu as k
    return k.forward(x, groups, weight, bias, eps)


_triton_forward.register_fake(_forward_fake)


@torch.library.custom_op("vpfast::group_norm_silu_backward_triton", mutates_args=())
def _triton_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, groups: int,
                     output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu as k
    return k.backward(grad, x, weight, bias, mean, rstd, groups, output_mask)


_triton_backward.register_fake(_backward_fake)
_triton_forward.register_autograd(_make_backward(_triton_backward), setup_context=_setup)


def _triton(x, num_groups, weight, bias, eps):
    return _triton_forward(x, num_groups, weight, bias, eps)[0]


# ---- dispatch and the public function -----------------------------------------------------------------
def _check(backend, x, num_groups, weight, bias, eps):
    if x.numel() == 0:
        return ["empty input (the reference handles it)"]
    why = []
    if x.shape[0] * num_groups >= 2**31:
        why.append(f"N * groups = {x.shape[0] * num_groups} programs exceed the grid limit 2^31 - 1")
    if backend == "triton" and x[0].numel() >= 2**31:
        why.append(f"one sample has {x[0].numel()} elements; the Triton kernels index a sample with int32")
    return why


# autocast: as group_norm, float32 under CUDA autocast; under CPU autocast x's dtype (group_norm_silu casts the
# parameters to it first, so "promote" then changes nothing).
# auto on CUDA: eager PyTorch. Measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward at
# (160, 64, 64, 64) with 2 groups, eager time / backend time: cuda 0.58x; triton did not compile then (a
# loop-carried variable; fixed since, and its kernels now split each group over several programs, not yet
# measured). Neither is picked until it measures above 1.0x; bf16/fp16 have no numbers yet and follow the
# float32 order.
OP = Op("group_norm_silu", kernel="group_norm_silu_forward", check=_check,
        autocast={"cuda": "float32", "cpu": "promote"}, prefer={"cuda": ("torch",)})
OP.register("torch", group_norm_silu_reference)
OP.register("cpp", _compiled)
OP.register("cuda", _compiled)
OP.register("triton", _triton)


def _check_param(name: str, p, C: int, x: torch.Tensor) -> None:
    if p is None:
        return
    _checks.tensor(name, p, None, "[C]")
    if p.shape != (C,):
        raise ValueError(f"{name} must have shape [C] with C = {C} (the input's channels), got {tuple(p.shape)}")
    _checks.same(("x", name), x, p, shape=False)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                    backend: str | None = None) -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)), fused.

    x: Tensor[N, C, *] (e.g. [N, C, H, W]), C divisible by num_groups; weight, bias: Tensor[C] or None
    (None: no scale / no shift) -> Tensor[N, C, *] in x's memory format (NCHW-contiguous and 4-D
    channels_last inputs are read in place, other strides are copied to contiguous first).

    Per sample and group of C / num_groups channels: xhat = (x - mean) / sqrt(var + eps) (biased variance),
    a = xhat * weight[c] + bias[c], y = a * sigmoid(a). Differentiable in x, weight and bias. For backward
    the fused backends save only x, the parameters and the per-(sample, group) mean and 1/std ([N, groups]);
    xhat, a and sigmoid(a) are recomputed. Weight/bias gradients are reduced over the batch in a fixed order
    (bitwise reproducible). bf16/fp16 inputs (cuda, triton; torch everywhere) give outputs and gradients in
    that dtype, computed in float32. Under CUDA autocast the op runs in float32, as group_norm does there;
    under CPU autocast it keeps x's dtype (float32 parameters are cast to it), as group_norm does there.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == "cpu" \
            and torch.is_autocast_enabled("cpu"):
        # as F.group_norm under CPU autocast, the result keeps x's dtype (a bf16 convolution output with
        # float32 parameters gives bf16): the parameters take x's dtype (their gradients come back in theirs)
        weight, bias = (p.to(x.dtype) if isinstance(p, torch.Tensor) and p.is_floating_point() else p
                        for p in (weight, bias))
    x, weight, bias = OP.cast_inputs(x, weight, bias)
    _checks.tensor("x", x, None, "[N, C, *]")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [N, C, *], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels C = {C}")
    _check_param("weight", weight, C, x)
    _check_param("bias", bias, C, x)
    eps = _checks.positive("eps", eps)
    return OP(x, num_groups, weight, bias, eps, backend=backend)
