"""GroupNorm + SiLU in Triton: one program per (sample, group) for the forward and the backward pass.

Same arithmetic as csrc/common/group_norm_silu.h. The group slice is addressed through strides, so
NCHW-contiguous and 4-D channels_last inputs are read in place.

Forward: one sweep for the statistics (per-lane Welford, lanes merged with Chan's formula, so neither a
second sweep nor a shift is needed for |mean| >> std), one sweep to normalise and activate. The sweeps walk
the slice in memory order (channel-major for NCHW, pixel-major for channels_last), so loads are coalesced.
Backward: per-channel sums of dL/da and dL/da * xhat over [pixels, channels] tiles (the channel axis whole
within a tile for channels_last, so both layouts read contiguous runs), then grad_x in a second sweep that
recomputes dL/da from grad and x instead of parking it in grad_x (one full-size write less, and dL/da is
never rounded to a half type). The per-(sample, channel) partials are summed over the batch by torch (in
order, float64).

Precision: half inputs are loaded, converted to float32 and computed in float32; float64 stays float64
(ACC). mean/rstd are kept in ACC (float32 for half inputs: rounding the mean to bf16 would shift every xhat).
Python float arguments reach a compiled kernel as float32, so eps travels as a float32 (hi, lo) pair that
float64 kernels add back together.
"""
import torch
import triton
import triton.language as tl

# elements per program and sweep step; 4 warps hold 8 (forward) or 16 (backward tiles) per thread
FORWARD_BLOCK = 1024
BACKWARD_TILE = 2048


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    # a float32 (hi, lo) pair from split_float, summed in ACC
    return (tl.zeros([], ACC) + hi) + lo


@triton.jit
def _split(e, Cg, HW, CL: tl.constexpr):
    # the e-th element of a group slice in memory order -> (channel within the group, pixel)
    if CL:
        return e % Cg, e // Cg
    else:
        return e // HW, e % HW


@triton.jit
def _welford_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    n = n_a + n_b
    frac = tl.where(n == 0, 0.0, n_b / tl.where(n == 0, 1.0, n))
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


@triton.jit
def _forward_kernel(X, W, B, Y, MEAN, RSTD, C, HW, G, sN, sC, sP, eps_hi, eps_lo, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    n = t // G
    g = t % G
    Cg = C // G
    M = Cg * HW
    # int64 base: N * C * HW may pass 2^31; offsets inside one sample stay int32 (the op's check)
    base = n.to(tl.int64) * sN + (g * Cg).to(tl.int64) * sC
    Xg = X + base
    Yg = Y + base
    lane = tl.arange(0, BLOCK)
    run_mean = tl.zeros([BLOCK], ACC)
    run_m2 = tl.zeros([BLOCK], ACC)
    run_n = tl.zeros([BLOCK], ACC)
    steps = tl.zeros([], ACC)
    for start in range(0, M, BLOCK):
        e = start + lane
        ok = e < M
        ch, px = _split(e, Cg, HW, CL)
        v = tl.load(Xg + ch * sC + px * sP, mask=ok, other=0).to(ACC)
        # only the last step is partial, so every active lane has seen `steps` elements
        steps += 1.0
        run_n += ok.to(ACC)
        delta = v - run_mean
        run_mean += tl.where(ok, delta / steps, 0.0)
        run_m2 += tl.where(ok, delta * (v - run_mean), 0.0)
    mean, m2, count = tl.reduce((run_mean, run_m2, run_n), 0, _welford_merge)
    eps = _join(eps_hi, eps_lo, ACC)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + eps)
    tl.store(MEAN + t, mean)
    tl.store(RSTD + t, rstd)
    for start in range(0, M, BLOCK):
        e = start + lane
        ok = e < M
        ch, px = _split(e, Cg, HW, CL)
        off = ch * sC + px * sP
        rw = rstd
        if HAS_W:
            rw = rstd * tl.load(W + g * Cg + ch, mask=ok, other=1).to(ACC)
        a = (tl.load(Xg + off, mask=ok, other=0).to(ACC) - mean) * rw
        if HAS_B:
            a = a + tl.load(B + g * Cg + ch, mask=ok, other=0).to(ACC)
        tl.store(Yg + off, (a * tl.sigmoid(a)).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _silu_grad_tile(GRg, Xg, off, ok, mean, rw, shift, ACC: tl.constexpr):
    # (x - mean, dL/da) of one [pixels, channels] tile; masked elements give dL/da = 0
    xc = tl.load(Xg + off, mask=ok, other=0).to(ACC) - mean
    a = xc * rw[None, :] + shift[None, :]
    s = tl.sigmoid(a)
    dy = tl.load(GRg + off, mask=ok, other=0).to(ACC) * s * (1.0 + a * (1.0 - s))
    return xc, tl.where(ok, dy, 0.0)


@triton.jit
def _backward_kernel(GR, X, W, B, MEAN, RSTD, GX, PA, PB, C, HW, G, sN, sC, sP, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, NEED_X: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    n = t // G
    g = t % G
    Cg = C // G
    M = Cg * HW
    base = n.to(tl.int64) * sN + (g * Cg).to(tl.int64) * sC
    GRg = GR + base
    Xg = X + base
    mean = tl.load(MEAN + t).to(ACC)
    rstd = tl.load(RSTD + t).to(ACC)
    pix = tl.arange(0, BLOCK_P)
    chan = tl.arange(0, BLOCK_C)
    S1 = tl.zeros([], ACC)
    S2 = tl.zeros([], ACC)
    for c_start in range(0, Cg, BLOCK_C):
        cg = c_start + chan
        c_ok = cg < Cg
        wv = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_W:
            wv = tl.load(W + g * Cg + cg, mask=c_ok, other=1).to(ACC)
        bv = tl.zeros([BLOCK_C], ACC)
        if HAS_B:
            bv = tl.load(B + g * Cg + cg, mask=c_ok, other=0).to(ACC)
        rw = rstd * wv
        sum_dy = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        sum_dyx = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for p_start in range(0, HW, BLOCK_P):
            pg = p_start + pix
            ok = (pg < HW)[:, None] & c_ok[None, :]
            off = pg[:, None] * sP + cg[None, :] * sC
            xc, dy = _silu_grad_tile(GRg, Xg, off, ok, mean, rw, bv, ACC)
            sum_dy += dy
            sum_dyx += dy * xc
        A = tl.sum(sum_dy, 0)
        Bw = tl.sum(sum_dyx, 0) * rstd
        tl.store(PA + n * C + g * Cg + cg, A.to(tl.float64), mask=c_ok)
        tl.store(PB + n * C + g * Cg + cg, Bw.to(tl.float64), mask=c_ok)
        S1 += tl.sum(wv * A, 0)
        S2 += tl.sum(wv * Bw, 0)
    if NEED_X:
        # grad_x = dL/da * rstd * w + (x - mean) * cx + c0, the group terms from S1, S2
        cx = -rstd * rstd * S2 / M
        c0 = -rstd * S1 / M
        GXg = GX + base
        for c_start in range(0, Cg, BLOCK_C):
            cg = c_start + chan
            c_ok = cg < Cg
            wv = tl.full([BLOCK_C], 1.0, ACC)
            if HAS_W:
                wv = tl.load(W + g * Cg + cg, mask=c_ok, other=1).to(ACC)
            bv = tl.zeros([BLOCK_C], ACC)
            if HAS_B:
                bv = tl.load(B + g * Cg + cg, mask=c_ok, other=0).to(ACC)
            rw = rstd * wv
            for p_start in range(0, HW, BLOCK_P):
                pg = p_start + pix
                ok = (pg < HW)[:, None] & c_ok[None, :]
                off = pg[:, None] * sP + cg[None, :] * sC
                xc, dy = _silu_grad_tile(GRg, Xg, off, ok, mean, rw, bv, ACC)
                gx = dy * rw[None, :] + xc * cx + c0
                tl.store(GXg + off, gx.to(GX.dtype.element_ty), mask=ok)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (and keep mean/rstd in): float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def split_float(v: float) -> tuple[float, float]:
    """v as a float32 pair (hi, lo) with hi + lo = v to about 2^-48: a Python float reaches a compiled kernel
    as float32, which would round tau or eps in a float64 kernel."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


def _layout(x: torch.Tensor):
    """(tensor to read, channels_last?, strides (sN, sC, sP) of [N, C, HW]) as in the compiled kernels."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not cl:
        x = x.contiguous()
    C = x.shape[1]
    return x, cl, (x.stride(0), 1 if cl else x[0, 0].numel(), C if cl else 1)


def forward_block(M: int) -> int:
    return min(FORWARD_BLOCK, triton.next_power_of_2(max(M, 16)))


def backward_blocks(Cg: int, HW: int, cl: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the backward tiles: for channels_last every channel of the group in one tile
    row (up to 256), so a tile reads whole runs of Cg contiguous elements; for NCHW the pixel axis is the
    contiguous one and gets most of the tile."""
    BLOCK_C = min(triton.next_power_of_2(Cg), 256 if cl else 16)
    BLOCK_P = min(triton.next_power_of_2(max(HW, 1)), max(BACKWARD_TILE // BLOCK_C, 1))
    return max(BLOCK_P, 2), max(BLOCK_C, 2)


def forward(x, groups: int, weight, bias, eps: float):
    """x: Tensor[N, C, *] -> (y: like x, mean: Tensor[N, groups], rstd: Tensor[N, groups]); mean/rstd in
    acc_dtype(x.dtype)"""
    x, cl, (sN, sC, sP) = _layout(x)
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    y = torch.empty_like(x)
    mean = x.new_empty((N, groups), dtype=acc_dtype(x.dtype))
    rstd = x.new_empty((N, groups), dtype=acc_dtype(x.dtype))
    if N:
        eps_hi, eps_lo = split_float(eps)
        _forward_kernel[(N * groups,)](
            x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd, C, HW, groups,
            sN, sC, sP, eps_hi, eps_lo, HAS_W=weight is not None, HAS_B=bias is not None, CL=cl,
            ACC=_tl_acc(x.dtype), BLOCK=forward_block(C // groups * HW))
    return y, mean, rstd


def backward(grad, x, weight, bias, mean, rstd, groups: int, output_mask):
    """-> (grad_x, grad_weight, grad_bias); entries not asked for by output_mask (or without a parameter) empty"""
    x, cl, (sN, sC, sP) = _layout(x)
    grad = grad.contiguous(memory_format=torch.channels_last) if cl else grad.contiguous()
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    need_x = bool(output_mask[0])
    gx = torch.empty_like(x) if need_x else x.new_empty((0,))
    pa = x.new_zeros((N, C), dtype=torch.float64)
    pb = x.new_zeros((N, C), dtype=torch.float64)
    if N:
        BLOCK_P, BLOCK_C = backward_blocks(C // groups, HW, cl)
        _backward_kernel[(N * groups,)](
            grad, x, weight if weight is not None else x, bias if bias is not None else x, mean.contiguous(),
            rstd.contiguous(), gx if need_x else x, pa, pb, C, HW, groups, sN, sC, sP, HAS_W=weight is not None,
            HAS_B=bias is not None, NEED_X=need_x, ACC=_tl_acc(x.dtype), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    gw = pb.sum(0).to(x.dtype) if output_mask[1] and weight is not None else x.new_empty((0,))
    gb = pa.sum(0).to(x.dtype) if output_mask[2] and bias is not None else x.new_empty((0,))
    return gx, gw, gb
