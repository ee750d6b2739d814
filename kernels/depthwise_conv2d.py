"""Triton kernels for depthwise convolution (vpfast/ops/depthwise_conv2d.py wraps them in custom ops).

Forward and input gradient: one program per (plane, block of output/input pixels), looping over the taps
with masked loads (zero padding). Weight and bias gradients: one program per (channel, tap) that sweeps the
batch in fixed-size blocks and reduces once at the end, so the result does not depend on scheduling
(deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for i in range(KH):
        h = oh * sh - ph + i * dh
        for j in range(KW):
            w_ = ow * sw - pw + j * dw
            ok = m & (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W)
            xv = tl.load(x_ptr + plane * H * W + h * W + w_, mask=ok, other=0.0)
            acc += xv * tl.load(w_ptr + c * KH * KW + i * KW + j)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c)
    tl.store(out_ptr + plane * Ho * Wo + offs, acc, mask=m)


@triton.jit
def _input_grad_kernel(g_ptr, w_ptr, gx_ptr, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw,
                       KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H * W
    h = offs // W
    w_ = offs % W
    acc = tl.zeros([BLOCK], dtype=gx_ptr.dtype.element_ty)
    for i in range(KH):
        th = h + ph - i * dh  # = oh * sh when output row oh reads input row h through tap row i
        oh = th // sh
        okh = (th >= 0) & (th - oh * sh == 0) & (oh < Ho)
        for j in range(KW):
            tw = w_ + pw - j * dw
            ow = tw // sw
            ok = m & okh & (tw >= 0) & (tw - ow * sw == 0) & (ow < Wo)
            gv = tl.load(g_ptr + plane * Ho * Wo + oh * Wo + ow, mask=ok, other=0.0)
            acc += gv * tl.load(w_ptr + c * KH * KW + i * KW + j)
    tl.store(gx_ptr + plane * H * W + offs, acc, mask=m)


@triton.jit
def _param_grad_kernel(g_ptr, x_ptr, gw_ptr, gb_ptr, B, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw,
                       KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    # program (c, k): k < KH*KW is weight tap k, k == KH*KW the bias
    c = tl.program_id(0)
    k = tl.program_id(1)
    i = k // KW
    j = k % KW
    n = B * Ho * Wo
    acc = tl.zeros([BLOCK], dtype=gw_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        e = start + tl.arange(0, BLOCK)
        m = e < n
        b = e // (Ho * Wo)
        q = e % (Ho * Wo)
        oh = q // Wo
        ow = q % Wo
        gv = tl.load(g_ptr + (b * C + c) * Ho * Wo + q, mask=m, other=0.0)
        h = oh * sh - ph + i * dh
        w_ = ow * sw - pw + j * dw
        ok = m & (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W) & (k < KH * KW)
        xv = tl.load(x_ptr + ((b * C + c) * H + h) * W + w_, mask=ok, other=0.0)
        acc += tl.where(k < KH * KW, gv * xv, gv)
    total = tl.sum(acc, axis=0)
    if k < KH * KW:
        tl.store(gw_ptr + c * KH * KW + k, total)
    else:
        tl.store(gb_ptr + c, total)


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def forward(x, weight, bias, stride, padding, dilation):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2:]
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    out = torch.empty((B, C, Ho, Wo), device=x.device, dtype=x.dtype)
    grid = (B * C, triton.cdiv(Ho * Wo, BLOCK))
    _forward_kernel[grid](x, weight, bias if bias is not None else x, out, C, H, W, Ho, Wo, *stride, *padding,
                          *dilation, KH=KH, KW=KW, HAS_BIAS=bias is not None, BLOCK=BLOCK)
    return out


def backward(grad, x, weight, stride, padding, dilation, output_mask):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2:]
    Ho, Wo = grad.shape[2:]
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight) if output_mask[1] else x.new_empty((0,))
    gb = x.new_empty((C,)) if output_mask[2] else x.new_empty((0,))
    if output_mask[0]:
        _input_grad_kernel[(B * C, triton.cdiv(H * W, BLOCK))](grad, weight, gx, C, H, W, Ho, Wo, *stride,
                                                               *padding, *dilation, KH=KH, KW=KW, BLOCK=BLOCK)
    if output_mask[1] or output_mask[2]:
        gw_buf = gw if output_mask[1] else x.new_empty(weight.shape)
        gb_buf = gb if output_mask[2] else x.new_empty((C,))
        _param_grad_kernel[(C, KH * KW + 1)](grad, x, gw_buf, gb_buf, B, C, H, W, Ho, Wo, *stride, *padding,
                                            *dilation, KH=KH, KW=KW, BLOCK=BLOCK)
    return gx, gw, gb
