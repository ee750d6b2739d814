"""Triton kernels for the fused ConvLSTM pointwise step (contract: vpfast/ops/convlstm.py).

Indexing as in kernels/_pointwise.py: gate j of state element (b, ch, p) of a [B, 4C, H, W] operand sits at
(b*4 + j)*C*HW + ch*HW + p; launchers make operands contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pointwise import contiguous, gate_index, launch, load_gate as _gate, load_gates4
from ._pointwise import put as _put, put_gate as _put_gate, put_gates4, tanh as _tanh, wide as _wide


@triton.jit
def _fwd(x_ptr, h_ptr, c_ptr, hout_ptr, cn_ptr, act_ptr, N, C, HW, fb, HAS_X: tl.constexpr, TANH_C: tl.constexpr,
         BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    pi, pf, pg, po = load_gates4(h_ptr, b, 4, 0, CHW, rest, mask)
    if HAS_X:
        xi, xf, xg, xo = load_gates4(x_ptr, b, 4, 0, CHW, rest, mask)
        pi, pf, pg, po = xi + pi, xf + pf, xg + pg, xo + po
    c0 = _wide(tl.load(c_ptr + idx, mask=mask))
    i = tl.sigmoid(pi)
    f = tl.sigmoid(pf + fb)
    g = _tanh(pg)
    o = tl.sigmoid(po)
    cn = f * c0 + i * g
    if TANH_C:
        h = o * _tanh(cn)
    else:
        h = o * g
    _put(hout_ptr + idx, h, mask)
    _put(cn_ptr + idx, cn, mask)
    _put_gate(act_ptr, b, 3, 0, CHW, rest, i, mask)
    _put_gate(act_ptr, b, 3, 1, CHW, rest, f, mask)
    _put_gate(act_ptr, b, 3, 2, CHW, rest, o, mask)


@triton.jit
def _bwd(gh_ptr, gc_ptr, act_ptr, c_ptr, cn_ptr, h_ptr, gx_ptr, ghg_ptr, gcp_ptr, N, C, HW, HAS_GH: tl.constexpr,
         HAS_GC: tl.constexpr, HAS_X: tl.constexpr, TANH_C: tl.constexpr, BLOCK: tl.constexpr):
    CHW = C * HW
    idx, mask, b, rest = gate_index(N, CHW, BLOCK)
    i = _gate(act_ptr, b, 3, 0, CHW, rest, mask)
    f = _gate(act_ptr, b, 3, 1, CHW, rest, mask)
    o = _gate(act_ptr, b, 3, 2, CHW, rest, mask)
    c0 = _wide(tl.load(c_ptr + idx, mask=mask))
    cn = _wide(tl.load(cn_ptr + idx, mask=mask))
    # g recovered from i*g = c_new - f*c_prev, or from h = o*g where o > i (csrc/common/stlstm.h says why)
    d = cn - f * c0
    g = tl.where(i > 0.0, d / tl.where(i > 0.0, i, 1.0), 0.0)
    if not TANH_C:
        hv = _wide(tl.load(h_ptr + idx, mask=mask))
        g = tl.where(o > i, hv / tl.where(o > i, o, 1.0), g)
    g = tl.minimum(tl.maximum(g, -1.0), 1.0)
    gh = tl.zeros_like(i)
    gct = tl.zeros_like(i)
    if HAS_GH:
        gh = _wide(tl.load(gh_ptr + idx, mask=mask))
    if HAS_GC:
        gct = _wide(tl.load(gc_ptr + idx, mask=mask))
    gg = tl.zeros_like(i)
    if TANH_C:
        a = _tanh(cn)
        gct = gct + gh * o * (1.0 - a * a)
    else:
        a = g
        gg = gh * o
    gpo = gh * a * o * (1.0 - o)
    gpi = gct * d * (1.0 - i)
    gpf = gct * c0 * f * (1.0 - f)
    gpg = (gct * i + gg) * (1.0 - g * g)
    put_gates4(ghg_ptr, b, 4, 0, CHW, rest, gpi, gpf, gpg, gpo, mask)
    _put(gcp_ptr + idx, gct * f, mask)
    if HAS_X:
        put_gates4(gx_ptr, b, 4, 0, CHW, rest, gpi, gpf, gpg, gpo, mask)


def forward(x_g, h_g, c, forget_bias, tanh_c):
    B, C, H, W = c.shape
    x_g, h_g, c = contiguous(x_g, h_g, c)
    h, cn = torch.empty_like(c), torch.empty_like(c)
    act = c.new_empty((B, 3 * C, H, W))
    launch(_fwd, c.numel(), x_g, h_g, c, h, cn, act, c.numel(), C, H * W, float(forget_bias),
           HAS_X=x_g is not None, TANH_C=bool(tanh_c))
    return h, cn, act


def backward(g_h, g_c, act, c, c_new, h, has_x, tanh_c):
    B, C, H, W = c.shape
    g_h, g_c, act, c, c_new, h = contiguous(g_h, g_c, act, c, c_new, h)
    gx = c.new_empty((B, 4 * C, H, W)) if has_x else c.new_empty((0,))
    ghg = c.new_empty((B, 4 * C, H, W))
    gcp = torch.empty_like(c)
    launch(_bwd, c.numel(), g_h, g_c, act, c, c_new, h, gx if has_x else None, ghg, gcp, c.numel(), C, H * W,
           HAS_GH=g_h is not None, HAS_GC=g_c is not None, HAS_X=bool(has_x), TANH_C=bool(tanh_c))
    return gx, ghg, gcp
