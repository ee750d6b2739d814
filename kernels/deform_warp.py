"""Deformable warp in Triton (vpfast.ops.deform_warp's triton backend).

Same arithmetic as csrc/common/deform_warp.h: sampling kernels over (image, neighbour, pixel block) that
loop over channels, writing the column buffer; the contractions are torch matmuls. The backward kernel
also scatters the input gradient with atomic adds (order-dependent on a GPU, so not bitwise deterministic
there).

Arithmetic in ACC (float32, float64 for float64 inputs): loads are widened before use, so sample positions
and corner weights of bf16/fp16 offsets are never rounded to 16 bits, and channel sums accumulate in ACC.
The forward column buffer and grad_col are in the input dtype (operands of matmuls that accumulate in
float, as a convolution under autocast). The backward kernel writes the weight gradient's column buffer in
ACC, laid out [C*k², B, H*W], so that the weight gradient is one ACC matmul over every image and pixel
(deterministic, no per-image rounding), and scatters the input gradient into an ACC buffer; both are cast
to the input dtype once. Grids are one axis of B * k² * cdiv(H*W, BLOCK) programs (a second axis would be
limited to 65535); plane offsets are 64-bit, offsets within a plane 32-bit (H*W < 2^31 is checked).
"""
import torch
import triton
import triton.language as tl

BLOCK = 128


def acc_dtype(dtype: torch.dtype):
    """The Triton arithmetic type for inputs of `dtype`: float64 stays float64, everything else is float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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
def _program(N, HW, BLOCK: tl.constexpr):
    # (image, neighbour, pixels) of this program: one grid axis, images outer, pixel blocks inner
    pid = tl.program_id(0)
    nblk = tl.cdiv(HW, BLOCK)
    bn = pid // nblk
    b = bn // N
    n = bn - b * N
    p = (pid - bn * nblk) * BLOCK + tl.arange(0, BLOCK)
    return b, n, p, p < HW


@triton.jit
def _geometry(off, b, n, p, ok, H, W, N, K: tl.constexpr, ACC: tl.constexpr):
    HW = H * W
    h = p // W
    w = p - h * W
    half = K // 2
    ny = n // K - half
    nx = n % K - half
    ob = off + (b * 2 * N + n).to(tl.int64) * HW
    oy = tl.load(ob + p, mask=ok, other=0.0).to(ACC)
    ox = tl.load(ob + N * HW + p, mask=ok, other=0.0).to(ACC)
    return _corners(h.to(ACC) + ny + oy, w.to(ACC) + nx + ox, H, W, True)


@triton.jit
def _im2col_kernel(x, off, mask, col, C, H, W, N, K: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    HW = H * W
    b, n, p, ok = _program(N, HW, BLOCK)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _geometry(off, b, n, p, ok, H, W, N, K, ACC)
    m = tl.load(mask + (b * N + n).to(tl.int64) * HW + p, mask=ok, other=0.0).to(ACC)
    a0 = m * (1 - ly) * vy0
    a1 = m * ly * vy1
    b0 = (1 - lx) * vx0
    b1 = lx * vx1
    for c in range(C):
        xc = x + (b * C + c).to(tl.int64) * HW
        v = (a0 * b0 * tl.load(xc + r0 + c0, mask=ok, other=0.0).to(ACC)
             + a0 * b1 * tl.load(xc + r0 + c1, mask=ok, other=0.0).to(ACC)
             + a1 * b0 * tl.load(xc + r1 + c0, mask=ok, other=0.0).to(ACC)
             + a1 * b1 * tl.load(xc + r1 + c1, mask=ok, other=0.0).to(ACC))
        tl.store(col + ((b * C + c) * N + n).to(tl.int64) * HW + p, v.to(col.dtype.element_ty), mask=ok)


@triton.jit
def _tap_loads(xc, r0, r1, c0, c1, m00, m01, m10, m11, ok, ACC: tl.constexpr):
    # the four bilinear neighbours of each position in plane xc, times their in-bounds masks (shared with
    # kernels/flow_warp.py, whose backward walks the planes the same way)
    return (m00 * tl.load(xc + r0 + c0, mask=ok, other=0.0).to(ACC),
            m01 * tl.load(xc + r0 + c1, mask=ok, other=0.0).to(ACC),
            m10 * tl.load(xc + r1 + c0, mask=ok, other=0.0).to(ACC),
            m11 * tl.load(xc + r1 + c1, mask=ok, other=0.0).to(ACC))


@triton.jit
def _tap_scatter(gxc, r0, r1, c0, c1, gv, hy, hx, ly, lx, m00, m01, m10, m11, ok):
    # the input gradient of the four neighbours: several positions may sample the same pixel, hence atomics
    tl.atomic_add(gxc + r0 + c0, gv * hy * hx * m00, mask=ok)
    tl.atomic_add(gxc + r0 + c1, gv * hy * lx * m01, mask=ok)
    tl.atomic_add(gxc + r1 + c0, gv * ly * hx * m10, mask=ok)
    tl.atomic_add(gxc + r1 + c1, gv * ly * lx * m11, mask=ok)


@triton.jit
def _backward_kernel(x, off, mask, gcol, col, g_off, g_mask, gx, B, C, H, W, N, K: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    # col ([C*N, B, HW]) and gx are ACC buffers; gcol is [B, C*N, HW] in the input dtype
    HW = H * W
    b, n, p, ok = _program(N, HW, BLOCK)
    r0, r1, c0, c1, vy0, vy1, vx0, vx1, ly, lx = _geometry(off, b, n, p, ok, H, W, N, K, ACC)
    m = tl.load(mask + (b * N + n).to(tl.int64) * HW + p, mask=ok, other=0.0).to(ACC)
    hy = 1 - ly
    hx = 1 - lx
    m00, m01, m10, m11 = vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1
    am = tl.zeros_like(m)
    ay = tl.zeros_like(m)
    ax = tl.zeros_like(m)
    for c in range(C):
        plane = (b * C + c).to(tl.int64) * HW
        xc = x + plane
        u00, u01, u10, u11 = _tap_loads(xc, r0, r1, c0, c1, m00, m01, m10, m11, ok, ACC)
        top = hx * u00 + lx * u01
        bot = hx * u10 + lx * u11
        s = hy * top + ly * bot
        cn = c * N + n
        tl.store(col + (cn.to(tl.int64) * B + b) * HW + p, m * s, mask=ok)
        g = tl.load(gcol + (b * C * N + cn).to(tl.int64) * HW + p, mask=ok, other=0.0).to(ACC)
        am += g * s
        ay += g * (bot - top)
        ax += g * (hy * (u01 - u00) + ly * (u11 - u10))
        gxc = gx + plane
        _tap_scatter(gxc, r0, r1, c0, c1, g * m, hy, hx, ly, lx, m00, m01, m10, m11, ok)
    tl.store(g_mask + (b * N + n).to(tl.int64) * HW + p, am.to(g_mask.dtype.element_ty), mask=ok)
    gob = g_off + (b * 2 * N + n).to(tl.int64) * HW
    tl.store(gob + p, (m * ay).to(g_off.dtype.element_ty), mask=ok)
    tl.store(gob + N * HW + p, (m * ax).to(g_off.dtype.element_ty), mask=ok)


def _shape(x, weight):
    B, C, H, W = x.shape
    O, _, k, _ = weight.shape
    return B, C, H, W, O, k, k * k


def _grid(B, N, H, W):
    return (B * N * triton.cdiv(H * W, BLOCK),)


def forward(x, offset, mask, weight):
    B, C, H, W, O, k, N = _shape(x, weight)
    col = x.new_empty((B, C * N, H * W))
    if col.numel():
        _im2col_kernel[_grid(B, N, H, W)](x, offset, mask, col, C, H, W, N, K=k, ACC=acc_dtype(x.dtype), BLOCK=BLOCK)
    elif B * H * W:
        col.zero_()
    return torch.matmul(weight.reshape(O, C * N), col).reshape(B, O, H, W)


def backward(grad, x, offset, mask, weight):
    B, C, H, W, O, k, N = _shape(x, weight)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wm = weight.reshape(O, C * N)
    gcol = torch.matmul(wm.t(), grad.reshape(B, O, H * W))  # [B, C*N, HW]
    col = torch.empty((C * N, B, H * W), dtype=acc, device=x.device)  # every entry written
    g_off, g_mask = torch.zeros_like(offset), torch.zeros_like(mask)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    if gcol.numel():
        _backward_kernel[_grid(B, N, H, W)](x, offset, mask, gcol, col, g_off, g_mask, gx, B, C, H, W, N, K=k,
                                            ACC=acc_dtype(x.dtype), BLOCK=BLOCK)
    # one matmul over every image and pixel, in ACC: [O, B*HW] x [B*HW, C*N]
    g2 = grad.reshape(B, O, H * W).transpose(0, 1).reshape(O, B * H * W).to(acc)
    gw = torch.matmul(g2, col.reshape(C * N, B * H * W).t())
    return gx.to(x.dtype), g_off, g_mask, gw.reshape(weight.shape).to(x.dtype)
