"""Triton kernels for the fused ST-LSTM pointwise stages (see vpfast/ops/stlstm.py for the contract).

One program per BLOCK elements of the flattened [B, C, H, W] index space; a [B, K*C, H, W] operand's gate j
of element (b, ch, p) sits at (b*K + j)*C*HW + ch*HW + p (kernels/_pointwise.py). Operands are made contiguous
by the launchers.
tanh(x) is 2*sigmoid(2x) - 1 (tl.tanh does not exist in this Triton).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pointwise import contiguous, gate_index, launch, load_gate as _gate, load_gates4
from ._pointwise import put as _put, put_gate as _put_gate, put_gates4, tanh as _tanh, wide as _wide


@triton.jit
def _gates_fwd(x_ptr, h_ptr, m_ptr, c_ptr, mp_ptr, cm_ptr, op_ptr, act_ptr, d_ptr, N, C, HW, fb,
               HAS_X: tl.constexpr, DELTA: tl.constexpr, BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    pi, pf, pg, po = load_gates4(h_ptr, b, 4, 0, CHW, rest, mask)
    qi = _gate(m_ptr, b, 3, 0, CHW, rest, mask)
    qf = _gate(m_ptr, b, 3, 1, CHW, rest, mask)
    qg = _gate(m_ptr, b, 3, 2, CHW, rest, mask)
    if HAS_X:
        pi = _gate(x_ptr, b, 7, 0, CHW, rest, mask) + pi
        pf = _gate(x_ptr, b, 7, 1, CHW, rest, mask) + pf
        pg = _gate(x_ptr, b, 7, 2, CHW, rest, mask) + pg
        qi = _gate(x_ptr, b, 7, 3, CHW, rest, mask) + qi
        qf = _gate(x_ptr, b, 7, 4, CHW, rest, mask) + qf
        qg = _gate(x_ptr, b, 7, 5, CHW, rest, mask) + qg
        po = _gate(x_ptr, b, 7, 6, CHW, rest, mask) + po
    c0 = _wide(tl.load(c_ptr + idx, mask=mask))
    m0 = _wide(tl.load(mp_ptr + idx, mask=mask))
    i = tl.sigmoid(pi)
    f = tl.sigmoid(pf + fb)
    g = _tanh(pg)
    i2 = tl.sigmoid(qi)
    f2 = tl.sigmoid(qf + fb)
    g2 = _tanh(qg)
    _put_gate(cm_ptr, b, 2, 0, CHW, rest, f * c0 + i * g, mask)
    _put_gate(cm_ptr, b, 2, 1, CHW, rest, f2 * m0 + i2 * g2, mask)
    _put(op_ptr + idx, po, mask)
    put_gates4(act_ptr, b, 4, 0, CHW, rest, i, f, i2, f2, mask)
    if DELTA:
        _put_gate(d_ptr, b, 2, 0, CHW, rest, i * g, mask)
        _put_gate(d_ptr, b, 2, 1, CHW, rest, i2 * g2, mask)


@triton.jit
def _gates_bwd(gcm_ptr, gop_ptr, gd_ptr, act_ptr, cm_ptr, c_ptr, mp_ptr, gx_ptr, gh_ptr, gm_ptr, gc_ptr, gmp_ptr, N, C, HW,
               HAS_X: tl.constexpr, DELTA: tl.constexpr, BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    gcn = _gate(gcm_ptr, b, 2, 0, CHW, rest, mask)
    gmn = _gate(gcm_ptr, b, 2, 1, CHW, rest, mask)
    gig = gcn
    gig2 = gmn
    if DELTA:
        gig = gcn + _gate(gd_ptr, b, 2, 0, CHW, rest, mask)
        gig2 = gmn + _gate(gd_ptr, b, 2, 1, CHW, rest, mask)
    i, f, i2, f2 = load_gates4(act_ptr, b, 4, 0, CHW, rest, mask)
    c0 = _wide(tl.load(c_ptr + idx, mask=mask))
    m0 = _wide(tl.load(mp_ptr + idx, mask=mask))
    c1 = _gate(cm_ptr, b, 2, 0, CHW, rest, mask)
    m1 = _gate(cm_ptr, b, 2, 1, CHW, rest, mask)
    go = _wide(tl.load(gop_ptr + idx, mask=mask))
    # d = i*g recovered from the saved memories, g = d / i clamped to [-1, 1] (csrc/common/stlstm.h says why)
    d = c1 - f * c0
    d2 = m1 - f2 * m0
    g = tl.minimum(tl.maximum(tl.where(i > 0.0, d / tl.where(i > 0.0, i, 1.0), 0.0), -1.0), 1.0)
    g2 = tl.minimum(tl.maximum(tl.where(i2 > 0.0, d2 / tl.where(i2 > 0.0, i2, 1.0), 0.0), -1.0), 1.0)
    gpi = gig * d * (1.0 - i)
    gpf = gcn * c0 * f * (1.0 - f)
    gpg = gig * i * (1.0 - g * g)
    gqi = gig2 * d2 * (1.0 - i2)
    gqf = gmn * m0 * f2 * (1.0 - f2)
    gqg = gig2 * i2 * (1.0 - g2 * g2)
    put_gates4(gh_ptr, b, 4, 0, CHW, rest, gpi, gpf, gpg, go, mask)
    _put_gate(gm_ptr, b, 3, 0, CHW, rest, gqi, mask)
    _put_gate(gm_ptr, b, 3, 1, CHW, rest, gqf, mask)
    _put_gate(gm_ptr, b, 3, 2, CHW, rest, gqg, mask)
    _put(gc_ptr + idx, gcn * f, mask)
    _put(gmp_ptr + idx, gmn * f2, mask)
    if HAS_X:
        _put_gate(gx_ptr, b, 7, 0, CHW, rest, gpi, mask)
        _put_gate(gx_ptr, b, 7, 1, CHW, rest, gpf, mask)
        _put_gate(gx_ptr, b, 7, 2, CHW, rest, gpg, mask)
        _put_gate(gx_ptr, b, 7, 3, CHW, rest, gqi, mask)
        _put_gate(gx_ptr, b, 7, 4, CHW, rest, gqf, mask)
        _put_gate(gx_ptr, b, 7, 5, CHW, rest, gqg, mask)
        _put_gate(gx_ptr, b, 7, 6, CHW, rest, go, mask)


@triton.jit
def _output_fwd(op_ptr, om_ptr, last_ptr, hw_ptr, h_ptr, o_ptr, tl_ptr, N, HAS_HW: tl.constexpr,
                BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    o = tl.sigmoid(_wide(tl.load(op_ptr + idx, mask=mask)) + _wide(tl.load(om_ptr + idx, mask=mask)))
    t = _tanh(_wide(tl.load(last_ptr + idx, mask=mask)))
    h = o * t
    if HAS_HW:
        h = h + (1.0 - o) * _wide(tl.load(hw_ptr + idx, mask=mask))
        _put(tl_ptr + idx, t, mask)
    _put(h_ptr + idx, h, mask)
    _put(o_ptr + idx, o, mask)


@triton.jit
def _output_bwd(gh_ptr, o_ptr, ht_ptr, hw_ptr, gpre_ptr, glast_ptr, ghw_ptr, N, HAS_HW: tl.constexpr,
                BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    gh = _wide(tl.load(gh_ptr + idx, mask=mask))
    o = _wide(tl.load(o_ptr + idx, mask=mask, other=1.0))
    ht = _wide(tl.load(ht_ptr + idx, mask=mask))
    if HAS_HW:
        t = ht
        hw = _wide(tl.load(hw_ptr + idx, mask=mask))
        _put(ghw_ptr + idx, gh * (1.0 - o), mask)
    else:
        t = tl.where(o > 0.0, ht / tl.where(o > 0.0, o, 1.0), 0.0)
        hw = 0.0
    _put(gpre_ptr + idx, gh * (t - hw) * o * (1.0 - o), mask)
    _put(glast_ptr + idx, gh * o * (1.0 - t * t), mask)


def gates_forward(x_g, h_g, m_g, c, m, forget_bias, with_delta):
    B, C, H, W = c.shape
    x_g, h_g, m_g, c, m = contiguous(x_g, h_g, m_g, c, m)
    cm = c.new_empty((B, 2 * C, H, W))
    o_part = torch.empty_like(c)
    act = c.new_empty((B, 4 * C, H, W))
    delta = c.new_empty((B, 2 * C, H, W)) if with_delta else c.new_empty((0,))
    launch(_gates_fwd, c.numel(), x_g, h_g, m_g, c, m, cm, o_part, act, delta if with_delta else None, c.numel(),
           C, H * W, float(forget_bias), HAS_X=x_g is not None, DELTA=bool(with_delta))
    return cm, o_part, act, delta


def gates_backward(g_cm, g_opart, g_delta, act, cm, c, m, has_x):
    B, C, H, W = c.shape
    g_cm, g_opart, g_delta, act, cm, c, m = contiguous(g_cm, g_opart, g_delta, act, cm, c, m)
    gx = c.new_empty((B, 7 * C, H, W)) if has_x else c.new_empty((0,))
    gh = c.new_empty((B, 4 * C, H, W))
    gm = c.new_empty((B, 3 * C, H, W))
    gc, gmp = torch.empty_like(c), torch.empty_like(m)
    launch(_gates_bwd, c.numel(), g_cm, g_opart, g_delta, act, cm, c, m, gx if has_x else None, gh, gm, gc, gmp,
           c.numel(), C, H * W, HAS_X=bool(has_x), DELTA=g_delta is not None)
    return gx, gh, gm, gc, gmp


def output_forward(o_part, o_m, last, highway):
    o_part, o_m, last, highway = contiguous(o_part, o_m, last, highway)
    h, o = torch.empty_like(o_part), torch.empty_like(o_part)
    t = torch.empty_like(o_part) if highway is not None else o_part.new_empty((0,))
    launch(_output_fwd, o_part.numel(), o_part, o_m, last, highway, h, o, t if highway is not None else None,
           o_part.numel(), HAS_HW=highway is not None)
    return h, o, t


def output_backward(g_h, o, h_or_tl, highway):
    g_h, o, h_or_tl, highway = contiguous(g_h, o, h_or_tl, highway)
    gpre, glast = torch.empty_like(o), torch.empty_like(o)
    ghw = torch.empty_like(o) if highway is not None else o.new_empty((0,))
    launch(_output_bwd, o.numel(), g_h, o, h_or_tl, highway, gpre, glast, ghw if highway is not None else None,
           o.numel(), HAS_HW=highway is not None)
    return gpre, glast, ghw
