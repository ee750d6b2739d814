"""Flow warp in Triton (vpfast.ops.flow_warp's triton backend): programs over (image, pixel block) that loop
over channels; the geometry is kernels/deform_warp.py's _corners, as csrc/common/flow_warp.h. The input
gradient is scattered with atomic adds (order-dependent on a GPU)."""
import torch
import triton
import triton.language as tl

from .deform_warp import _corners

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
def _geometry(flow, b, p, ok, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr):
    HW = H * W
    h = p // W
    w = p - h * W
    fx = tl.load(flow + b * 2 * HW + p, mask=ok, other=0.0)
    fy = tl.load(flow + b * 2 * HW + HW + p, mask=ok, other=0.0)
    py, dfy = _coord(h.to(fy.dtype), fy, H, BORDER, ALIGN)
    px, dfx = _coord(w.to(fx.dtype), fx, W, BORDER, ALIGN)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _corners(py, px, H, W, False)
    return r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx


@triton.jit
def _forward_kernel(x, flow, out, C, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    HW = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < HW
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx = _geometry(flow, b, p, ok, H, W, BORDER, ALIGN)
    a0 = (1 - ly) * vy0
    a1 = ly * vy1
    b0 = (1 - lx) * vx0
    b1 = lx * vx1
    for c in range(C):
        xc = x + (b * C + c) * HW
        v = (a0 * b0 * tl.load(xc + r0 + c0, mask=ok, other=0.0) + a0 * b1 * tl.load(xc + r0 + c1, mask=ok, other=0.0)
             + a1 * b0 * tl.load(xc + r1 + c0, mask=ok, other=0.0) + a1 * b1 * tl.load(xc + r1 + c1, mask=ok, other=0.0))
        tl.store(out + (b * C + c) * HW + p, v, mask=ok)


@triton.jit
def _backward_kernel(x, flow, g, gx, gflow, C, H, W, BORDER: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = tl.program_id(0)
    HW = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < HW
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx, dfy, dfx = _geometry(flow, b, p, ok, H, W, BORDER, ALIGN)
    hy = 1 - ly
    hx = 1 - lx
    m00 = vy0 * vx0
    m01 = vy0 * vx1
    m10 = vy1 * vx0
    m11 = vy1 * vx1
    ay = tl.zeros_like(ly)
    ax = tl.zeros_like(ly)
    for c in range(C):
        xc = x + (b * C + c) * HW
        u00 = m00 * tl.load(xc + r0 + c0, mask=ok, other=0.0)
        u01 = m01 * tl.load(xc + r0 + c1, mask=ok, other=0.0)
        u10 = m10 * tl.load(xc + r1 + c0, mask=ok, other=0.0)
        u11 = m11 * tl.load(xc + r1 + c1, mask=ok, other=0.0)
        gv = tl.load(g + (b * C + c) * HW + p, mask=ok, other=0.0)
        ay += gv * ((hx * u10 + lx * u11) - (hx * u00 + lx * u01))
        ax += gv * (hy * (u01 - u00) + ly * (u11 - u10))
        gxc = gx + (b * C + c) * HW
        tl.atomic_add(gxc + r0 + c0, gv * hy * hx * m00, mask=ok)
        tl.atomic_add(gxc + r0 + c1, gv * hy * lx * m01, mask=ok)
        tl.atomic_add(gxc + r1 + c0, gv * ly * hx * m10, mask=ok)
        tl.atomic_add(gxc + r1 + c1, gv * ly * lx * m11, mask=ok)
    tl.store(gflow + b * 2 * HW + p, dfx * ax, mask=ok)
    tl.store(gflow + b * 2 * HW + HW + p, dfy * ay, mask=ok)


def forward(x, flow, border, align_corners):
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    if out.numel():
        _forward_kernel[(B, triton.cdiv(H * W, BLOCK))](x, flow, out, C, H, W, BORDER=border, ALIGN=align_corners,
                                                        BLOCK=BLOCK)
    return out


def backward(grad, x, flow, border, align_corners):
    B, C, H, W = x.shape
    gx, gflow = torch.zeros_like(x), torch.zeros_like(flow)
    if x.numel():
        _backward_kernel[(B, triton.cdiv(H * W, BLOCK))](x, flow, grad, gx, gflow, C, H, W, BORDER=border,
                                                         ALIGN=align_corners, BLOCK=BLOCK)
    return gx, gflow
