"""Triton kernels for depthwise convolution (vpfast/ops/depthwise_conv2d.py wraps them in custom ops).

Forward and input gradient: one program per (plane, block of output/input pixels), looping over the taps
with masked loads (zero padding). Weight and bias gradients: one program per (channel, tap) that sweeps the
batch in fixed-size blocks and reduces once at the end, so the result does not depend on scheduling
(deterministic, no atomics).

Grids are one-dimensional (planes x pixel blocks, channels x taps): a grid's y and z extents are limited to
65535, and B*C alone reaches 65536 in TAU's MixMlp. Plane offsets are 64-bit; offsets inside one plane stay
32-bit, so the op's check (vpfast/ops/depthwise_conv2d.py) refuses planes of 2^31 elements or more. Half and bfloat16 tensors are loaded as
float32 (float64 stays float64) and every accumulator has that type (ACC); results are stored in the
output's dtype.
"""
import torch
import triton
import triton.language as tl

BLOCK = 128  # vpfast/ops/depthwise_conv2d.py's check counts programs with it


def acc_type(dtype: torch.dtype):
    """The accumulation type of the kernels for tensors of `dtype`."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw, NBLK,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    plane = (pid // NBLK).to(tl.int64)
    c = plane % C
    offs = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    m = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    x_plane = x_ptr + plane * H * W
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(KH):
        h = oh * sh - ph + i * dh
        for j in range(KW):
            w_ = ow * sw - pw + j * dw
            ok = m & (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W)
            xv = tl.load(x_plane + h * W + w_, mask=ok, other=0.0).to(ACC)
            acc += xv * tl.load(w_ptr + c * KH * KW + i * KW + j).to(ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(ACC)
    tl.store(out_ptr + plane * Ho * Wo + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _input_grad_kernel(g_ptr, w_ptr, gx_ptr, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw, NBLK,
                       KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    plane = (pid // NBLK).to(tl.int64)
    c = plane % C
    offs = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H * W
    h = offs // W
    w_ = offs % W
    g_plane = g_ptr + plane * Ho * Wo
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(KH):
        th = h + ph - i * dh  # = oh * sh when output row oh reads input row h through tap row i
        oh = th // sh
        okh = (th >= 0) & (th - oh * sh == 0) & (oh < Ho)
        for j in range(KW):
            tw = w_ + pw - j * dw
            ow = tw // sw
            ok = m & okh & (tw >= 0) & (tw - ow * sw == 0) & (ow < Wo)
            gv = tl.load(g_plane + oh * Wo + ow, mask=ok, other=0.0).to(ACC)
            acc += gv * tl.load(w_ptr + c * KH * KW + i * KW + j).to(ACC)
    tl.store(gx_ptr + plane * H * W + offs, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _param_grad_kernel(g_ptr, x_ptr, gw_ptr, gb_ptr, N, C, H, W, Ho, Wo, sh, sw, ph, pw, dh, dw,
                       KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # program c * (KH*KW + 1) + k: k < KH*KW is weight tap k, k == KH*KW the bias. N = B*Ho*Wo comes from the
    # host (64-bit there when it needs to be; the product of 32-bit arguments would wrap here).
    pid = tl.program_id(0)
    c = pid // (KH * KW + 1)
    k = pid % (KH * KW + 1)
    i = k // KW
    j = k % KW
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        e = start + tl.arange(0, BLOCK)
        m = e < N
        b = e // (Ho * Wo)
        q = e % (Ho * Wo)
        oh = q // Wo
        ow = q % Wo
        plane = b.to(tl.int64) * C + c
        gv = tl.load(g_ptr + plane * Ho * Wo + q, mask=m, other=0.0).to(ACC)
        h = oh * sh - ph + i * dh
        w_ = ow * sw - pw + j * dw
        ok = m & (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W) & (k < KH * KW)
        xv = tl.load(x_ptr + plane * H * W + h * W + w_, mask=ok, other=0.0).to(ACC)
        acc += tl.where(k < KH * KW, gv * xv, gv)
    total = tl.sum(acc, axis=0)
    if k < KH * KW:
        tl.store(gw_ptr + c * KH * KW + k, total.to(gw_ptr.dtype.element_ty))
    else:
        tl.store(gb_ptr + c, total.to(gb_ptr.dtype.element_ty))


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def forward(x, weight, bias, stride, padding, dilation):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2:]
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    out = torch.empty((B, C, Ho, Wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    nblk = triton.cdiv(Ho * Wo, BLOCK)
    _forward_kernel[(B * C * nblk,)](x, weight, bias if bias is not None else x, out, C, H, W, Ho, Wo, *stride,
                                     *padding, *dilation, nblk, KH=KH, KW=KW, HAS_BIAS=bias is not None,
                                     ACC=acc_type(x.dtype), BLOCK=BLOCK)
    return out


def backward(grad, x, weight, stride, padding, dilation, output_mask):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2:]
    Ho, Wo = grad.shape[2:]
    acc = acc_type(x.dtype)
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    gw = torch.zeros_like(weight) if output_mask[1] else x.new_empty((0,))
    gb = x.new_zeros((C,)) if output_mask[2] else x.new_empty((0,))
    if output_mask[0] and gx.numel() > 0:
        nblk = triton.cdiv(H * W, BLOCK)
        _input_grad_kernel[(B * C * nblk,)](grad, weight, gx, C, H, W, Ho, Wo, *stride, *padding, *dilation, nblk,
                                            KH=KH, KW=KW, ACC=acc, BLOCK=BLOCK)
    if (output_mask[1] or output_mask[2]) and B * C > 0:  # with B == 0 the gradients stay zero
        gw_buf = gw if output_mask[1] else x.new_empty(weight.shape)
        gb_buf = gb if output_mask[2] else x.new_empty((C,))
        _param_grad_kernel[(C * (KH * KW + 1),)](grad, x, gw_buf, gb_buf, B * Ho * Wo, C, H, W, Ho, Wo, *stride,
                                                 *padding, *dilation, KH=KH, KW=KW, ACC=acc, BLOCK=BLOCK)
    return gx, gw, gb
