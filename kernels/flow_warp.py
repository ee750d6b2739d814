"""Flow warp in Triton (vpfast.ops.flow_warp's triton backend): programs over (image, pixel block) that loop
over channels; the geometry is kernels/deform_warp.py's _corners, as csrc/common/flow_warp.h. The input
gradient is scattered with atomic adds (order-dependent on a GPU).

Arithmetic in ACC (float32, float64 for float64 inputs): loads are widened before use, so positions and
corner weights of a bf16/fp16 flow are never rounded to 16 bits, channel sums accumulate in ACC, and the
input gradient is scattered into an ACC buffer (16-bit atomics would round every partial sum) that is cast
to the input dtype once. The grid is one axis of B * cdiv(H*W, BLOCK) programs (a second axis would be
limited to 65535); plane offsets are 64-bit, offsets within a plane 32-bit (H*W < 2^31 is checked).
"""
import torch
import triton
import triton.language as tl

from .deform_warp import _corners, _tap_loads, _tap_scatter, acc_dtype

BLOCK = 128


@triton.jit
def _coord(base, f, size, BORDER: tl.constexpr, ALIGN: tl.constexpr):
    p = base + f
    g = tl.full(f.shape, 1.0, f.dtype)
    if ALIGN:
        fixed = size == 1
        p = tl.where(fixed, 0.0, p)
        g = tl.where(fixed, 0.0, g)
    if BORDER:
        hi = size - 1.0
        g = tl.where((p > 0.0) & (p < hi), g, 0.0)
        p = tl.minimum(tl.maximum(p, 0.0), hi)
    return p, g


@triton.jit
def _program(HW, BLOCK: tl.constexpr):
    # (image, pixels) of this program: one grid axis, images outer
    pid = tl.program_id(0)
    nblk = tl.cdiv(HW, BLOCK)
    b = pid // nblk
    p = (pid - b * nblk) * BLOCK + tl.arange(0, BLOCK)
    return b, p, p < HW


@triton.jit
def _geometry(flow, b, p, ok, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    HW = H * W
    h = p // W
    w = p - h * W
    fb = flow + b.to(tl.int64) * 2 * HW
    fx = tl.load(fb + p, mask=ok, other=0.0).to(ACC)
    fy = tl.load(fb + HW + p, mask=ok, other=0.0).to(ACC)
    py, dfy = _coord(h.to(ACC), fy, H, BORDER, ALIGN)
    px, dfx = _coord(w.to(ACC), fx, W, BORDER, ALIGN)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _corners(py, px, H, W, False)
    return r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx


@triton.jit
def _forward_kernel(x, flow, out, C, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    HW = H * W
    b, p, ok = _program(HW, BLOCK)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx = _geometry(flow, b, p, ok, H, W, BORDER, ALIGN, ACC)
    a0 = (1 - ly) * vy0
    a1 = ly * vy1
    b0 = (1 - lx) * vx0
    b1 = lx * vx1
    for c in range(C):
        plane = (b * C + c).to(tl.int64) * HW
        xc = x + plane
        v = (a0 * b0 * tl.load(xc + r0 + c0, mask=ok, other=0.0).to(ACC)
             + a0 * b1 * tl.load(xc + r0 + c1, mask=ok, other=0.0).to(ACC)
             + a1 * b0 * tl.load(xc + r1 + c0, mask=ok, other=0.0).to(ACC)
             + a1 * b1 * tl.load(xc + r1 + c1, mask=ok, other=0.0).to(ACC))
        tl.store(out + plane + p, v.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(x, flow, g, gx, gflow, C, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    # gx: the ACC accumulation buffer of the input gradient
    HW = H * W
    b, p, ok = _program(HW, BLOCK)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx = _geometry(flow, b, p, ok, H, W, BORDER, ALIGN, ACC)
    hy = 1 - ly
    hx = 1 - lx
    m00, m01, m10, m11 = vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1
    ay = tl.zeros_like(ly)
    ax = tl.zeros_like(ly)
    for c in range(C):
        plane = (b * C + c).to(tl.int64) * HW
        xc = x + plane
        u00, u01, u10, u11 = _tap_loads(xc, r0, r1, c0, c1, m00, m01, m10, m11, ok, ACC)
        gv = tl.load(g + plane + p, mask=ok, other=0.0).to(ACC)
        ay += gv * ((hx * u10 + lx * u11) - (hx * u00 + lx * u01))
        ax += gv * (hy * (u01 - u00) + ly * (u11 - u10))
        gxc = gx + plane
        _tap_scatter(gxc, r0, r1, c0, c1, gv, hy, hx, ly, lx, m00, m01, m10, m11, ok)
    fb = gflow + b.to(tl.int64) * 2 * HW
    tl.store(fb + p, (dfx * ax).to(gflow.dtype.element_ty), mask=ok)
    tl.store(fb + HW + p, (dfy * ay).to(gflow.dtype.element_ty), mask=ok)


def forward(x, flow, border, align_corners):
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    if out.numel():
        _forward_kernel[(B * triton.cdiv(H * W, BLOCK),)](x, flow, out, C, H, W, BORDER=border, ALIGN=align_corners,
                                                           ACC=acc_dtype(x.dtype), BLOCK=BLOCK)
    return out


def backward(grad, x, flow, border, align_corners):
    B, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx, gflow = torch.zeros(x.shape, dtype=acc, device=x.device), torch.zeros_like(flow)
    if x.numel():
        _backward_kernel[(B * triton.cdiv(H * W, BLOCK),)](x, flow, grad, gx, gflow, C, H, W, BORDER=border,
                                                            ALIGN=align_corners, ACC=acc_dtype(x.dtype), BLOCK=BLOCK)
    return gx.to(x.dtype), gflow
