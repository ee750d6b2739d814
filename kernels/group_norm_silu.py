"""GroupNorm + SiLU in Triton, each (sample, group) split over several programs.

Same arithmetic as csrc/common/group_norm_silu.h. The group slice is addressed through strides, so
NCHW-contiguous and 4-D channels_last inputs are read in place.

Work split: one program per (sample, group) gives N * groups programs (320 for SimVP's 160 frames with 2
groups), too few to keep an H200's 132 SMs streaming; so each group slice is cut into S chunks
(`_chunks`: about TARGET_PROGRAMS programs in all) and every pass is two launches over (sample, group,
chunk): partial sums per chunk, then a pass that merges the group's partials (in the same order in every
program, so all chunks see the same numbers) and writes its chunk. Nothing is reduced with atomics, so
results are bitwise reproducible.

Forward: per-chunk statistics (per-lane Welford, lanes merged with Chan's formula: neither a second sweep
nor a shift is needed for |mean| >> std), then normalise and activate. Both walk the slice in memory order
(channel-major for NCHW, pixel-major for channels_last), so loads are coalesced.
Backward: per-(channel, chunk) sums of dL/da and dL/da * xhat over [pixels, channels] tiles (the channel
axis whole within a tile for channels_last, so both layouts read contiguous runs), then grad_x, recomputing
dL/da from grad and x instead of parking it in grad_x (one full-size write less, and dL/da is never rounded
to a half type). The weight/bias gradients are the partials summed over samples and chunks by torch in
float64.

Precision: half inputs are loaded, converted to float32 and computed in float32; float64 stays float64
(ACC). mean/rstd and the partials are kept in ACC (float32 for half inputs: a bf16 mean would shift every
xhat). Python float arguments reach a compiled kernel as float32, so eps travels as a float32 (hi, lo) pair
that float64 kernels add back together.
"""
import torch
import triton
import triton.language as tl

from ._scalars import join, split_float

# elements per sweep step; 4 warps hold 8 (forward) or 16 (backward tiles) per thread
FORWARD_BLOCK = 1024
BACKWARD_TILE = 2048
# the split: aim at this many programs per launch (several waves of 132 SMs), with chunks of at least
# MIN_CHUNK_STEPS sweep steps, and at most MAX_CHUNKS chunks per group (the merge loads them all at once)
TARGET_PROGRAMS = 1024
MIN_CHUNK_STEPS = 4
MAX_CHUNKS = 32



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
def _group_chunk(C, G, S, sN, sC):
    """This program's work: chunk s of group slice t = n*G + g (sample n, group g of Cg = C // G channels), and
    the group's first element as an int64 offset `base` (N * C * HW may pass 2^31; offsets inside one sample
    stay int32, the op's check)."""
    pid = tl.program_id(0)
    t = pid // S
    n = t // G
    g = t % G
    Cg = C // G
    return t, pid % S, n, g, Cg, n.to(tl.int64) * sN + (g * Cg).to(tl.int64) * sC


@triton.jit
def _stats_kernel(X, PART, C, HW, G, sN, sC, sP, S, CHUNK, CL: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    # (mean, M2, count) of chunk s of group slice t -> PART[t, s, :]
    t, s, n, g, Cg, base = _group_chunk(C, G, S, sN, sC)
    M = Cg * HW
    Xg = X + base
    lo = s * CHUNK
    hi = tl.minimum(lo, M - CHUNK) + CHUNK  # min(lo + CHUNK, M) without passing 2^31
    lane = tl.arange(0, BLOCK)
    run_mean = tl.zeros([BLOCK], ACC)
    run_m2 = tl.zeros([BLOCK], ACC)
    run_n = tl.zeros([BLOCK], ACC)
    steps = tl.zeros([], ACC)
    for start in range(lo, hi, BLOCK):
        e = start + lane
        ok = e < hi
        ch, px = _split(e, Cg, HW, CL)
        v = tl.load(Xg + ch * sC + px * sP, mask=ok, other=0).to(ACC)
        # only a chunk's last step can be partial, so every active lane has seen `steps` elements
        steps += 1.0
        run_n += ok.to(ACC)
        delta = v - run_mean
        run_mean += tl.where(ok, delta / steps, 0.0)
        run_m2 += tl.where(ok, delta * (v - run_mean), 0.0)
    mean, m2, count = tl.reduce((run_mean, run_m2, run_n), 0, _welford_merge)
    tl.store(PART + (t * S + s) * 3, mean)
    tl.store(PART + (t * S + s) * 3 + 1, m2)
    tl.store(PART + (t * S + s) * 3 + 2, count)


@triton.jit
def _forward_kernel(X, W, B, Y, PART, MEAN, RSTD, C, HW, G, sN, sC, sP, S, CHUNK, eps_hi, eps_lo,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, SB: tl.constexpr):
    t, s, n, g, Cg, base = _group_chunk(C, G, S, sN, sC)
    M = Cg * HW
    Xg = X + base
    Yg = Y + base
    k = tl.arange(0, SB)
    k_ok = k < S
    part = PART + (t * S + k) * 3
    mean, m2, count = tl.reduce((tl.load(part, mask=k_ok, other=0), tl.load(part + 1, mask=k_ok, other=0),
                                 tl.load(part + 2, mask=k_ok, other=0)), 0, _welford_merge)
    eps = join(eps_hi, eps_lo, ACC)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + eps)
    if s == 0:
        tl.store(MEAN + t, mean)
        tl.store(RSTD + t, rstd)
    lo = s * CHUNK
    hi = tl.minimum(lo, M - CHUNK) + CHUNK
    lane = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        e = start + lane
        ok = e < hi
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
def _channel_params(W, B, c0, cg, c_ok, rstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    # (w, rstd * w, b) of the channels c0 + cg (1 and 0 without parameters)
    wv = tl.full([BLOCK_C], 1.0, ACC)
    if HAS_W:
        wv = tl.load(W + c0 + cg, mask=c_ok, other=1).to(ACC)
    bv = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        bv = tl.load(B + c0 + cg, mask=c_ok, other=0).to(ACC)
    return wv, rstd * wv, bv


@triton.jit
def _backward_partials_kernel(GR, X, W, B, MEAN, RSTD, PA, PB, C, HW, G, sN, sC, sP, S, CHUNK,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # per channel of group t, over the pixels of chunk s: sum dL/da -> PA[n, c, s], sum dL/da * xhat -> PB
    t, s, n, g, Cg, base = _group_chunk(C, G, S, sN, sC)
    GRg = GR + base
    Xg = X + base
    mean = tl.load(MEAN + t).to(ACC)
    rstd = tl.load(RSTD + t).to(ACC)
    lo = s * CHUNK
    hi = tl.minimum(lo, HW - CHUNK) + CHUNK
    pix = tl.arange(0, BLOCK_P)
    chan = tl.arange(0, BLOCK_C)
    for c_start in range(0, Cg, BLOCK_C):
        cg = c_start + chan
        c_ok = cg < Cg
        wv, rw, bv = _channel_params(W, B, g * Cg, cg, c_ok, rstd, HAS_W, HAS_B, ACC, BLOCK_C)
        sum_dy = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        sum_dyx = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for p_start in range(lo, hi, BLOCK_P):
            pg = p_start + pix
            ok = (pg < hi)[:, None] & c_ok[None, :]
            xc, dy = _silu_grad_tile(GRg, Xg, pg[:, None] * sP + cg[None, :] * sC, ok, mean, rw, bv, ACC)
            sum_dy += dy
            sum_dyx += dy * xc
        out = (n * C + g * Cg + cg) * S + s
        tl.store(PA + out, tl.sum(sum_dy, 0), mask=c_ok)
        tl.store(PB + out, tl.sum(sum_dyx, 0) * rstd, mask=c_ok)


@triton.jit
def _backward_input_kernel(GR, X, W, B, MEAN, RSTD, PA, PB, GX, C, HW, G, sN, sC, sP, S, CHUNK,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_C: tl.constexpr, SB: tl.constexpr):
    # grad_x over the pixels of chunk s of group t
    t, s, n, g, Cg, base = _group_chunk(C, G, S, sN, sC)
    M = Cg * HW
    GRg = GR + base
    Xg = X + base
    GXg = GX + base
    mean = tl.load(MEAN + t).to(ACC)
    rstd = tl.load(RSTD + t).to(ACC)
    chan = tl.arange(0, BLOCK_C)
    k = tl.arange(0, SB)
    # the group's S1 = sum_c w_c A_c and S2 = sum_c w_c B_c from every chunk's partials
    S1 = tl.zeros([], ACC)
    S2 = tl.zeros([], ACC)
    for c_start in range(0, Cg, BLOCK_C):
        cg = c_start + chan
        c_ok = cg < Cg
        wv, rw, bv = _channel_params(W, B, g * Cg, cg, c_ok, rstd, HAS_W, HAS_B, ACC, BLOCK_C)
        idx = (n * C + g * Cg + cg)[:, None] * S + k[None, :]
        m = c_ok[:, None] & (k < S)[None, :]
        S1 += tl.sum(wv * tl.sum(tl.load(PA + idx, mask=m, other=0), 1), 0)
        S2 += tl.sum(wv * tl.sum(tl.load(PB + idx, mask=m, other=0), 1), 0)
    # grad_x = dL/da * rstd * w + (x - mean) * cx + c0
    cx = -rstd * rstd * S2 / M
    c0 = -rstd * S1 / M
    lo = s * CHUNK
    hi = tl.minimum(lo, HW - CHUNK) + CHUNK
    pix = tl.arange(0, BLOCK_P)
    for c_start in range(0, Cg, BLOCK_C):
        cg = c_start + chan
        c_ok = cg < Cg
        wv, rw, bv = _channel_params(W, B, g * Cg, cg, c_ok, rstd, HAS_W, HAS_B, ACC, BLOCK_C)
        for p_start in range(lo, hi, BLOCK_P):
            pg = p_start + pix
            ok = (pg < hi)[:, None] & c_ok[None, :]
            off = pg[:, None] * sP + cg[None, :] * sC
            xc, dy = _silu_grad_tile(GRg, Xg, off, ok, mean, rw, bv, ACC)
            gx = dy * rw[None, :] + xc * cx + c0
            tl.store(GXg + off, gx.to(GX.dtype.element_ty), mask=ok)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (and keep mean/rstd in): float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32



def _layout(x: torch.Tensor):
    """(tensor to read, channels_last?, strides (sN, sC, sP) of [N, C, HW]) as in the compiled kernels."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not cl:
        x = x.contiguous()
    C = x.shape[1]
    return x, cl, (x.stride(0), 1 if cl else x[0, 0].numel(), C if cl else 1)


def forward_block(M: int) -> int:
    return min(FORWARD_BLOCK, triton.next_power_of_2(max(M, 16)))


def backward_blocks(Cg: int, HW: int, cl: bool, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the backward tiles: for channels_last every channel of the group in one tile
    row (up to 256), so a tile reads whole runs of Cg contiguous elements; for NCHW the pixel axis is the
    contiguous one and gets most of the tile. float64 tiles are half as large (the float32 size spills
    registers there)."""
    tile = BACKWARD_TILE if acc_dtype(dtype) == torch.float32 else BACKWARD_TILE // 2
    BLOCK_C = min(triton.next_power_of_2(Cg), 256 if cl else 16)
    BLOCK_P = min(triton.next_power_of_2(max(HW, 1)), max(tile // BLOCK_C, 1))
    return max(BLOCK_P, 2), max(BLOCK_C, 2)


def chunks(groups_total: int, length: int, step: int) -> tuple[int, int]:
    """(S, CHUNK): each of `groups_total` slices of `length` elements (or pixels) cut into S chunks of CHUNK (a
    multiple of the sweep step `step`), for about TARGET_PROGRAMS programs per launch."""
    S = max(1, min(triton.cdiv(TARGET_PROGRAMS, groups_total), triton.cdiv(length, MIN_CHUNK_STEPS * step),
                   MAX_CHUNKS))
    chunk = triton.cdiv(triton.cdiv(length, S), step) * step
    return triton.cdiv(length, chunk), chunk


def forward(x, groups: int, weight, bias, eps: float):
    """x: Tensor[N, C, *] -> (y: like x, mean: Tensor[N, groups], rstd: Tensor[N, groups]); mean/rstd in
    acc_dtype(x.dtype)"""
    x, cl, (sN, sC, sP) = _layout(x)
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = x.new_empty((N, groups), dtype=acc)
    rstd = x.new_empty((N, groups), dtype=acc)
    if N:
        M = C // groups * HW
        BLOCK = forward_block(M)
        S, CHUNK = chunks(N * groups, M, BLOCK)
        part = x.new_empty((N * groups, S, 3), dtype=acc)
        grid = (N * groups * S,)
        _stats_kernel[grid](x, part, C, HW, groups, sN, sC, sP, S, CHUNK, CL=cl, ACC=_tl_acc(x.dtype), BLOCK=BLOCK)
        _forward_kernel[grid](
            x, weight if weight is not None else x, bias if bias is not None else x, y, part, mean, rstd, C, HW,
            groups, sN, sC, sP, S, CHUNK, *split_float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
            CL=cl, ACC=_tl_acc(x.dtype), BLOCK=BLOCK, SB=max(triton.next_power_of_2(S), 2))
    return y, mean, rstd


def backward(grad, x, weight, bias, mean, rstd, groups: int, output_mask):
    """-> (grad_x, grad_weight, grad_bias); entries not asked for by output_mask (or without a parameter) empty"""
    x, cl, (sN, sC, sP) = _layout(x)
    grad = grad.contiguous(memory_format=torch.channels_last) if cl else grad.contiguous()
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    acc = acc_dtype(x.dtype)
    need_x = bool(output_mask[0])
    need_w = bool(output_mask[1]) and weight is not None
    need_b = bool(output_mask[2]) and bias is not None
    gx = torch.empty_like(x) if need_x else x.new_empty((0,))
    gw, gb = x.new_empty((0,)), x.new_empty((0,))  # distinct: a custom op's outputs must not alias
    if N and (need_x or need_w or need_b):
        BLOCK_P, BLOCK_C = backward_blocks(C // groups, HW, cl, x.dtype)
        S, CHUNK = chunks(N * groups, HW, BLOCK_P)
        pa = x.new_empty((N, C, S), dtype=acc)
        pb = x.new_empty((N, C, S), dtype=acc)
        grid = (N * groups * S,)
        common = (weight if weight is not None else x, bias if bias is not None else x, mean.contiguous(),
                  rstd.contiguous(), pa, pb)
        meta = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACC=_tl_acc(x.dtype), BLOCK_P=BLOCK_P,
                    BLOCK_C=BLOCK_C)
        _backward_partials_kernel[grid](grad, x, *common, C, HW, groups, sN, sC, sP, S, CHUNK, **meta)
        if need_x:
            _backward_input_kernel[grid](grad, x, *common, gx, C, HW, groups, sN, sC, sP, S, CHUNK, **meta,
                                         SB=max(triton.next_power_of_2(S), 2))
        # over samples and chunks in float64, in a fixed order
        if need_w:
            gw = pb.sum((0, 2), dtype=torch.float64).to(x.dtype)
        if need_b:
            gb = pa.sum((0, 2), dtype=torch.float64).to(x.dtype)
    elif N == 0:
        gw = x.new_zeros((C,)) if need_w else gw
        gb = x.new_zeros((C,)) if need_b else gb
    return gx, gw, gb
