"""Deformable warp in Triton (vpfast.ops.deform_warp's triton backend).

Same arithmetic as csrc/common/deform_warp.h: sampling kernels over (image, neighbour, pixel block) that
loop over channels, writing the column buffer; the contractions are torch matmuls. The backward kernel
also scatters the input gradient with atomic adds (order-dependent on a GPU, so not bitwise deterministic
there).
"""
import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _corners(y, x, H, W, THUML_EDGE: tl.constexpr):
    # beyond one pixel outside the map every corner is outside: clamping there changes nothing
    y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
    x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)
    fy = tl.floor(y)
    fx = tl.floor(x)
    ly = y - fy
    lx = x - fx
    y0 = fy.to(tl.int32)
    x0 = fx.to(tl.int32)
    vy0 = ((y0 >= 0) & (y0 < H)).to(y.dtype)
    vx0 = ((x0 >= 0) & (x0 < W)).to(y.dtype)
    if THUML_EDGE:
        vy1 = ((y > -1.0) & (y0 + 1 < H)).to(y.dtype)
        vx1 = ((x > -1.0) & (x0 + 1 < W)).to(y.dtype)
    else:
        vy1 = ((y0 + 1 >= 0) & (y0 + 1 < H)).to(y.dtype)
        vx1 = ((x0 + 1 >= 0) & (x0 + 1 < W)).to(y.dtype)
    r0 = tl.minimum(tl.maximum(y0, 0), H - 1) * W
    r1 = tl.minimum(tl.maximum(y0 + 1, 0), H - 1) * W
    c0 = tl.minimum(tl.maximum(x0, 0), W - 1)
    c1 = tl.minimum(tl.maximum(x0 + 1, 0), W - 1)
    return r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx


@triton.jit
def _geometry(off, b, n, p, ok, H, W, N, K: tl.constexpr):
    HW = H * W
    h = p // W
    w = p - h * W
    half = K // 2
    ny = n // K - half
    nx = n % K - half
    oy = tl.load(off + (b * 2 * N + n) * HW + p, mask=ok, other=0.0)
    ox = tl.load(off + (b * 2 * N + N + n) * HW + p, mask=ok, other=0.0)
    return _corners(h.to(oy.dtype) + ny + oy, w.to(ox.dtype) + nx + ox, H, W, True)


@triton.jit
def _im2col_kernel(x, off, mask, col, C, H, W, N, K: tl.constexpr, BLOCK: tl.constexpr):
    bn = tl.program_id(0)
    b = bn // N
    n = bn - b * N
    HW = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < HW
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _geometry(off, b, n, p, ok, H, W, N, K)
    m = tl.load(mask + (b * N + n) * HW + p, mask=ok, other=0.0)
    a0 = m * (1 - ly) * vy0
    a1 = m * ly * vy1
    b0 = (1 - lx) * vx0
    b1 = lx * vx1
    for c in range(C):
        xc = x + (b * C + c) * HW
        v = (a0 * b0 * tl.load(xc + r0 + c0, mask=ok, other=0.0) + a0 * b1 * tl.load(xc + r0 + c1, mask=ok, other=0.0)
             + a1 * b0 * tl.load(xc + r1 + c0, mask=ok, other=0.0) + a1 * b1 * tl.load(xc + r1 + c1, mask=ok, other=0.0))
        tl.store(col + ((b * C + c) * N + n) * HW + p, v, mask=ok)


@triton.jit
def _backward_kernel(x, off, mask, gcol, col, g_off, g_mask, gx, C, H, W, N, K: tl.constexpr, BLOCK: tl.constexpr):
    bn = tl.program_id(0)
    b = bn // N
    n = bn - b * N
    HW = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = p < HW
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _geometry(off, b, n, p, ok, H, W, N, K)
    m = tl.load(mask + (b * N + n) * HW + p, mask=ok, other=0.0)
    hy = 1 - ly
    hx = 1 - lx
    m00 = vy0 * vx0
    m01 = vy0 * vx1
    m10 = vy1 * vx0
    m11 = vy1 * vx1
    am = tl.zeros_like(m)
    ay = tl.zeros_like(m)
    ax = tl.zeros_like(m)
    for c in range(C):
        xc = x + (b * C + c) * HW
        u00 = m00 * tl.load(xc + r0 + c0, mask=ok, other=0.0)
        u01 = m01 * tl.load(xc + r0 + c1, mask=ok, other=0.0)
        u10 = m10 * tl.load(xc + r1 + c0, mask=ok, other=0.0)
        u11 = m11 * tl.load(xc + r1 + c1, mask=ok, other=0.0)
        top = hx * u00 + lx * u01
        bot = hx * u10 + lx * u11
        s = hy * top + ly * bot
        j = ((b * C + c) * N + n) * HW + p
        tl.store(col + j, m * s, mask=ok)
        g = tl.load(gcol + j, mask=ok, other=0.0)
        am += g * s
        ay += g * (bot - top)
        ax += g * (hy * (u01 - u00) + ly * (u11 - u10))
        gxc = gx + (b * C + c) * HW
        gm = g * m
        tl.atomic_add(gxc + r0 + c0, gm * hy * hx * m00, mask=ok)
        tl.atomic_add(gxc + r0 + c1, gm * hy * lx * m01, mask=ok)
        tl.atomic_add(gxc + r1 + c0, gm * ly * hx * m10, mask=ok)
        tl.atomic_add(gxc + r1 + c1, gm * ly * lx * m11, mask=ok)
    tl.store(g_mask + (b * N + n) * HW + p, am, mask=ok)
    tl.store(g_off + (b * 2 * N + n) * HW + p, m * ay, mask=ok)
    tl.store(g_off + (b * 2 * N + N + n) * HW + p, m * ax, mask=ok)


def _shape(x, weight):
    B, C, H, W = x.shape
    O, _, k, _ = weight.shape
    return B, C, H, W, O, k, k * k


def forward(x, offset, mask, weight):
    B, C, H, W, O, k, N = _shape(x, weight)
    col = x.new_empty((B, C * N, H * W))
    if col.numel():
        _im2col_kernel[(B * N, triton.cdiv(H * W, BLOCK))](x, offset, mask, col, C, H, W, N, K=k, BLOCK=BLOCK)
    elif B * H * W:
        col.zero_()
    return torch.matmul(weight.reshape(O, C * N), col).reshape(B, O, H, W)


def backward(grad, x, offset, mask, weight):
    B, C, H, W, O, k, N = _shape(x, weight)
    wm = weight.reshape(O, C * N)
    gcol = torch.matmul(wm.t(), grad.reshape(B, O, H * W))  # [B, C*N, HW]
    col = torch.empty_like(gcol)
    g_off, g_mask, gx = torch.zeros_like(offset), torch.zeros_like(mask), torch.zeros_like(x)
    if gcol.numel():
        _backward_kernel[(B * N, triton.cdiv(H * W, BLOCK))](x, offset, mask, gcol, col, g_off, g_mask, gx, C, H, W,
                                                             N, K=k, BLOCK=BLOCK)
    else:
        col.zero_()
    gw = torch.matmul(grad.reshape(B, O, H * W), col.transpose(1, 2)).sum(0).reshape(weight.shape)
    return gx, g_off, g_mask, gw
