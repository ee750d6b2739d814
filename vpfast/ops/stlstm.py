"""Fused pointwise parts of the ST-LSTM step (PredRNN, PredRNN-v2, MotionRNN's highway cell), MODELS.md §1.

The step is convolutions (left to PyTorch/oneDNN) around two pointwise stages, each one fused op:

  stlstm_gates   (stage 1) the gates i, f, g, i', f', g' with the constant forget bias, c_t and m_t
                 written into one [B, 2C, H, W] buffer (so `torch.cat([c, m])` disappears), the partial
                 output-gate sum o_x + o_h, and optionally PredRNN-v2's Δc = i⊙g, Δm = i'⊙g'.
  stlstm_output  (stage 2) o = σ(o_part + conv_o([c, m])), h = o ⊙ tanh(conv_last([c, m])) and, for the
                 Motion-Highway cell, h += (1 − o) ⊙ highway.

Gate pre-activations come either from the reference's separate convolutions (x_g: conv_x output with 7C
channels i, f, g, i', f', g', o; h_g: conv_h output 4C i, f, g, o; m_g: conv_m output 3C i', f', g') or,
when layer_norm is off, from two merged convolutions, over [x, h] (4C: i, f, g, o) and over [x, m]
(3C: i', f', g'); then `x_g` is None and h_g / m_g already hold the sums.

What backward keeps (the memory choice): stage 1 saves the input and forget gates i, f, i', f' in one
[B, 4C, H, W] buffer (not the 7C-14C convolution outputs, which are then freed) plus references to c_{t-1},
m_{t-1} and its own output [c_t, m_t] (kept alive anyway as the input of conv_o and conv_last and of the next
step); g and g' are recovered in backward from i*g = c_t - f*c_{t-1} (an absolute error of about one rounding
of c_t, see csrc/common/stlstm.h). Stage 2 saves o and its own output h (tanh(conv_last) is recovered as h / o;
where o underflows to 0 every gradient that needs it is multiplied by o anyway) — for the highway variant it
saves tanh(conv_last) instead. Per cell step that keeps 8 C-sized maps (i, f, i', f', c_t, m_t, o, h) against
the reference's 13 (seven gates, tanh(conv_last), h, c_t and m_t, and their concatenation).

Precision: cuda and triton take float32/float64 and bfloat16/float16 (the half types computed in float32, each
output rounded once; backward's recovered g then carries about one half-precision rounding of c_t); cpp takes
float32/float64, so bf16 on the CPU runs the torch reference. Under autocast both ops promote their inputs to
the widest dtype, as PyTorch's pointwise ops do: bf16 convolution outputs next to float32 memories give float32
results (o_part included, which the reference would leave in bf16 as a sum of two bf16 maps).

Backends: torch (the reference below), cpp / cuda (csrc/*/stlstm.*, compiled ops vpfast::stlstm_*),
triton (kernels/stlstm.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._dispatch import Op
from . import _checks


# ---- reference ----------------------------------------------------------------------------------------
def stlstm_gates_reference(x_g: Optional[torch.Tensor], h_g: torch.Tensor, m_g: torch.Tensor, c: torch.Tensor,
                           m: torch.Tensor, forget_bias: float = 1.0, with_delta: bool = False):
    """Stage 1 in plain PyTorch, the reference's arithmetic (the oracle and the fallback).

    x_g: Tensor[B, 7C, H, W] or None, h_g: Tensor[B, 4C, H, W], m_g: Tensor[B, 3C, H, W],
    c, m: Tensor[B, C, H, W] -> (cm: Tensor[B, 2C, H, W], o_part: Tensor[B, C, H, W],
    delta: Tensor[B, 2C, H, W] (Δc then Δm) or None)
    """
    C = c.shape[1]
    i_h, f_h, g_h, o_h = torch.split(h_g, C, dim=1)
    i_m, f_m, g_m = torch.split(m_g, C, dim=1)
    if x_g is not None:
        i_x, f_x, g_x, i_xp, f_xp, g_xp, o_x = torch.split(x_g, C, dim=1)
        i_h, f_h, g_h, o_h = i_x + i_h, f_x + f_h, g_x + g_h, o_x + o_h
        i_m, f_m, g_m = i_xp + i_m, f_xp + f_m, g_xp + g_m
    i_t = torch.sigmoid(i_h)
    f_t = torch.sigmoid(f_h + forget_bias)
    g_t = torch.tanh(g_h)
    delta_c = i_t * g_t
    c_new = f_t * c + delta_c
    i_tp = torch.sigmoid(i_m)
    f_tp = torch.sigmoid(f_m + forget_bias)
    g_tp = torch.tanh(g_m)
    delta_m = i_tp * g_tp
    m_new = f_tp * m + delta_m
    cm = torch.cat((c_new, m_new), 1)
    delta = torch.cat((delta_c, delta_m), 1) if with_delta else None
    return cm, o_h, delta


def stlstm_output_reference(o_part: torch.Tensor, o_m: torch.Tensor, last: torch.Tensor,
                            highway: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stage 2 in plain PyTorch.

    o_part, o_m, last (, highway): Tensor[B, C, H, W] -> h: Tensor[B, C, H, W]
    """
    o_t = torch.sigmoid(o_part + o_m)
    h = o_t * torch.tanh(last)
    if highway is not None:
        h = h + (1 - o_t) * highway
    return h


# ---- cpp / cuda: compiled ops, fake kernels and autograd ------------------------------------------------
# The fakes report what the kernels return: every output a new NCHW-contiguous tensor (csrc/common/
# lstm_planes.h allocates them with plain sizes, whatever the operands' layouts; the Triton launchers too), so
# `new_empty` with explicit sizes, never `empty_like` of an operand: under torch.compile the operands are often
# channels_last (Inductor's choice for the convolutions around the op) or slices, and a fake that copied their
# strides failed Inductor's run-time stride assertion (tests/test_fake_strides.py).
def _gates_fake_shapes(x_g, h_g, m_g, c, m, with_delta):
    B, C, H, W = c.shape
    cm = c.new_empty((B, 2 * C, H, W))
    o_part = c.new_empty((B, C, H, W))
    act = c.new_empty((B, 4 * C, H, W))
    delta = c.new_empty((B, 2 * C, H, W)) if with_delta else c.new_empty((0,))
    return cm, o_part, act, delta


def _gates_bwd_fake_shapes(act, cm, c, m, has_x):
    B, C, H, W = c.shape
    gx = c.new_empty((B, 7 * C, H, W)) if has_x else c.new_empty((0,))
    return gx, c.new_empty((B, 4 * C, H, W)), c.new_empty((B, 3 * C, H, W)), c.new_empty(c.shape), \
        m.new_empty(m.shape)


def _output_fake_shapes(o_part, highway):
    tl = o_part.new_empty(o_part.shape) if highway is not None else o_part.new_empty((0,))
    return o_part.new_empty(o_part.shape), o_part.new_empty(o_part.shape), tl


def _output_bwd_fake_shapes(o, highway):
    gh = o.new_empty(o.shape) if highway is not None else o.new_empty((0,))
    return o.new_empty(o.shape), o.new_empty(o.shape), gh


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _make_autograd(gates_fwd, gates_bwd, output_fwd, output_bwd):
    """setup_context/backward pairs shared by the compiled ops and the Triton custom ops."""

    def gates_setup(ctx, inputs, output):
        x_g, h_g, m_g, c, m, forget_bias, with_delta = inputs
        cm, o_part, act, delta = output
        ctx.save_for_backward(act, cm, c, m)
        ctx.has_x = x_g is not None
        ctx.set_materialize_grads(False)  # no zero-filled [B, 4C, H, W] gradient for the saved gates
        ctx.mark_non_differentiable(act)

    def gates_backward(ctx, g_cm, g_opart, _g_act, g_delta):
        act, cm, c, m = ctx.saved_tensors
        g_cm = _zeros_if_none(g_cm, cm)
        g_opart = _zeros_if_none(g_opart, c)
        if g_delta is not None and g_delta.numel() == 0:
            g_delta = None
        gx, gh, gm, gc, gmm = gates_bwd(g_cm, g_opart, g_delta, act, cm, c, m, ctx.has_x)
        need = ctx.needs_input_grad
        return (gx if ctx.has_x and need[0] else None, gh if need[1] else None, gm if need[2] else None,
                gc if need[3] else None, gmm if need[4] else None, None, None)

    def output_setup(ctx, inputs, output):
        o_part, o_m, last, highway = inputs
        h, o, tl = output
        ctx.has_highway = highway is not None
        ctx.set_materialize_grads(False)
        if ctx.has_highway:
            ctx.save_for_backward(o, tl, highway)
        else:
            ctx.save_for_backward(o, h)
        ctx.mark_non_differentiable(o, tl)

    def output_backward(ctx, g_h, _g_o, _g_tl):
        if ctx.has_highway:
            o, tl, highway = ctx.saved_tensors
        else:
            (o, tl), highway = ctx.saved_tensors, None
        g_h = _zeros_if_none(g_h, o)
        g_pre, g_last, g_hw = output_bwd(g_h, o, tl, highway)
        need = ctx.needs_input_grad
        return (g_pre if need[0] else None, g_pre if need[1] else None, g_last if need[2] else None,
                g_hw if ctx.has_highway and need[3] else None)

    return gates_setup, gates_backward, output_setup, output_backward


if _ext.has_kernel("stlstm_gates_forward", "CPU") or _ext.has_kernel("stlstm_gates_forward", "CUDA"):

    @torch.library.register_fake("vpfast::stlstm_gates_forward")
    def _gates_fwd_fake(x_g, h_g, m_g, c, m, forget_bias, with_delta):
        return _gates_fake_shapes(x_g, h_g, m_g, c, m, with_delta)

    @torch.library.register_fake("vpfast::stlstm_gates_backward")
    def _gates_bwd_fake(g_cm, g_opart, g_delta, act, cm, c, m, has_x):
        return _gates_bwd_fake_shapes(act, cm, c, m, has_x)

    @torch.library.register_fake("vpfast::stlstm_output_forward")
    def _output_fwd_fake(o_part, o_m, last, highway):
        return _output_fake_shapes(o_part, highway)

    @torch.library.register_fake("vpfast::stlstm_output_backward")
    def _output_bwd_fake(g_h, o, h_or_tl, highway):
        return _output_bwd_fake_shapes(o, highway)

    _gs, _gb, _os, _ob = _make_autograd(None, lambda *a: torch.ops.vpfast.stlstm_gates_backward(*a), None,
                                        lambda *a: torch.ops.vpfast.stlstm_output_backward(*a))
    torch.library.register_autograd("vpfast::stlstm_gates_forward", _gb, setup_context=_gs)
    torch.library.register_autograd("vpfast::stlstm_output_forward", _ob, setup_context=_os)


def _gates_compiled(x_g, h_g, m_g, c, m, forget_bias=1.0, with_delta=False):
    cm, o_part, _act, delta = torch.ops.vpfast.stlstm_gates_forward(x_g, h_g, m_g, c, m, forget_bias, with_delta)
    return cm, o_part, (delta if with_delta else None)


def _output_compiled(o_part, o_m, last, highway=None):
    return torch.ops.vpfast.stlstm_output_forward(o_part, o_m, last, highway)[0]


# ---- triton: Python custom ops around the launchers in kernels/stlstm.py -------------------------------
@torch.library.custom_op("vpfast::stlstm_gates_forward_triton", mutates_args=())
def _gates_triton_fwd(x_g: Optional[torch.Tensor], h_g: torch.Tensor, m_g: torch.Tensor, c: torch.Tensor,
                      m: torch.Tensor, forget_bias: float,
                      with_delta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import stlstm as k
    return k.gates_forward(x_g, h_g, m_g, c, m, forget_bias, with_delta)


@_gates_triton_fwd.register_fake
def _(x_g, h_g, m_g, c, m, forget_bias, with_delta):
    return _gates_fake_shapes(x_g, h_g, m_g, c, m, with_delta)


@torch.library.custom_op("vpfast::stlstm_gates_backward_triton", mutates_args=())
def _gates_triton_bwd(g_cm: torch.Tensor, g_opart: torch.Tensor, g_delta: Optional[torch.Tensor],
                      act: torch.Tensor, cm: torch.Tensor, c: torch.Tensor, m: torch.Tensor,
                      has_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import stlstm as k
    return k.gates_backward(g_cm, g_opart, g_delta, act, cm, c, m, has_x)


@_gates_triton_bwd.register_fake
def _(g_cm, g_opart, g_delta, act, cm, c, m, has_x):
    return _gates_bwd_fake_shapes(act, cm, c, m, has_x)


@torch.library.custom_op("vpfast::stlstm_output_forward_triton", mutates_args=())
def _output_triton_fwd(o_part: torch.Tensor, o_m: torch.Tensor, last: torch.Tensor,
                       highway: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import stlstm as k
    return k.output_forward(o_part, o_m, last, highway)


@_output_triton_fwd.register_fake
def _(o_part, o_m, last, highway):
    return _output_fake_shapes(o_part, highway)


@torch.library.custom_op("vpfast::stlstm_output_backward_triton", mutates_args=())
def _output_triton_bwd(g_h: torch.Tensor, o: torch.Tensor, h_or_tl: torch.Tensor,
                       highway: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import stlstm as k
    return k.output_backward(g_h, o, h_or_tl, highway)


@_output_triton_bwd.register_fake
def _(g_h, o, h_or_tl, highway):
    return _output_bwd_fake_shapes(o, highway)


_tgs, _tgb, _tos, _tob = _make_autograd(None, _gates_triton_bwd, None, _output_triton_bwd)
_gates_triton_fwd.register_autograd(_tgb, setup_context=_tgs)
_output_triton_fwd.register_autograd(_tob, setup_context=_tos)


def _gates_triton(x_g, h_g, m_g, c, m, forget_bias=1.0, with_delta=False):
    cm, o_part, _act, delta = _gates_triton_fwd(x_g, h_g, m_g, c, m, forget_bias, with_delta)
    return cm, o_part, (delta if with_delta else None)


def _output_triton(o_part, o_m, last, highway=None):
    return _output_triton_fwd(o_part, o_m, last, highway)[0]


# ---- dispatch and the public functions ----------------------------------------------------------------
def _int32_index_check(backend, *args, **kwargs):
    """The Triton kernels index with int32: every operand must have fewer than 2**31 elements."""
    if backend != "triton":
        return []
    big = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor) and t.numel() >= 2**31]
    return [f"triton kernels index with int32; operands {big} have 2**31 elements or more"] if big else []


# Auto's order on CUDA, from forward+backward ratios over eager PyTorch measured on one NVIDIA H200 (torch 2.11,
# Triton 3.6, float32, B=16, C=128, 16x16): stlstm_gates cuda 1.78x, triton 1.31x; stlstm_output cuda 1.05x,
# triton 0.88x. So the output stage never goes to Triton there. bfloat16/float16 were not measured yet: they
# follow the float32 order.
GATES = Op("stlstm_gates", kernel="stlstm_gates_forward", check=_int32_index_check,
           prefer={"cuda": ("cuda", "triton", "torch")})
GATES.register("torch", stlstm_gates_reference)
GATES.register("cpp", _gates_compiled)
GATES.register("cuda", _gates_compiled)
GATES.register("triton", _gates_triton)

OUTPUT = Op("stlstm_output", kernel="stlstm_output_forward", check=_int32_index_check,
            prefer={"cuda": ("cuda", "torch")})
OUTPUT.register("torch", stlstm_output_reference)
OUTPUT.register("cpp", _output_compiled)
OUTPUT.register("cuda", _output_compiled)
OUTPUT.register("triton", _output_triton)


def check_gates_args(x_g, h_g, m_g, c, m) -> int:
    """Validate stage-1 arguments; returns C."""
    _checks.tensor("c", c, 4, "[B, C, H, W]")
    B, C, H, W = c.shape
    _checks.tensor("m", m, 4, "[B, C, H, W]")
    _checks.same(("c", "m"), c, m)
    for name, t, k in (("h_g", h_g, 4), ("m_g", m_g, 3)) + ((("x_g", x_g, 7),) if x_g is not None else ()):
        _checks.tensor(name, t, 4, f"[B, {k}C, H, W]")
        _checks.same(("c", name), c, t, shape=False)
        if tuple(t.shape) != (B, k * C, H, W):
            raise ValueError(f"{name} must have shape [B, {k}C, H, W] = {(B, k * C, H, W)} for c of shape "
                             f"{tuple(c.shape)}, got {tuple(t.shape)}")
    return C


def stlstm_gates(x_g: Optional[torch.Tensor], h_g: torch.Tensor, m_g: torch.Tensor, c: torch.Tensor,
                 m: torch.Tensor, forget_bias: float = 1.0, with_delta: bool = False, backend: str | None = None):
    """Stage 1 of the ST-LSTM step: gates, new cell state c and spatiotemporal memory m.

    x_g: Tensor[B, 7C, H, W] (conv_x output: i, f, g, i', f', g', o) or None when h_g / m_g come from the
    merged convolutions and already contain the x terms;
    h_g: Tensor[B, 4C, H, W] (i, f, g, o); m_g: Tensor[B, 3C, H, W] (i', f', g'); c, m: Tensor[B, C, H, W]
    -> (cm: Tensor[B, 2C, H, W] = [c_t, m_t], o_part: Tensor[B, C, H, W] = o_x + o_h,
        delta: Tensor[B, 2C, H, W] = [i⊙g, i'⊙g'] if with_delta else None)
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x_g, h_g, m_g, c, m = GATES.cast_inputs(x_g, h_g, m_g, c, m)
    check_gates_args(x_g, h_g, m_g, c, m)
    return GATES(x_g, h_g, m_g, c, m, float(forget_bias), bool(with_delta), backend=backend)


def stlstm_output(o_part: torch.Tensor, o_m: torch.Tensor, last: torch.Tensor,
                  highway: Optional[torch.Tensor] = None, backend: str | None = None) -> torch.Tensor:
    """Stage 2 of the ST-LSTM step: h = σ(o_part + o_m) ⊙ tanh(last) [+ (1 − o) ⊙ highway].

    o_part, o_m, last, highway: Tensor[B, C, H, W] -> h: Tensor[B, C, H, W]
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    o_part, o_m, last, highway = OUTPUT.cast_inputs(o_part, o_m, last, highway)
    names = ("o_part", "o_m", "last") + (("highway",) if highway is not None else ())
    ts = (o_part, o_m, last) + ((highway,) if highway is not None else ())
    for n, t in zip(names, ts):
        _checks.tensor(n, t, 4, "[B, C, H, W]")
        _checks.same(("o_part", n), o_part, t)
    return OUTPUT(o_part, o_m, last, highway, backend=backend)
