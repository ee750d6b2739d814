"""MotionGRU pointwise steps in Triton (vpfast.ops.motion_gru's triton backend).

One program per block of elements of F_prev [B, M, H, W] (L = M*H*W per image); the gates tensor
[B, 2M, H, W] holds the update half then the reset half of each image. tanh(x) = 2σ(2x) − 1 (tl.tanh does
not exist).
"""
import torch
import triton
import triton.language as tl

from ._pointwise import launch, put as _put, tanh as _tanh, wide as _wide


@triton.jit
def _reset_kernel(gates, f, out, n, L, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    b = i // L
    j = i - b * L
    gr = _wide(tl.load(gates + b * 2 * L + L + j, mask=ok, other=0.0))
    fv = _wide(tl.load(f + i, mask=ok, other=0.0))
    _put(out + i, tl.sigmoid(gr) * fv, ok)


@triton.jit
def _reset_bwd_kernel(g, gates, f, d_gates, d_f, n, L, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    b = i // L
    j = i - b * L
    gv = _wide(tl.load(g + i, mask=ok, other=0.0))
    gr = _wide(tl.load(gates + b * 2 * L + L + j, mask=ok, other=0.0))
    fv = _wide(tl.load(f + i, mask=ok, other=0.0))
    r = tl.sigmoid(gr)
    _put(d_gates + b * 2 * L + j, gv * 0, ok)
    _put(d_gates + b * 2 * L + L + j, gv * fv * r * (1 - r), ok)
    _put(d_f + i, gv * r, ok)


@triton.jit
def _update_kernel(gates, o, f, d, f_out, d_out, n, L, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    b = i // L
    j = i - b * L
    u = tl.sigmoid(_wide(tl.load(gates + b * 2 * L + j, mask=ok, other=0.0)))
    t = _tanh(_wide(tl.load(o + i, mask=ok, other=0.0)))
    fv = _wide(tl.load(f + i, mask=ok, other=0.0))
    dv = _wide(tl.load(d + i, mask=ok, other=0.0))
    dn = dv + 0.5 * (fv - dv)
    _put(f_out + i, fv * (1 - u) + t * u + dn, ok)
    _put(d_out + i, dn, ok)


@triton.jit
def _update_bwd_kernel(g_f, g_d, gates, o, f, d_gates, d_o, d_f, d_d, n, L, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    b = i // L
    j = i - b * L
    gf = _wide(tl.load(g_f + i, mask=ok, other=0.0))
    gd = _wide(tl.load(g_d + i, mask=ok, other=0.0))
    u = tl.sigmoid(_wide(tl.load(gates + b * 2 * L + j, mask=ok, other=0.0)))
    t = _tanh(_wide(tl.load(o + i, mask=ok, other=0.0)))
    fv = _wide(tl.load(f + i, mask=ok, other=0.0))
    gdn = gd + gf
    _put(d_gates + b * 2 * L + j, gf * (t - fv) * u * (1 - u), ok)
    _put(d_gates + b * 2 * L + L + j, gf * 0, ok)
    _put(d_o + i, gf * u * (1 - t * t), ok)
    _put(d_f + i, gf * (1 - u) + 0.5 * gdn, ok)
    _put(d_d + i, 0.5 * gdn, ok)


def _L(f):
    return f.numel() // max(f.shape[0], 1)


def reset(gates, f):
    out = torch.empty_like(f)
    launch(_reset_kernel, f.numel(), gates, f, out, f.numel(), _L(f))
    return out


def reset_backward(g, gates, f):
    d_gates, d_f = torch.empty_like(gates), torch.empty_like(f)
    launch(_reset_bwd_kernel, f.numel(), g, gates, f, d_gates, d_f, f.numel(), _L(f))
    return d_gates, d_f


def update(gates, o, f, d):
    f_out, d_out = torch.empty_like(f), torch.empty_like(f)
    launch(_update_kernel, f.numel(), gates, o, f, d, f_out, d_out, f.numel(), _L(f))
    return f_out, d_out


def update_backward(g_f, g_d, gates, o, f):
    d_gates = torch.empty_like(gates)
    d_o, d_f, d_d = torch.empty_like(f), torch.empty_like(f), torch.empty_like(f)
    launch(_update_bwd_kernel, f.numel(), g_f, g_d, gates, o, f, d_gates, d_o, d_f, d_d, f.numel(), _L(f))
    return d_gates, d_o, d_f, d_d
