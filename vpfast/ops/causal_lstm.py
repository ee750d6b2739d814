"""Fused pointwise parts of the Causal LSTM step (PredRNN++'s cell), MODELS.md §10.

The step is convolutions (left to PyTorch/oneDNN) around three pointwise stages, each one fused op:

  causal_lstm_cell    (stage 1) i, f, g with the constant forget bias and c_t = f ⊙ c + i ⊙ g, from the summed
                      pre-activations of conv_x (x_g, 7C: i, f, g, i', f', g', o), conv_h (h_g, 4C: i, f, g, o)
                      and conv_c (c_g, 3C: i, f, g); also the "carry" for stage 2: [i'_x, f'_x, g'_x, o_x + o_h]
                      (4C) with x_g, [o_h] (C) without.
  causal_lstm_memory  (stage 2, after conv_c2m(c_t)) i' = σ(carry + i'_m + i'_c2m), f' = σ(... + 1),
                      g' = tanh(carry + g'_c2m), m_t = f' ⊙ tanh(m̂) + i' ⊙ g', and o_part = carry[o] + o_c2m,
                      from the carry, conv_m (m_g, 3C: i', f', m̂) and conv_c2m (c2m_g, 4C: i', g', f', o).
  causal_lstm_output  (stage 3, after conv_om(m_t) and conv_last([c_t, m_t])) h = tanh(o_part + o_m) ⊙ tanh(last).

With layer_norm off the cell merges its convolutions (vpfast.nn.CausalLSTMCell): one over [x, h, c] gives h_g
with the x and c terms already summed (x_g, c_g absent), and one over [x, c_t] gives c2m_g with the x terms of
i', f', g' (the carry is then [o] only). Each convolution output is read by exactly one stage, so backward never
zero-fills or adds partial gradients of one buffer: stage 1's backward writes the whole gradient of x_g, h_g and
c_g (the carried slots from stage 2's gradient of the carry).

What backward keeps (the memory choice): stage 1 saves i and f ([B, 2C, H, W]) plus references to c and its
own c_t (alive anyway as the next step's state); g is recovered from i ⊙ g = c_t − f ⊙ c (csrc/common/stlstm.h:
an absolute error of about one rounding of c_t). Stage 2 saves i', f' and t = tanh(m̂) ([B, 3C, H, W]) and its
m_t (alive anyway); g' is recovered from m_t − f' ⊙ t the same way. Stage 3 saves o and tanh(last): o is a
tanh here (not the ST-LSTM's σ), so it can be exactly 0 where the gradient of its pre-activation (gh ⊙ tanh(last))
is not, and tanh(last) cannot be recovered as h / o. None of the convolution outputs (7C + 4C + 3C + 3C + 4C
+ 2C maps per step with separate convolutions) is kept. Per cell step that is 7 C-sized maps (i, f, i', f', t,
o, tanh(last)) against the reference's 11 (four sigmoids, five tanh outputs and the [c_t, m_t] concatenation).

Precision: cuda and triton take float32/float64 and bfloat16/float16 (computed in float32, each output rounded
once); cpp takes float32/float64, so bf16 on the CPU runs the torch reference. Under autocast the ops promote
their inputs to the widest dtype, as PyTorch's pointwise ops do.

Backends: torch (the references below), cpp / cuda (csrc/*/causal_lstm.*, compiled ops vpfast::causal_lstm_*),
triton (kernels/causal_lstm.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._dispatch import Op
from . import _checks
from .stlstm import _int32_index_check


# ---- reference ----------------------------------------------------------------------------------------
def causal_lstm_cell_reference(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c_g: Optional[torch.Tensor],
                               c: torch.Tensor, forget_bias: float = 1.0):
    """Stage 1 in plain PyTorch, summed in the reference's order ((x + h) + c).

    x_g: Tensor[B, 7C, H, W] or None, h_g: Tensor[B, 4C, H, W], c_g: Tensor[B, 3C, H, W] or None,
    c: Tensor[B, C, H, W] -> (c_new: Tensor[B, C, H, W], carry: Tensor[B, 4C or C, H, W])
    """
    C = c.shape[1]
    pi, pf, pg, po = torch.split(h_g, C, dim=1)
    if x_g is not None:
        i_x, f_x, g_x, i_xp, f_xp, g_xp, o_x = torch.split(x_g, C, dim=1)
        pi, pf, pg, po = i_x + pi, f_x + pf, g_x + pg, o_x + po
    if c_g is not None:
        i_c, f_c, g_c = torch.split(c_g, C, dim=1)
        pi, pf, pg = pi + i_c, pf + f_c, pg + g_c
    c_new = torch.sigmoid(pf + forget_bias) * c + torch.sigmoid(pi) * torch.tanh(pg)
    carry = torch.cat((i_xp, f_xp, g_xp, po), 1) if x_g is not None else po.clone()
    return c_new, carry


def causal_lstm_memory_reference(carry: torch.Tensor, m_g: torch.Tensor, c2m_g: torch.Tensor,
                                 forget_bias: float = 1.0):
    """Stage 2 in plain PyTorch.

    carry: Tensor[B, 4C or C, H, W], m_g: Tensor[B, 3C, H, W], c2m_g: Tensor[B, 4C, H, W]
    -> (m_new: Tensor[B, C, H, W], o_part: Tensor[B, C, H, W])
    """
    C = m_g.shape[1] // 3
    i_m, f_m, m_hat = torch.split(m_g, C, dim=1)
    k_i, k_g, k_f, k_o = torch.split(c2m_g, C, dim=1)
    if carry.shape[1] == 4 * C:
        x_i, x_f, x_g, o_in = torch.split(carry, C, dim=1)
        qi, qf, qg = x_i + i_m + k_i, x_f + f_m + k_f, x_g + k_g
    else:
        o_in, qi, qf, qg = carry, i_m + k_i, f_m + k_f, k_g
    m_new = torch.sigmoid(qf + forget_bias) * torch.tanh(m_hat) + torch.sigmoid(qi) * torch.tanh(qg)
    return m_new, o_in + k_o


def causal_lstm_output_reference(o_part: torch.Tensor, o_m: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Stage 3 in plain PyTorch. o_part, o_m, last: Tensor[B, C, H, W] -> h: Tensor[B, C, H, W]"""
    return torch.tanh(o_part + o_m) * torch.tanh(last)


# ---- cpp / cuda: compiled ops, fake kernels and autograd ------------------------------------------------
def channels_last(t: torch.Tensor) -> bool:
    """Whether an op call whose layout operand is t runs in channels_last (else planar): t is channels_last and
    not also contiguous (csrc/common/causal_lstm.h decides the same way)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _maps(layout, C, *ks):
    """[B, k*C, H, W] outputs with `layout`'s batch, planes and layout (channels_last or contiguous); k = 0 gives
    an empty tensor."""
    B, _, H, W = layout.shape
    fmt = torch.channels_last if channels_last(layout) else torch.contiguous_format
    return tuple(torch.empty((B, k * C, H, W), dtype=layout.dtype, device=layout.device, memory_format=fmt)
                 if k else layout.new_empty((0,)) for k in ks)


def _cell_fake(x_g, h_g, c_g, c):
    return _maps(c, c.shape[1], 1, 4 if x_g is not None else 1, 2)


def _cell_bwd_fake(act, c, has_x, has_c):
    return _maps(act, c.shape[1], 7 if has_x else 0, 4, 3 if has_c else 0, 1)


def _memory_fake(carry, m_g):
    return _maps(m_g, m_g.shape[1] // 3, 1, 1, 3)


def _memory_bwd_fake(act, m_new, carry_x):
    return _maps(act, m_new.shape[1], 4 if carry_x else 1, 3, 4)


def _output_fake(layout, n):
    return _maps(layout, layout.shape[1], *(1,) * n)


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _make_autograd(cell_bwd, memory_bwd, output_bwd):
    """setup_context/backward pairs shared by the compiled ops and the Triton custom ops."""

    def cell_setup(ctx, inputs, output):
        x_g, h_g, c_g, c, _fb = inputs
        c_new, carry, act = output
        ctx.save_for_backward(act, c_new, c)
        ctx.has_x, ctx.has_c = x_g is not None, c_g is not None
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved gates
        ctx.mark_non_differentiable(act)

    def cell_backward(ctx, g_cn, g_carry, _g_act):
        act, c_new, c = ctx.saved_tensors
        if g_carry is None:
            g_carry = _maps(act, c.shape[1], 4 if ctx.has_x else 1)[0].zero_()
        gx, gh, gcg, gc = cell_bwd(_zeros_if_none(g_cn, c), g_carry, act, c_new, c, ctx.has_x, ctx.has_c)
        need = ctx.needs_input_grad
        return (gx if ctx.has_x and need[0] else None, gh if need[1] else None,
                gcg if ctx.has_c and need[2] else None, gc if need[3] else None, None)

    def memory_setup(ctx, inputs, output):
        carry, m_g, _c2m, _fb = inputs
        m_new, o_part, act = output
        ctx.save_for_backward(act, m_new)
        ctx.carry_x = carry.shape[1] != m_new.shape[1]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(act)

    def memory_backward(ctx, g_mn, g_op, _g_act):
        act, m_new = ctx.saved_tensors
        g_carry, g_mg, g_c2m = memory_bwd(_zeros_if_none(g_mn, m_new), _zeros_if_none(g_op, m_new), act, m_new,
                                          ctx.carry_x)
        need = ctx.needs_input_grad
        return g_carry if need[0] else None, g_mg if need[1] else None, g_c2m if need[2] else None, None

    def output_setup(ctx, inputs, output):
        h, o, tl = output
        ctx.save_for_backward(o, tl)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(o, tl)

    def output_backward(ctx, g_h, _g_o, _g_tl):
        o, tl = ctx.saved_tensors
        g_pre, g_last = output_bwd(_zeros_if_none(g_h, o), o, tl)
        need = ctx.needs_input_grad
        return g_pre if need[0] else None, g_pre if need[1] else None, g_last if need[2] else None

    return (cell_setup, cell_backward), (memory_setup, memory_backward), (output_setup, output_backward)


def _register_autograd(register, forward_ops, backward_ops):
    """register(op, backward, setup_context) for each stage's forward op, backward running backward_ops."""
    pairs = _make_autograd(*backward_ops)
    for op, (setup, backward) in zip(forward_ops, pairs):
        register(op, backward, setup)


if _ext.has_kernel("causal_lstm_cell_forward", "CPU") or _ext.has_kernel("causal_lstm_cell_forward", "CUDA"):

    @torch.library.register_fake("vpfast::causal_lstm_cell_forward")
    def _(x_g, h_g, c_g, c, forget_bias):
        return _cell_fake(x_g, h_g, c_g, c)

    @torch.library.register_fake("vpfast::causal_lstm_cell_backward")
    def _(g_cn, g_carry, act, c_new, c, has_x, has_c):
        return _cell_bwd_fake(act, c, has_x, has_c)

    @torch.library.register_fake("vpfast::causal_lstm_memory_forward")
    def _(carry, m_g, c2m_g, forget_bias):
        return _memory_fake(carry, m_g)

    @torch.library.register_fake("vpfast::causal_lstm_memory_backward")
    def _(g_mn, g_op, act, m_new, carry_x):
        return _memory_bwd_fake(act, m_new, carry_x)

    @torch.library.register_fake("vpfast::causal_lstm_output_forward")
    def _(o_part, o_m, last):
        return _output_fake(o_part, 3)

    @torch.library.register_fake("vpfast::causal_lstm_output_backward")
    def _(g_h, o, tl):
        return _output_fake(o, 2)

    _register_autograd(lambda op, bwd, setup: torch.library.register_autograd(op, bwd, setup_context=setup),
                       [f"vpfast::causal_lstm_{s}_forward" for s in ("cell", "memory", "output")],
                       [lambda *a, _s=s: getattr(torch.ops.vpfast, f"causal_lstm_{_s}_backward")(*a)
                        for s in ("cell", "memory", "output")])


# ---- triton: Python custom ops around the launchers in kernels/causal_lstm.py --------------------------
@torch.library.custom_op("vpfast::causal_lstm_cell_forward_triton", mutates_args=())
def _cell_triton_fwd(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c_g: Optional[torch.Tensor], c: torch.Tensor,
                     forget_bias: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.cell_forward(x_g, h_g, c_g, c, forget_bias)


@_cell_triton_fwd.register_fake
def _(x_g, h_g, c_g, c, forget_bias):
    return _cell_fake(x_g, h_g, c_g, c)


@torch.library.custom_op("vpfast::causal_lstm_cell_backward_triton", mutates_args=())
def _cell_triton_bwd(g_cn: torch.Tensor, g_carry: torch.Tensor, act: torch.Tensor, c_new: torch.Tensor,
                     c: torch.Tensor, has_x: bool,
                     has_c: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.cell_backward(g_cn, g_carry, act, c_new, c, has_x, has_c)


@_cell_triton_bwd.register_fake
def _(g_cn, g_carry, act, c_new, c, has_x, has_c):
    return _cell_bwd_fake(act, c, has_x, has_c)


@torch.library.custom_op("vpfast::causal_lstm_memory_forward_triton", mutates_args=())
def _memory_triton_fwd(carry: torch.Tensor, m_g: torch.Tensor, c2m_g: torch.Tensor,
                       forget_bias: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.memory_forward(carry, m_g, c2m_g, forget_bias)


@_memory_triton_fwd.register_fake
def _(carry, m_g, c2m_g, forget_bias):
    return _memory_fake(carry, m_g)


@torch.library.custom_op("vpfast::causal_lstm_memory_backward_triton", mutates_args=())
def _memory_triton_bwd(g_mn: torch.Tensor, g_op: torch.Tensor, act: torch.Tensor, m_new: torch.Tensor,
                       carry_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.memory_backward(g_mn, g_op, act, m_new, carry_x)


@_memory_triton_bwd.register_fake
def _(g_mn, g_op, act, m_new, carry_x):
    return _memory_bwd_fake(act, m_new, carry_x)


@torch.library.custom_op("vpfast::causal_lstm_output_forward_triton", mutates_args=())
def _output_triton_fwd(o_part: torch.Tensor, o_m: torch.Tensor,
                       last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.output_forward(o_part, o_m, last)


@_output_triton_fwd.register_fake
def _(o_part, o_m, last):
    return _output_fake(o_part, 3)


@torch.library.custom_op("vpfast::causal_lstm_output_backward_triton", mutates_args=())
def _output_triton_bwd(g_h: torch.Tensor, o: torch.Tensor, tl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import causal_lstm as k
    return k.output_backward(g_h, o, tl)


@_output_triton_bwd.register_fake
def _(g_h, o, tl):
    return _output_fake(o, 2)


_register_autograd(lambda op, bwd, setup: op.register_autograd(bwd, setup_context=setup),
                   [_cell_triton_fwd, _memory_triton_fwd, _output_triton_fwd],
                   [_cell_triton_bwd, _memory_triton_bwd, _output_triton_bwd])


# ---- dispatch and the public functions ----------------------------------------------------------------
def _leading(fn, n_out):
    """fn's first n_out outputs (the others are saved for backward), a single one unwrapped."""
    def run(*args):
        out = fn(*args)
        return out[0] if n_out == 1 else out[:n_out]
    return run


def _compiled(stage):
    return lambda *args: getattr(torch.ops.vpfast, f"causal_lstm_{stage}_forward")(*args)


# Auto on CUDA: not measured on a GPU yet (no GPU in this project's CI). The kernels have the stlstm ops'
# structure (one thread / program per element, every operand read once), and stlstm_gates measured cuda 1.78x,
# triton 1.31x, stlstm_output cuda 1.05x, triton 0.88x on one H200 (vpfast/ops/stlstm.py): the same order is
# taken here, with the output stage (like stlstm_output, three reads and three writes) kept off Triton.
CELL = Op("causal_lstm_cell", kernel="causal_lstm_cell_forward", check=_int32_index_check,
          prefer={"cuda": ("cuda", "triton", "torch")})
MEMORY = Op("causal_lstm_memory", kernel="causal_lstm_memory_forward", check=_int32_index_check,
            prefer={"cuda": ("cuda", "triton", "torch")})
OUTPUT = Op("causal_lstm_output", kernel="causal_lstm_output_forward", check=_int32_index_check,
            prefer={"cuda": ("cuda", "torch")})
for _op, _stage, _ref, _tfwd, _n in ((CELL, "cell", causal_lstm_cell_reference, _cell_triton_fwd, 2),
                                     (MEMORY, "memory", causal_lstm_memory_reference, _memory_triton_fwd, 2),
                                     (OUTPUT, "output", causal_lstm_output_reference, _output_triton_fwd, 1)):
    _op.register("torch", _ref)
    _op.register("cpp", _leading(_compiled(_stage), _n))
    _op.register("cuda", _leading(_compiled(_stage), _n))
    _op.register("triton", _leading(_tfwd, _n))


def _gate_operand(name: str, t, k: int, ref: torch.Tensor, ref_name: str) -> None:
    """t must be a [B, k*C, H, W] tensor for ref: Tensor[B, C, H, W], with ref's dtype and device."""
    _checks.tensor(name, t, 4, f"[B, {k}C, H, W]")
    _checks.same((ref_name, name), ref, t, shape=False)
    B, C, H, W = ref.shape
    if tuple(t.shape) != (B, k * C, H, W):
        raise ValueError(f"{name} must have shape [B, {k}C, H, W] = {(B, k * C, H, W)} for {ref_name} of shape "
                         f"{tuple(ref.shape)}, got {tuple(t.shape)}")


def causal_lstm_cell(x_g: Optional[torch.Tensor], h_g: torch.Tensor, c_g: Optional[torch.Tensor], c: torch.Tensor,
                     forget_bias: float = 1.0, backend: str | None = None):
    """Stage 1 of the Causal LSTM step: gates i, f, g and the new cell state c_t.

    x_g: Tensor[B, 7C, H, W] (conv_x: i, f, g, i', f', g', o) or None; h_g: Tensor[B, 4C, H, W] (i, f, g, o);
    c_g: Tensor[B, 3C, H, W] (conv_c: i, f, g) or None; c: Tensor[B, C, H, W]
    -> (c_new: Tensor[B, C, H, W], carry: Tensor[B, 4C, H, W] = [i'_x, f'_x, g'_x, o_x + o_h] with x_g, else
        Tensor[B, C, H, W] = o_h), the carry being causal_lstm_memory's first argument.
    Without x_g / c_g, h_g holds the summed pre-activations (the merged convolutions).
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x_g, h_g, c_g, c = CELL.cast_inputs(x_g, h_g, c_g, c)
    _checks.tensor("c", c, 4, "[B, C, H, W]")
    for name, t, k in (("h_g", h_g, 4), ("x_g", x_g, 7), ("c_g", c_g, 3)):
        if t is not None or name == "h_g":
            _gate_operand(name, t, k, c, "c")
    return CELL(x_g, h_g, c_g, c, float(forget_bias), backend=backend)


def causal_lstm_memory(carry: torch.Tensor, m_g: torch.Tensor, c2m_g: torch.Tensor, forget_bias: float = 1.0,
                       backend: str | None = None):
    """Stage 2 of the Causal LSTM step: gates i', f', g' and the new spatiotemporal memory m_t.

    carry: Tensor[B, 4C or C, H, W] (from causal_lstm_cell); m_g: Tensor[B, 3C, H, W] (conv_m: i', f', m̂);
    c2m_g: Tensor[B, 4C, H, W] (conv_c2m(c_t): i', g', f', o, the reference's order)
    -> (m_new: Tensor[B, C, H, W], o_part: Tensor[B, C, H, W] = o_x + o_h + o_c2m)
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    carry, m_g, c2m_g = MEMORY.cast_inputs(carry, m_g, c2m_g)
    _checks.tensor("m_g", m_g, 4, "[B, 3C, H, W]")
    if m_g.shape[1] % 3:
        raise ValueError(f"m_g must have 3C channels (i', f', m̂), got shape {tuple(m_g.shape)}")
    ref = m_g[:, : m_g.shape[1] // 3]
    _checks.tensor("carry", carry, 4, "[B, 4C or C, H, W]")
    _gate_operand("carry", carry, 4 if carry.shape[1] == 4 * ref.shape[1] and ref.shape[1] else 1, ref, "m_g")
    _gate_operand("c2m_g", c2m_g, 4, ref, "m_g")
    return MEMORY(carry, m_g, c2m_g, float(forget_bias), backend=backend)


def causal_lstm_output(o_part: torch.Tensor, o_m: torch.Tensor, last: torch.Tensor,
                       backend: str | None = None) -> torch.Tensor:
    """Stage 3 of the Causal LSTM step: h = tanh(o_part + o_m) ⊙ tanh(last).

    o_part, o_m, last: Tensor[B, C, H, W] -> h: Tensor[B, C, H, W]
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    o_part, o_m, last = OUTPUT.cast_inputs(o_part, o_m, last)
    for n, t in (("o_part", o_part), ("o_m", o_m), ("last", last)):
        _checks.tensor(n, t, 4, "[B, C, H, W]")
        _checks.same(("o_part", n), o_part, t)
    return OUTPUT(o_part, o_m, last, backend=backend)
