"""GroupNorm + SiLU in Triton: one program per (sample, group) for the forward and the backward pass.

Same decomposition as csrc/common/group_norm_silu.h. The group slice is addressed through strides, so
NCHW-contiguous and 4-D channels_last inputs are read in place. Statistics: two sweeps (mean, then the
centred sum of squares). Backward: per-channel sums of dL/da and dL/da * xhat (dL/da parked in grad_x), then
grad_x in a second sweep; the per-(sample, channel) partials are summed over the batch by torch (in order).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _split(e, Cg, HW, CL: tl.constexpr):
    # the e-th element of a group slice -> (channel within the group, pixel)
    if CL:
        return e % Cg, e // Cg
    else:
        return e // HW, e % HW


@triton.jit
def _forward_kernel(X, W, B, Y, MEAN, RSTD, C, HW, G, sN, sC, sP, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    CL: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = t // G
    g = t % G
    Cg = C // G
    M = Cg * HW
    base = n * sN + g * Cg * sC
    acc = tl.zeros([BLOCK], X.dtype.element_ty)
    for start in range(0, M, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < M
        cl, p = _split(e, Cg, HW, CL)
        acc += tl.load(X + base + cl * sC + p * sP, mask=ok, other=0)
    mean = tl.sum(acc, 0) / M
    acc = tl.zeros([BLOCK], X.dtype.element_ty)
    for start in range(0, M, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < M
        cl, p = _split(e, Cg, HW, CL)
        d = tl.where(ok, tl.load(X + base + cl * sC + p * sP, mask=ok, other=0) - mean, 0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / M + eps)
    tl.store(MEAN + t, mean)
    tl.store(RSTD + t, rstd)
    for start in range(0, M, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < M
        cl, p = _split(e, Cg, HW, CL)
        off = base + cl * sC + p * sP
        a = (tl.load(X + off, mask=ok, other=0) - mean) * rstd
        if HAS_W:
            a = a * tl.load(W + g * Cg + cl, mask=ok, other=1)
        if HAS_B:
            a = a + tl.load(B + g * Cg + cl, mask=ok, other=0)
        tl.store(Y + off, a * tl.sigmoid(a), mask=ok)


@triton.jit
def _backward_kernel(GR, X, W, B, MEAN, RSTD, GX, PA, PB, C, HW, G, sN, sC, sP, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = t // G
    g = t % G
    Cg = C // G
    M = Cg * HW
    base = n * sN + g * Cg * sC
    mean = tl.load(MEAN + t)
    rstd = tl.load(RSTD + t)
    zero = tl.sum(tl.zeros([BLOCK], X.dtype.element_ty), 0)
    S1 = zero
    S2 = zero
    for cl in range(0, Cg):
        c = g * Cg + cl
        rw = rstd
        if HAS_W:
            rw = rstd * tl.load(W + c)
        bc = zero
        if HAS_B:
            bc = tl.load(B + c)
        sa = tl.zeros([BLOCK], X.dtype.element_ty)
        sb = tl.zeros([BLOCK], X.dtype.element_ty)
        for start in range(0, HW, BLOCK):
            p = start + tl.arange(0, BLOCK)
            ok = p < HW
            off = base + cl * sC + p * sP
            xc = tl.load(X + off, mask=ok, other=0) - mean
            a = xc * rw + bc
            s = tl.sigmoid(a)
            dy = tl.where(ok, tl.load(GR + off, mask=ok, other=0) * s * (1 + a * (1 - s)), 0)
            tl.store(GX + off, dy, mask=ok)
            sa += dy
            sb += dy * xc
        A = tl.sum(sa, 0)
        Bs = tl.sum(sb, 0) * rstd
        tl.store(PA + n * C + c, A.to(tl.float64))
        tl.store(PB + n * C + c, Bs.to(tl.float64))
        if HAS_W:
            wc = tl.load(W + c)
            S1 += wc * A
            S2 += wc * Bs
        else:
            S1 += A
            S2 += Bs
    if NEED_X:
        tl.debug_barrier()  # grad_x holds dL/da written by other threads of this program
        cx = -rstd * rstd * S2 / M
        c0 = -rstd * S1 / M
        for start in range(0, M, BLOCK):
            e = start + tl.arange(0, BLOCK)
            ok = e < M
            cl, p = e // HW, e % HW
            off = base + cl * sC + p * sP
            cdy = rstd
            if HAS_W:
                cdy = rstd * tl.load(W + g * Cg + cl, mask=ok, other=1)
            dy = tl.load(GX + off, mask=ok, other=0)
            xc = tl.load(X + off, mask=ok, other=0) - mean
            tl.store(GX + off, dy * cdy + xc * cx + c0, mask=ok)


def _layout(x: torch.Tensor):
    """(tensor to read, channels_last?, strides (sN, sC, sP) of [N, C, HW]) as in the compiled kernels."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not cl:
        x = x.contiguous()
    C = x.shape[1]
    return x, cl, (x.stride(0), 1 if cl else x[0, 0].numel(), C if cl else 1)


def _block(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 16)))


def forward(x, groups: int, weight, bias, eps: float):
    """x: Tensor[N, C, *] -> (y: like x, mean: Tensor[N, groups], rstd: Tensor[N, groups])"""
    x, cl, (sN, sC, sP) = _layout(x)
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    y = torch.empty_like(x)
    mean = x.new_empty((N, groups))
    rstd = x.new_empty((N, groups))
    if N:
        _forward_kernel[(N * groups,)](
            x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd, C, HW, groups,
            sN, sC, sP, eps, HAS_W=weight is not None, HAS_B=bias is not None, CL=cl,
            BLOCK=_block(C // groups * HW))
    return y, mean, rstd


def backward(grad, x, weight, bias, mean, rstd, groups: int, output_mask):
    """-> (grad_x, grad_weight, grad_bias); entries not asked for by output_mask (or without a parameter) empty"""
    x, cl, (sN, sC, sP) = _layout(x)
    grad = grad.contiguous(memory_format=torch.channels_last) if cl else grad.contiguous()
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    gx = torch.empty_like(x)
    pa = x.new_zeros((N, C), dtype=torch.float64)
    pb = x.new_zeros((N, C), dtype=torch.float64)
    if N:
        _backward_kernel[(N * groups,)](
            grad, x, weight if weight is not None else x, bias if bias is not None else x, mean.contiguous(),
            rstd.contiguous(), gx, pa, pb, C, HW, groups, sN, sC, sP, HAS_W=weight is not None,
            HAS_B=bias is not None, NEED_X=bool(output_mask[0]), BLOCK=_block(HW))
    gw = pb.sum(0).to(x.dtype) if output_mask[1] and weight is not None else x.new_empty((0,))
    gb = pa.sum(0).to(x.dtype) if output_mask[2] and bias is not None else x.new_empty((0,))
    return (gx if output_mask[0] else x.new_empty((0,))), gw, gb
