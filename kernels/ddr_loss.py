"""DDR loss in Triton: one program per (b, t) row for the forward pass, an elementwise backward pass.

Same decomposition as csrc/common/ddr_loss.h: the forward pass leaves (ma, ia, mb, ib, sp, sq) per row.
The forward's first sweep keeps a per-lane running max and rescaled sum of exponentials (online softmax),
so a row is read twice rather than three times.

Precision: half inputs are loaded, converted to float32 and computed in float32; float64 stays float64
(ACC). The row statistics are kept in ACC (float32 for half inputs: a bf16 max would shift every p). A
Python float reaches a compiled kernel as float32, so 1/tau, eps and the gradient scale travel as float32
(hi, lo) pairs that float64 kernels add back together.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    # a float32 (hi, lo) pair from split_float, summed in ACC
    return (tl.zeros([], ACC) + hi) + lo


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
def _lanes_to_row(m, s):
    # (max, 1 / sum of exponentials) of a row from its lanes' running (max, sum)
    mx = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0)
    return mx, 1.0 / total


@triton.jit
def _forward_kernel(P, Y, STATS, ROW_LOSS, T, D, inv_tau_hi, inv_tau_lo, eps_hi, eps_lo, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // (T - 1)
    t = r % (T - 1)
    inv_tau = _join(inv_tau_hi, inv_tau_lo, ACC)
    eps = _join(eps_hi, eps_lo, ACC)
    # int64 row offset: B * T * D may pass 2^31
    P0 = P + (b * T + t).to(tl.int64) * D
    Y0 = Y + (b * T + t).to(tl.int64) * D
    P1 = P0 + D
    Y1 = Y0 + D
    lane = tl.arange(0, BLOCK)
    ma = tl.full([BLOCK], float("-inf"), ACC)
    mb = tl.full([BLOCK], float("-inf"), ACC)
    sa = tl.zeros([BLOCK], ACC)
    sb = tl.zeros([BLOCK], ACC)
    for start in range(0, D, BLOCK):
        d = start + lane
        ok = d < D
        a, bb = _row_logits(P0, P1, Y0, Y1, d, ok, inv_tau, ACC)
        ma, sa = _online(ma, sa, a, ok)
        mb, sb = _online(mb, sb, bb, ok)
    mxa, ia = _lanes_to_row(ma, sa)
    mxb, ib = _lanes_to_row(mb, sb)
    acc_l = tl.zeros([BLOCK], ACC)
    acc_p = tl.zeros([BLOCK], ACC)
    acc_q = tl.zeros([BLOCK], ACC)
    for start in range(0, D, BLOCK):
        d = start + lane
        ok = d < D
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
    st = STATS + r * 6
    tl.store(st + 0, mxa)
    tl.store(st + 1, ia)
    tl.store(st + 2, mxb)
    tl.store(st + 3, ib)
    tl.store(st + 4, tl.sum(acc_p, 0))
    tl.store(st + 5, tl.sum(acc_q, 0))
    tl.store(ROW_LOSS + r, tl.sum(acc_l, 0).to(tl.float64))


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
    inv_tau = _join(inv_tau_hi, inv_tau_lo, ACC)
    eps = _join(eps_hi, eps_lo, ACC)
    d = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    ok = d < D
    row = f.to(tl.int64) * D
    s = _join(scale_hi, scale_lo, ACC) * tl.load(G).to(ACC)
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


def split_float(v: float) -> tuple[float, float]:
    """v as a float32 pair (hi, lo) with hi + lo = v to about 2^-48 (see the module docstring)."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


def _block(D: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(D, 16)))


def forward(pred: torch.Tensor, target: torch.Tensor, tau: float, eps: float):
    """pred, target: contiguous Tensor[B, T, C, H, W], T >= 3 -> (loss: Tensor[] in pred's dtype,
    stats: Tensor[B, T-1, 6] in acc_dtype(pred.dtype))"""
    B, T = pred.shape[:2]
    D = pred[0, 0].numel()
    stats = pred.new_empty((B, T - 1, 6), dtype=acc_dtype(pred.dtype))
    row_loss = pred.new_empty((B * (T - 1),), dtype=torch.float64)
    _forward_kernel[(B * (T - 1),)](pred, target, stats, row_loss, T, D, *split_float(1.0 / tau), *split_float(eps),
                                    ACC=_tl_acc(pred.dtype), BLOCK=_block(D))
    return (row_loss.sum() / (B * (T - 1) * D)).to(pred.dtype), stats


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
