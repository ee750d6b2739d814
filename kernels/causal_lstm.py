"""Triton kernels for the fused Causal LSTM pointwise stages (see vpfast/ops/causal_lstm.py for the contract).

One program per BLOCK elements of the flattened [B, C, H, W] index space; a [B, K*C, H, W] operand's slot j of
element (b, ch, p) sits at (b*K + j)*C*HW + ch*HW + p (kernels/_pointwise.py). Operands are made contiguous by
the launchers. Gate orders: x_g i, f, g, i', f', g', o; h_g i, f, g, o; c_g i, f, g; m_g i', f', m̂;
c2m_g i', g', f', o; carry [i'_x, f'_x, g'_x, o] (with x) or [o].
Layouts: the kernels run on contiguous (planar) operands; a call whose layout operand is channels_last gets its
outputs in channels_last (copies), as the compiled ops' contract says (vpfast/ops/causal_lstm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pointwise import contiguous, gate_index, launch, load_gate as _gate, put as _put, put_gate as _put_gate
from ._pointwise import tanh as _tanh, wide as _wide


@triton.jit
def _memory_update(pi, pf, pg, prev, fb):
    """i = σ(pi), f = σ(pf + fb), g = tanh(pg), new = f prev + i g -> (new, i, f)."""
    i = tl.sigmoid(pi)
    f = tl.sigmoid(pf + fb)
    return f * prev + i * _tanh(pg), i, f


@triton.jit
def _memory_update_backward(i, f, prev, new, gn):
    """Backward of _memory_update from the saved i, f, prev and new: g recovered from d = i g = new - f prev,
    clamped to tanh's range (csrc/common/stlstm.h says why) -> (grad pi, grad pf, grad pg, grad prev)."""
    d = new - f * prev
    g = tl.minimum(tl.maximum(tl.where(i > 0.0, d / tl.where(i > 0.0, i, 1.0), 0.0), -1.0), 1.0)
    return gn * d * (1.0 - i), gn * prev * f * (1.0 - f), gn * i * (1.0 - g * g), gn * f


@triton.jit
def _cell_fwd(x_ptr, h_ptr, cg_ptr, c_ptr, cn_ptr, car_ptr, act_ptr, N, C, HW, fb,
              HAS_X: tl.constexpr, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    pi = _gate(h_ptr, b, 4, 0, CHW, rest, mask)
    pf = _gate(h_ptr, b, 4, 1, CHW, rest, mask)
    pg = _gate(h_ptr, b, 4, 2, CHW, rest, mask)
    po = _gate(h_ptr, b, 4, 3, CHW, rest, mask)
    if HAS_X:  # the reference's order of summation: (x + h) + c
        pi = _gate(x_ptr, b, 7, 0, CHW, rest, mask) + pi
        pf = _gate(x_ptr, b, 7, 1, CHW, rest, mask) + pf
        pg = _gate(x_ptr, b, 7, 2, CHW, rest, mask) + pg
        po = _gate(x_ptr, b, 7, 6, CHW, rest, mask) + po
        _put_gate(car_ptr, b, 4, 0, CHW, rest, _gate(x_ptr, b, 7, 3, CHW, rest, mask), mask)
        _put_gate(car_ptr, b, 4, 1, CHW, rest, _gate(x_ptr, b, 7, 4, CHW, rest, mask), mask)
        _put_gate(car_ptr, b, 4, 2, CHW, rest, _gate(x_ptr, b, 7, 5, CHW, rest, mask), mask)
        _put_gate(car_ptr, b, 4, 3, CHW, rest, po, mask)
    else:
        _put(car_ptr + idx, po, mask)
    if HAS_C:
        pi += _gate(cg_ptr, b, 3, 0, CHW, rest, mask)
        pf += _gate(cg_ptr, b, 3, 1, CHW, rest, mask)
        pg += _gate(cg_ptr, b, 3, 2, CHW, rest, mask)
    c_new, i, f = _memory_update(pi, pf, pg, _wide(tl.load(c_ptr + idx, mask=mask)), fb)
    _put(cn_ptr + idx, c_new, mask)
    _put_gate(act_ptr, b, 2, 0, CHW, rest, i, mask)
    _put_gate(act_ptr, b, 2, 1, CHW, rest, f, mask)


@triton.jit
def _cell_bwd(gcn_ptr, gcar_ptr, act_ptr, cn_ptr, c_ptr, gx_ptr, gh_ptr, gcg_ptr, gc_ptr, N, C, HW,
              HAS_X: tl.constexpr, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    i = _gate(act_ptr, b, 2, 0, CHW, rest, mask)
    f = _gate(act_ptr, b, 2, 1, CHW, rest, mask)
    c0 = _wide(tl.load(c_ptr + idx, mask=mask))
    c1 = _wide(tl.load(cn_ptr + idx, mask=mask))
    gpi, gpf, gpg, gcp = _memory_update_backward(i, f, c0, c1, _wide(tl.load(gcn_ptr + idx, mask=mask)))
    _put(gc_ptr + idx, gcp, mask)
    _put_gate(gh_ptr, b, 4, 0, CHW, rest, gpi, mask)
    _put_gate(gh_ptr, b, 4, 1, CHW, rest, gpf, mask)
    _put_gate(gh_ptr, b, 4, 2, CHW, rest, gpg, mask)
    if HAS_C:
        _put_gate(gcg_ptr, b, 3, 0, CHW, rest, gpi, mask)
        _put_gate(gcg_ptr, b, 3, 1, CHW, rest, gpf, mask)
        _put_gate(gcg_ptr, b, 3, 2, CHW, rest, gpg, mask)
    if HAS_X:
        go = _gate(gcar_ptr, b, 4, 3, CHW, rest, mask)
        _put_gate(gx_ptr, b, 7, 0, CHW, rest, gpi, mask)
        _put_gate(gx_ptr, b, 7, 1, CHW, rest, gpf, mask)
        _put_gate(gx_ptr, b, 7, 2, CHW, rest, gpg, mask)
        _put_gate(gx_ptr, b, 7, 3, CHW, rest, _gate(gcar_ptr, b, 4, 0, CHW, rest, mask), mask)
        _put_gate(gx_ptr, b, 7, 4, CHW, rest, _gate(gcar_ptr, b, 4, 1, CHW, rest, mask), mask)
        _put_gate(gx_ptr, b, 7, 5, CHW, rest, _gate(gcar_ptr, b, 4, 2, CHW, rest, mask), mask)
        _put_gate(gx_ptr, b, 7, 6, CHW, rest, go, mask)
    else:
        go = _wide(tl.load(gcar_ptr + idx, mask=mask))
    _put_gate(gh_ptr, b, 4, 3, CHW, rest, go, mask)


@triton.jit
def _memory_fwd(car_ptr, mg_ptr, k_ptr, mn_ptr, op_ptr, act_ptr, N, C, HW, fb, CX: tl.constexpr,
                BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    qi = _gate(mg_ptr, b, 3, 0, CHW, rest, mask)
    qf = _gate(mg_ptr, b, 3, 1, CHW, rest, mask)
    qg = _gate(k_ptr, b, 4, 1, CHW, rest, mask)
    if CX:  # (x + m) + c2m, as the reference sums
        qi = _gate(car_ptr, b, 4, 0, CHW, rest, mask) + qi
        qf = _gate(car_ptr, b, 4, 1, CHW, rest, mask) + qf
        qg = _gate(car_ptr, b, 4, 2, CHW, rest, mask) + qg
        o_in = _gate(car_ptr, b, 4, 3, CHW, rest, mask)
    else:
        o_in = _wide(tl.load(car_ptr + idx, mask=mask))
    qi += _gate(k_ptr, b, 4, 0, CHW, rest, mask)
    qf += _gate(k_ptr, b, 4, 2, CHW, rest, mask)
    t = _tanh(_gate(mg_ptr, b, 3, 2, CHW, rest, mask))
    m_new, i, f = _memory_update(qi, qf, qg, t, fb)
    _put(mn_ptr + idx, m_new, mask)
    _put(op_ptr + idx, o_in + _gate(k_ptr, b, 4, 3, CHW, rest, mask), mask)
    _put_gate(act_ptr, b, 3, 0, CHW, rest, i, mask)
    _put_gate(act_ptr, b, 3, 1, CHW, rest, f, mask)
    _put_gate(act_ptr, b, 3, 2, CHW, rest, t, mask)


@triton.jit
def _memory_bwd(gm_ptr, gop_ptr, act_ptr, mn_ptr, gcar_ptr, gmg_ptr, gk_ptr, N, C, HW, CX: tl.constexpr,
                BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    i = _gate(act_ptr, b, 3, 0, CHW, rest, mask)
    f = _gate(act_ptr, b, 3, 1, CHW, rest, mask)
    t = _gate(act_ptr, b, 3, 2, CHW, rest, mask)
    gi, gf, gg, gt = _memory_update_backward(i, f, t, _wide(tl.load(mn_ptr + idx, mask=mask)),
                                             _wide(tl.load(gm_ptr + idx, mask=mask)))
    go = _wide(tl.load(gop_ptr + idx, mask=mask))
    _put_gate(gmg_ptr, b, 3, 0, CHW, rest, gi, mask)
    _put_gate(gmg_ptr, b, 3, 1, CHW, rest, gf, mask)
    _put_gate(gmg_ptr, b, 3, 2, CHW, rest, gt * (1.0 - t * t), mask)
    _put_gate(gk_ptr, b, 4, 0, CHW, rest, gi, mask)
    _put_gate(gk_ptr, b, 4, 1, CHW, rest, gg, mask)
    _put_gate(gk_ptr, b, 4, 2, CHW, rest, gf, mask)
    _put_gate(gk_ptr, b, 4, 3, CHW, rest, go, mask)
    if CX:
        _put_gate(gcar_ptr, b, 4, 0, CHW, rest, gi, mask)
        _put_gate(gcar_ptr, b, 4, 1, CHW, rest, gf, mask)
        _put_gate(gcar_ptr, b, 4, 2, CHW, rest, gg, mask)
        _put_gate(gcar_ptr, b, 4, 3, CHW, rest, go, mask)
    else:
        _put(gcar_ptr + idx, go, mask)


@triton.jit
def _output_fwd(op_ptr, om_ptr, last_ptr, h_ptr, o_ptr, tl_ptr, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    o = _tanh(_wide(tl.load(op_ptr + idx, mask=mask)) + _wide(tl.load(om_ptr + idx, mask=mask)))
    t = _tanh(_wide(tl.load(last_ptr + idx, mask=mask)))
    _put(h_ptr + idx, o * t, mask)
    _put(o_ptr + idx, o, mask)
    _put(tl_ptr + idx, t, mask)


@triton.jit
def _output_bwd(gh_ptr, o_ptr, tl_ptr, gpre_ptr, glast_ptr, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    gh = _wide(tl.load(gh_ptr + idx, mask=mask))
    o = _wide(tl.load(o_ptr + idx, mask=mask))
    t = _wide(tl.load(tl_ptr + idx, mask=mask))
    _put(gpre_ptr + idx, gh * t * (1.0 - o * o), mask)
    _put(glast_ptr + idx, gh * o * (1.0 - t * t), mask)


def _maps(like, *ks):
    """[B, k*C, H, W] outputs shaped after the state `like` ([B, C, H, W]); k = 0 gives an empty tensor."""
    B, C, H, W = like.shape
    return tuple(like.new_empty((B, k * C, H, W)) if k else like.new_empty((0,)) for k in ks)


def _in_layout(layout, outs):
    """The outputs in the layout the op's contract gives them: channels_last when `layout` is (and not also
    contiguous, as vpfast.ops.causal_lstm.channels_last says)."""
    if not (layout.dim() == 4 and layout.is_contiguous(memory_format=torch.channels_last)
            and not layout.is_contiguous()):
        return outs
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in outs)


def cell_forward(x_g, h_g, c_g, c, forget_bias):
    layout = c
    x_g, h_g, c_g, c = contiguous(x_g, h_g, c_g, c)
    c_new, carry, act = _maps(c, 1, 4 if x_g is not None else 1, 2)
    C, HW = c.shape[1], c.shape[2] * c.shape[3]
    launch(_cell_fwd, c.numel(), x_g, h_g, c_g, c, c_new, carry, act, c.numel(), C, HW, float(forget_bias),
           HAS_X=x_g is not None, HAS_C=c_g is not None)
    return _in_layout(layout, (c_new, carry, act))


def cell_backward(g_cn, g_carry, act, c_new, c, has_x, has_c):
    layout = act
    g_cn, g_carry, act, c_new, c = contiguous(g_cn, g_carry, act, c_new, c)
    gx, gh, gcg, gc = _maps(c, 7 if has_x else 0, 4, 3 if has_c else 0, 1)
    C, HW = c.shape[1], c.shape[2] * c.shape[3]
    launch(_cell_bwd, c.numel(), g_cn, g_carry, act, c_new, c, gx if has_x else None, gh, gcg if has_c else None,
           gc, c.numel(), C, HW, HAS_X=bool(has_x), HAS_C=bool(has_c))
    return _in_layout(layout, (gx, gh, gcg, gc))


def memory_forward(carry, m_g, c2m_g, forget_bias):
    layout = m_g
    carry, m_g, c2m_g = contiguous(carry, m_g, c2m_g)
    C = m_g.shape[1] // 3
    ref = m_g[:, :C]
    m_new, o_part, act = _maps(ref, 1, 1, 3)
    n = ref.numel()
    launch(_memory_fwd, n, carry, m_g, c2m_g, m_new, o_part, act, n, C, ref.shape[2] * ref.shape[3],
           float(forget_bias), CX=carry.shape[1] == 4 * C)
    return _in_layout(layout, (m_new, o_part, act))


def memory_backward(g_mn, g_op, act, m_new, carry_x):
    layout = act
    g_mn, g_op, act, m_new = contiguous(g_mn, g_op, act, m_new)
    g_carry, g_mg, g_c2m = _maps(m_new, 4 if carry_x else 1, 3, 4)
    C, HW = m_new.shape[1], m_new.shape[2] * m_new.shape[3]
    launch(_memory_bwd, m_new.numel(), g_mn, g_op, act, m_new, g_carry, g_mg, g_c2m, m_new.numel(), C, HW,
           CX=bool(carry_x))
    return _in_layout(layout, (g_carry, g_mg, g_c2m))


def output_forward(o_part, o_m, last):
    layout = o_part
    o_part, o_m, last = contiguous(o_part, o_m, last)
    h, o, t = _maps(o_part, 1, 1, 1)
    launch(_output_fwd, o_part.numel(), o_part, o_m, last, h, o, t, o_part.numel())
    return _in_layout(layout, (h, o, t))


def output_backward(g_h, o, t):
    layout = o
    g_h, o, t = contiguous(g_h, o, t)
    gpre, glast = _maps(o, 1, 1)
    launch(_output_bwd, o.numel(), g_h, o, t, gpre, glast, o.numel())
    return _in_layout(layout, (gpre, glast))
