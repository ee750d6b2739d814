"""DDR loss in Triton: each (b, t) row split over several programs for the forward pass, an elementwise
backward pass.

Same decomposition as csrc/common/ddr_loss.h: the forward pass leaves (ma, ia, mb, ib, sp, sq) per row.
One program per row would give B * (T - 1) programs (144 for TAU's 16 x 10 frames), too few to keep an
H200 streaming, so each row is cut into S chunks (`chunks`: about TARGET_PROGRAMS programs in all): a first
launch keeps a per-lane running max and rescaled sum of exponentials over its chunk (online softmax), a
second merges the row's partials (in the same order in every program) and sums its chunk's loss, sp and sq
terms; torch adds the chunks' sums (float64, fixed order: no atomics, bitwise reproducible). Each row is
read twice.

Precision: half inputs are loaded, converted to float32 and computed in float32; float64 stays float64
(ACC). The row statistics are kept in ACC (float32 for half inputs: a bf16 max would shift every p). A
Python float reaches a compiled kernel as float32, so 1/tau, eps and the gradient scale travel as float32
(hi, lo) pairs that float64 kernels add back together.
"""
import torch
import triton
import triton.language as tl

from ._scalars import join, split_float

MAX_BLOCK = 1024
# the forward's split: about this many programs per launch, chunks of at least MIN_CHUNK_STEPS sweep steps,
# at most MAX_CHUNKS per row (the merge loads them all at once)
TARGET_PROGRAMS = 1024
MIN_CHUNK_STEPS = 4
MAX_CHUNKS = 64



@triton.jit
def _row_logits(P0, P1, Y0, Y1, d, ok, inv_tau, ACC: tl.constexpr):
    # the row's logits (P[t+1] - P[t]) / tau and (Y[t+1] - Y[t]) / tau at elements d
    a = (tl.load(P1 + d, mask=ok, other=0).to(ACC) - tl.load(P0 + d, mask=ok, other=0).to(ACC)) * inv_tau
    b = (tl.load(Y1 + d, mask=ok, other=0).to(ACC) - tl.load(Y0 + d, mask=ok, other=0).to(ACC)) * inv_tau
    return a, b


@triton.jit
def _online(m, s, v, ok):
    # per lane: running max m and sum s of exp(. - m), extended by v where ok
    m_new = tl.maximum(m, tl.where(ok, v, float("-inf")))
    # a lane that has seen nothing yet has m = m_new = -inf: keep its sum 0 instead of forming exp(nan)
    scale = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
    return m_new, s * scale + tl.where(ok, tl.exp(v - m_new), 0.0)


@triton.jit
def _merge_max_sum(m, s):
    # (max, sum of exp(. - max)) from lanes' or chunks' running (max, sum); entries with m = -inf hold 0
    mx = tl.max(m, 0)
    return mx, tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0)


@triton.jit
def _row_pointers(P, Y, r, T, D):
    # frames t and t + 1 of row r = (b, t); int64 offsets: B * T * D may pass 2^31
    f = (r // (T - 1) * T + r % (T - 1)).to(tl.int64) * D
    return P + f, P + f + D, Y + f, Y + f + D


@triton.jit
def _softmax_partials_kernel(P, Y, PART, T, D, S, CHUNK, inv_tau_hi, inv_tau_lo, ACC: tl.constexpr,
                             BLOCK: tl.constexpr):
    # running (max, sum of exp) of both logits over chunk s of row r -> PART[r, s, :]
    pid = tl.program_id(0)
    r = pid // S
    s = pid % S
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    P0, P1, Y0, Y1 = _row_pointers(P, Y, r, T, D)
    lo = s * CHUNK
    hi = tl.minimum(lo, D - CHUNK) + CHUNK  # min(lo + CHUNK, D) without passing 2^31
    lane = tl.arange(0, BLOCK)
    ma = tl.full([BLOCK], float("-inf"), ACC)
    mb = tl.full([BLOCK], float("-inf"), ACC)
    sa = tl.zeros([BLOCK], ACC)
    sb = tl.zeros([BLOCK], ACC)
    for start in range(lo, hi, BLOCK):
        d = start + lane
        ok = d < hi
        a, bb = _row_logits(P0, P1, Y0, Y1, d, ok, inv_tau, ACC)
        ma, sa = _online(ma, sa, a, ok)
        mb, sb = _online(mb, sb, bb, ok)
    mxa, suma = _merge_max_sum(ma, sa)
    mxb, sumb = _merge_max_sum(mb, sb)
    out = PART + pid * 4
    tl.store(out, mxa)
    tl.store(out + 1, suma)
    tl.store(out + 2, mxb)
    tl.store(out + 3, sumb)


@triton.jit
def _forward_kernel(P, Y, PART, STATS, TERMS, T, D, S, CHUNK, inv_tau_hi, inv_tau_lo, eps_hi, eps_lo,
                    ACC: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr):
    # the row's (ma, ia, mb, ib) from every chunk's partials; the chunk's sums of the loss, sp and sq terms
    pid = tl.program_id(0)
    r = pid // S
    s = pid % S
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    eps = join(eps_hi, eps_lo, ACC)
    k = tl.arange(0, SB)
    k_ok = k < S
    part = PART + (r * S + k) * 4
    mxa, suma = _merge_max_sum(tl.load(part, mask=k_ok, other=float("-inf")), tl.load(part + 1, mask=k_ok, other=0))
    mxb, sumb = _merge_max_sum(tl.load(part + 2, mask=k_ok, other=float("-inf")),
                               tl.load(part + 3, mask=k_ok, other=0))
    ia = 1.0 / suma
    ib = 1.0 / sumb
    if s == 0:
        st = STATS + r * 6
        tl.store(st + 0, mxa)
        tl.store(st + 1, ia)
        tl.store(st + 2, mxb)
        tl.store(st + 3, ib)
    P0, P1, Y0, Y1 = _row_pointers(P, Y, r, T, D)
    lo = s * CHUNK
    hi = tl.minimum(lo, D - CHUNK) + CHUNK
    lane = tl.arange(0, BLOCK)
    acc_l = tl.zeros([BLOCK], ACC)
    acc_p = tl.zeros([BLOCK], ACC)
    acc_q = tl.zeros([BLOCK], ACC)
    for start in range(lo, hi, BLOCK):
        d = start + lane
        ok = d < hi
        a, bb = _row_logits(P0, P1, Y0, Y1, d, ok, inv_tau, ACC)
        p = tl.exp(a - mxa) * ia
        q = tl.exp(bb - mxb) * ib
        qe = q + eps
        ratio = p / qe
        re = ratio + eps
        log_re = tl.log(re)
        acc_l += tl.where(ok, p * log_re, 0.0)
        acc_p += tl.where(ok, p * (log_re + ratio / re), 0.0)
        acc_q += tl.where(ok, -q * (ratio * ratio / re), 0.0)
    out = TERMS + pid * 3
    tl.store(out, tl.sum(acc_l, 0))
    tl.store(out + 1, tl.sum(acc_p, 0))
    tl.store(out + 2, tl.sum(acc_q, 0))


@triton.jit
def _grad_logits(a, b, st, eps, ACC: tl.constexpr):
    p = tl.exp(a - tl.load(st).to(ACC)) * tl.load(st + 1).to(ACC)
    q = tl.exp(b - tl.load(st + 2).to(ACC)) * tl.load(st + 3).to(ACC)
    sp = tl.load(st + 4).to(ACC)
    sq = tl.load(st + 5).to(ACC)
    qe = q + eps
    ratio = p / qe
    re = ratio + eps
    ga = p * (tl.log(re) + ratio / re - sp)
    gb = q * (-(ratio * ratio / re) - sq)
    return ga, gb


@triton.jit
def _backward_kernel(G, P, Y, STATS, GP, GY, T, D, NBLK, inv_tau_hi, inv_tau_lo, eps_hi, eps_lo, scale_hi,
                     scale_lo, NEED_Y: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # one flat grid over (frame, block of the frame): no grid dimension is limited to 65535
    pid = tl.program_id(0)
    f = pid // NBLK  # output frame (b, t)
    b = f // T
    t = f % T
    inv_tau = join(inv_tau_hi, inv_tau_lo, ACC)
    eps = join(eps_hi, eps_lo, ACC)
    d = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    ok = d < D
    row = f.to(tl.int64) * D
    s = join(scale_hi, scale_lo, ACC) * tl.load(G).to(ACC)
    pc = tl.load(P + row + d, mask=ok, other=0).to(ACC)
    yc = tl.load(Y + row + d, mask=ok, other=0).to(ACC)
    ga = tl.zeros([BLOCK], ACC)
    gb = tl.zeros([BLOCK], ACC)
    if t > 0:
        st = STATS + (b * (T - 1) + t - 1) * 6
        a0, b0 = _grad_logits((pc - tl.load(P + row - D + d, mask=ok, other=0).to(ACC)) * inv_tau,
                              (yc - tl.load(Y + row - D + d, mask=ok, other=0).to(ACC)) * inv_tau, st, eps, ACC)
        ga += a0
        gb += b0
    if t < T - 1:
        st = STATS + (b * (T - 1) + t) * 6
        a1, b1 = _grad_logits((tl.load(P + row + D + d, mask=ok, other=0).to(ACC) - pc) * inv_tau,
                              (tl.load(Y + row + D + d, mask=ok, other=0).to(ACC) - yc) * inv_tau, st, eps, ACC)
        ga -= a1
        gb -= b1
    tl.store(GP + row + d, (s * ga).to(GP.dtype.element_ty), mask=ok)
    if NEED_Y:
        tl.store(GY + row + d, (s * gb).to(GY.dtype.element_ty), mask=ok)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (and keep the row statistics in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32



def _block(D: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(D, 16)))


def chunks(rows: int, length: int, step: int) -> tuple[int, int]:
    """(S, CHUNK): each of `rows` rows of `length` elements cut into S chunks of CHUNK (a multiple of the sweep
    step `step`), for about TARGET_PROGRAMS programs per launch."""
    S = max(1, min(triton.cdiv(TARGET_PROGRAMS, rows), triton.cdiv(length, MIN_CHUNK_STEPS * step), MAX_CHUNKS))
    chunk = triton.cdiv(triton.cdiv(length, S), step) * step
    return triton.cdiv(length, chunk), chunk


def forward(pred: torch.Tensor, target: torch.Tensor, tau: float, eps: float):
    """pred, target: contiguous Tensor[B, T, C, H, W], T >= 3 -> (loss: Tensor[] in pred's dtype,
    stats: Tensor[B, T-1, 6] in acc_dtype(pred.dtype))"""
    B, T = pred.shape[:2]
    D = pred[0, 0].numel()
    rows = B * (T - 1)
    acc = acc_dtype(pred.dtype)
    stats = pred.new_empty((B, T - 1, 6), dtype=acc)
    BLOCK = _block(D)
    S, CHUNK = chunks(rows, D, BLOCK)
    part = pred.new_empty((rows, S, 4), dtype=acc)
    terms = pred.new_empty((rows, S, 3), dtype=acc)
    inv_tau = split_float(1.0 / tau)
    meta = dict(ACC=_tl_acc(pred.dtype), BLOCK=BLOCK)
    _softmax_partials_kernel[(rows * S,)](pred, target, part, T, D, S, CHUNK, *inv_tau, **meta)
    _forward_kernel[(rows * S,)](pred, target, part, stats, terms, T, D, S, CHUNK, *inv_tau, *split_float(eps),
                                 **meta, SB=max(triton.next_power_of_2(S), 2))
    # the chunks' sums, in float64 and a fixed order
    sums = terms.sum(1, dtype=torch.float64)
    stats.view(rows, 6)[:, 4:] = sums[:, 1:].to(acc)
    return (sums[:, 0].sum() / (rows * D)).to(pred.dtype), stats


def backward(grad, pred, target, stats, tau: float, eps: float, need_target: bool):
    """-> (grad_pred: Tensor[B, T, C, H, W], grad_target: same, or empty unless need_target)"""
    B, T = pred.shape[:2]
    D = pred[0, 0].numel()
    gp = torch.empty_like(pred)
    gy = torch.empty_like(target) if need_target else pred.new_empty((0,))
    BLOCK = _block(D)
    nblk = triton.cdiv(D, BLOCK)
    _backward_kernel[(B * T * nblk,)](
        grad.contiguous(), pred, target, stats.contiguous(), gp, gy if need_target else gp, T, D, nblk,
        *split_float(1.0 / tau), *split_float(eps), *split_float(1.0 / (tau * B * (T - 1) * D)),
        NEED_Y=need_target, ACC=_tl_acc(pred.dtype), BLOCK=BLOCK)
    return gp, gy
