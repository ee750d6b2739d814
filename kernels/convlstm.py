"""Triton kernels for the fused ConvLSTM pointwise step (contract: vpfast/ops/convlstm.py).

Same indexing as kernels/stlstm.py: gate j of element (b, ch, p) of a [B, 4C, H, W] operand sits at
((b*4 + j)*C + ch)*HW + p; launchers make operands contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pointwise import BLOCK, grid as _grid, put as _put, tanh as _tanh, wide as _wide




@triton.jit
def _fwd(x_ptr, h_ptr, c_ptr, hout_ptr, cn_ptr, act_ptr, N, C, HW, fb, HAS_X: tl.constexpr, TANH_C: tl.constexpr,
         BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    p = idx % HW
    r = idx // HW
    ch = r % C
    b = r // C
    pi = _wide(tl.load(h_ptr + ((b * 4 + 0) * C + ch) * HW + p, mask=mask))
    pf = _wide(tl.load(h_ptr + ((b * 4 + 1) * C + ch) * HW + p, mask=mask))
    pg = _wide(tl.load(h_ptr + ((b * 4 + 2) * C + ch) * HW + p, mask=mask))
    po = _wide(tl.load(h_ptr + ((b * 4 + 3) * C + ch) * HW + p, mask=mask))
    if HAS_X:
        pi = _wide(tl.load(x_ptr + ((b * 4 + 0) * C + ch) * HW + p, mask=mask)) + pi
        pf = _wide(tl.load(x_ptr + ((b * 4 + 1) * C + ch) * HW + p, mask=mask)) + pf
        pg = _wide(tl.load(x_ptr + ((b * 4 + 2) * C + ch) * HW + p, mask=mask)) + pg
        po = _wide(tl.load(x_ptr + ((b * 4 + 3) * C + ch) * HW + p, mask=mask)) + po
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
    _put(act_ptr + ((b * 3 + 0) * C + ch) * HW + p, i, mask)
    _put(act_ptr + ((b * 3 + 1) * C + ch) * HW + p, f, mask)
    _put(act_ptr + ((b * 3 + 2) * C + ch) * HW + p, o, mask)


@triton.jit
def _bwd(gh_ptr, gc_ptr, act_ptr, c_ptr, cn_ptr, h_ptr, gx_ptr, ghg_ptr, gcp_ptr, N, C, HW, HAS_GH: tl.constexpr,
         HAS_GC: tl.constexpr, HAS_X: tl.constexpr, TANH_C: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    p = idx % HW
    r = idx // HW
    ch = r % C
    b = r // C
    i = _wide(tl.load(act_ptr + ((b * 3 + 0) * C + ch) * HW + p, mask=mask))
    f = _wide(tl.load(act_ptr + ((b * 3 + 1) * C + ch) * HW + p, mask=mask))
    o = _wide(tl.load(act_ptr + ((b * 3 + 2) * C + ch) * HW + p, mask=mask))
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
    _put(ghg_ptr + ((b * 4 + 0) * C + ch) * HW + p, gpi, mask)
    _put(ghg_ptr + ((b * 4 + 1) * C + ch) * HW + p, gpf, mask)
    _put(ghg_ptr + ((b * 4 + 2) * C + ch) * HW + p, gpg, mask)
    _put(ghg_ptr + ((b * 4 + 3) * C + ch) * HW + p, gpo, mask)
    _put(gcp_ptr + idx, gct * f, mask)
    if HAS_X:
        _put(gx_ptr + ((b * 4 + 0) * C + ch) * HW + p, gpi, mask)
        _put(gx_ptr + ((b * 4 + 1) * C + ch) * HW + p, gpf, mask)
        _put(gx_ptr + ((b * 4 + 2) * C + ch) * HW + p, gpg, mask)
        _put(gx_ptr + ((b * 4 + 3) * C + ch) * HW + p, gpo, mask)



def forward(x_g, h_g, c, forget_bias, tanh_c):
    B, C, H, W = c.shape
    N = c.numel()
    h_g, c = h_g.contiguous(), c.contiguous()
    x_g = x_g.contiguous() if x_g is not None else None
    h, cn = torch.empty_like(c), torch.empty_like(c)
    act = c.new_empty((B, 3 * C, H, W))
    if N:
        _fwd[_grid(N)](x_g if x_g is not None else h_g, h_g, c, h, cn, act, N, C, H * W, float(forget_bias),
                       HAS_X=x_g is not None, TANH_C=bool(tanh_c), BLOCK=BLOCK)
    return h, cn, act


def backward(g_h, g_c, act, c, c_new, h, has_x, tanh_c):
    B, C, H, W = c.shape
    N = c.numel()
    act, c, c_new, h = act.contiguous(), c.contiguous(), c_new.contiguous(), h.contiguous()
    g_h = g_h.contiguous() if g_h is not None else None
    g_c = g_c.contiguous() if g_c is not None else None
    gx = c.new_empty((B, 4 * C, H, W)) if has_x else c.new_empty((0,))
    ghg = c.new_empty((B, 4 * C, H, W))
    gcp = torch.empty_like(c)
    if N:
        _bwd[_grid(N)](g_h if g_h is not None else c, g_c if g_c is not None else c, act, c, c_new, h,
                       gx if has_x else ghg, ghg, gcp, N, C, H * W, HAS_GH=g_h is not None, HAS_GC=g_c is not None,
                       HAS_X=bool(has_x), TANH_C=bool(tanh_c), BLOCK=BLOCK)
    return gx, ghg, gcp
