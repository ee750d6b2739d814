"""Fused pointwise part of the ConvLSTM step (OpenSTL), MODELS.md §2.

Everything after the convolutions in one op: i = σ(i_x + i_h), f = σ(f_x + f_h + forget_bias),
g = tanh(g_x + g_h), o = σ(o_x + o_h), c_t = f ⊙ c + i ⊙ g and h_t = o ⊙ tanh(c_t) (OpenSTL's current code,
forget_bias 0) or h_t = o ⊙ g (`tanh_c=False`: the variant of OpenSTL <= v0.3.0 that produced its
published Moving-MNIST ConvLSTM weights).

Gate pre-activations come from the reference's two convolutions (x_g = conv_x(x), h_g = conv_h(h), both
[B, 4C, H, W] in the order i, f, g, o) or, when layer_norm is off, from one merged convolution over [x, h];
then x_g is None and h_g holds the sums.

What backward keeps: the gates i, f, o in one [B, 3C, H, W] buffer (the 4C-8C convolution outputs are
freed), c_{t-1} and the outputs c_t and h (both alive anyway as the next step's inputs); tanh(c_t) is
recomputed and g recovered from i*g = c_t - f*c_{t-1} (or from h = o*g, see csrc/common/stlstm.h).

Precision: cuda and triton also take bfloat16/float16 (computed in float32, each output rounded once); cpp
takes float32/float64 (bf16 on the CPU runs the reference). Under autocast the op promotes its inputs to the
widest dtype, as PyTorch's pointwise ops do: bf16 convolution outputs next to a float32 cell state give
float32 h and c_t (also for h = o * g, which the reference would leave in bf16).

Backends: torch (reference below), cpp / cuda (csrc/*/convlstm.*), triton (kernels/convlstm.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._dispatch import Op
from . import _checks


def convlstm_reference(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c: torch.Tensor, forget_bias: float = 0.0,
                       tanh_c: bool = True):
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    x_g: Tensor[B, 4C, H, W] or None, h_g: Tensor[B, 4C, H, W], c: Tensor[B, C, H, W]
    -> (h: Tensor[B, C, H, W], c_new: Tensor[B, C, H, W])
    """
    C = c.shape[1]
    i_h, f_h, g_h, o_h = torch.split(h_g, C, dim=1)
    if x_g is not None:
        i_x, f_x, g_x, o_x = torch.split(x_g, C, dim=1)
        i_h, f_h, g_h, o_h = i_x + i_h, f_x + f_h, g_x + g_h, o_x + o_h
    i_t = torch.sigmoid(i_h)
    f_t = torch.sigmoid(f_h + forget_bias) if forget_bias else torch.sigmoid(f_h)
    g_t = torch.tanh(g_h)
    c_new = f_t * c + i_t * g_t
    o_t = torch.sigmoid(o_h)
    h_new = o_t * torch.tanh(c_new) if tanh_c else o_t * g_t
    return h_new, c_new


# ---- cpp / cuda --------------------------------------------------------------------------------------
# Every output is a new NCHW-contiguous tensor whatever the operands' layouts (csrc/common/lstm_planes.h and
# the Triton launchers allocate them by size), so the fakes use new_empty, not empty_like of an operand (which
# would copy a channels_last or transposed operand's strides; tests/test_fake_strides.py).
def _fwd_fake_shapes(c):
    B, C, H, W = c.shape
    return c.new_empty(c.shape), c.new_empty(c.shape), c.new_empty((B, 3 * C, H, W))


def _bwd_fake_shapes(c, has_x):
    B, C, H, W = c.shape
    gx = c.new_empty((B, 4 * C, H, W)) if has_x else c.new_empty((0,))
    return gx, c.new_empty((B, 4 * C, H, W)), c.new_empty(c.shape)


def _make_autograd(bwd):
    def setup(ctx, inputs, output):
        x_g, h_g, c, forget_bias, tanh_c = inputs
        h, c_new, act = output
        ctx.save_for_backward(act, c, c_new, h)
        ctx.has_x, ctx.tanh_c = x_g is not None, tanh_c
        ctx.set_materialize_grads(False)  # absent gradients stay None (the kernel treats them as 0)
        ctx.mark_non_differentiable(act)

    def backward(ctx, g_h, g_c, _g_act):
        act, c, c_new, h = ctx.saved_tensors
        gx, gh, gc = bwd(g_h, g_c, act, c, c_new, h, ctx.has_x, ctx.tanh_c)
        need = ctx.needs_input_grad
        return (gx if ctx.has_x and need[0] else None, gh if need[1] else None, gc if need[2] else None,
                None, None)

    return setup, backward


if _ext.has_kernel("convlstm_forward", "CPU") or _ext.has_kernel("convlstm_forward", "CUDA"):

    @torch.library.register_fake("vpfast::convlstm_forward")
    def _fwd_fake(x_g, h_g, c, forget_bias, tanh_c):
        return _fwd_fake_shapes(c)

    @torch.library.register_fake("vpfast::convlstm_backward")
    def _bwd_fake(g_h, g_c, act, c, c_new, h, has_x, tanh_c):
        return _bwd_fake_shapes(c, has_x)

    _s, _b = _make_autograd(lambda *a: torch.ops.vpfast.convlstm_backward(*a))
    torch.library.register_autograd("vpfast::convlstm_forward", _b, setup_context=_s)


def _compiled(x_g, h_g, c, forget_bias=0.0, tanh_c=True):
    h, c_new, _ = torch.ops.vpfast.convlstm_forward(x_g, h_g, c, forget_bias, tanh_c)
    return h, c_new


# ---- triton --------------------------------------------------------------------------------------------
@torch.library.custom_op("vpfast::convlstm_forward_triton", mutates_args=())
def _triton_fwd(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c: torch.Tensor, forget_bias: float,
                tanh_c: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import convlstm as k
    return k.forward(x_g, h_g, c, forget_bias, tanh_c)


@_triton_fwd.register_fake
def _(x_g, h_g, c, forget_bias, tanh_c):
    return _fwd_fake_shapes(c)


@torch.library.custom_op("vpfast::convlstm_backward_triton", mutates_args=())
def _triton_bwd(g_h: Optional[torch.Tensor], g_c: Optional[torch.Tensor], act: torch.Tensor, c: torch.Tensor,
                c_new: torch.Tensor, h: torch.Tensor, has_x: bool,
                tanh_c: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import convlstm as k
    return k.backward(g_h, g_c, act, c, c_new, h, has_x, tanh_c)


@_triton_bwd.register_fake
def _(g_h, g_c, act, c, c_new, h, has_x, tanh_c):
    return _bwd_fake_shapes(c, has_x)


_ts, _tb = _make_autograd(_triton_bwd)
_triton_fwd.register_autograd(_tb, setup_context=_ts)


def _triton(x_g, h_g, c, forget_bias=0.0, tanh_c=True):
    h, c_new, _ = _triton_fwd(x_g, h_g, c, forget_bias, tanh_c)
    return h, c_new


# ---- dispatch and the public function ----------------------------------------------------------------
from .stlstm import _int32_index_check  # noqa: E402

# Auto's order on CUDA, from forward+backward ratios over eager PyTorch measured on one NVIDIA H200 (torch 2.11,
# Triton 3.6, float32, B=16, C=128, 16x16): cuda 1.97x, triton 1.47x. bfloat16/float16 were not measured yet:
# they follow the float32 order.
OP = Op("convlstm", kernel="convlstm_forward", check=_int32_index_check, prefer={"cuda": ("cuda", "triton", "torch")})
OP.register("torch", convlstm_reference)
OP.register("cpp", _compiled)
OP.register("cuda", _compiled)
OP.register("triton", _triton)


def check_args(x_g, h_g, c) -> int:
    _checks.tensor("c", c, 4, "[B, C, H, W]")
    B, C, H, W = c.shape
    for name, t in (("h_g", h_g),) + ((("x_g", x_g),) if x_g is not None else ()):
        _checks.tensor(name, t, 4, "[B, 4C, H, W]")
        _checks.same(("c", name), c, t, shape=False)
        if tuple(t.shape) != (B, 4 * C, H, W):
            raise ValueError(f"{name} must have shape [B, 4C, H, W] = {(B, 4 * C, H, W)} for c of shape "
                             f"{tuple(c.shape)}, got {tuple(t.shape)}")
    return C


def convlstm(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c: torch.Tensor, forget_bias: float = 0.0,
             tanh_c: bool = True, backend: str | None = None):
    """Pointwise part of the ConvLSTM step.

    x_g: Tensor[B, 4C, H, W] (conv_x output: i, f, g, o) or None (h_g from the merged convolution),
    h_g: Tensor[B, 4C, H, W], c: Tensor[B, C, H, W] -> (h: Tensor[B, C, H, W], c_new: Tensor[B, C, H, W])
    tanh_c: True gives h = o ⊙ tanh(c_new) (OpenSTL today), False h = o ⊙ g (OpenSTL <= v0.3.0).
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x_g, h_g, c = OP.cast_inputs(x_g, h_g, c)
    check_args(x_g, h_g, c)
    return OP(x_g, h_g, c, float(forget_bias), bool(tanh_c), backend=backend)
