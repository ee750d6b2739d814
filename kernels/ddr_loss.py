"""DDR loss in Triton: one program per (b, t) row for the forward pass, an elementwise backward pass.

Same decomposition as csrc/common/ddr_loss.h: the forward pass leaves (ma, ia, mb, ib, sp, sq) per row.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(P, Y, STATS, ROW_LOSS, T, D, inv_tau, eps, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // (T - 1)
    t = r % (T - 1)
    base = (b * T + t) * D
    ma = tl.full([BLOCK], float("-inf"), tl.float32).to(P.dtype.element_ty)
    mb = ma
    for start in range(0, D, BLOCK):
        d = start + tl.arange(0, BLOCK)
        ok = d < D
        a = (tl.load(P + base + D + d, mask=ok, other=0) - tl.load(P + base + d, mask=ok, other=0)) * inv_tau
        bb = (tl.load(Y + base + D + d, mask=ok, other=0) - tl.load(Y + base + d, mask=ok, other=0)) * inv_tau
        ma = tl.maximum(ma, tl.where(ok, a, float("-inf")))
        mb = tl.maximum(mb, tl.where(ok, bb, float("-inf")))
    mxa = tl.max(ma, 0)
    mxb = tl.max(mb, 0)
    sa = tl.zeros([BLOCK], P.dtype.element_ty)
    sb = tl.zeros([BLOCK], P.dtype.element_ty)
    for start in range(0, D, BLOCK):
        d = start + tl.arange(0, BLOCK)
        ok = d < D
        a = (tl.load(P + base + D + d, mask=ok, other=0) - tl.load(P + base + d, mask=ok, other=0)) * inv_tau
        bb = (tl.load(Y + base + D + d, mask=ok, other=0) - tl.load(Y + base + d, mask=ok, other=0)) * inv_tau
        sa += tl.where(ok, tl.exp(a - mxa), 0)
        sb += tl.where(ok, tl.exp(bb - mxb), 0)
    ia = 1.0 / tl.sum(sa, 0)
    ib = 1.0 / tl.sum(sb, 0)
    acc_l = tl.zeros([BLOCK], P.dtype.element_ty)
    acc_p = tl.zeros([BLOCK], P.dtype.element_ty)
    acc_q = tl.zeros([BLOCK], P.dtype.element_ty)
    for start in range(0, D, BLOCK):
        d = start + tl.arange(0, BLOCK)
        ok = d < D
        a = (tl.load(P + base + D + d, mask=ok, other=0) - tl.load(P + base + d, mask=ok, other=0)) * inv_tau
        bb = (tl.load(Y + base + D + d, mask=ok, other=0) - tl.load(Y + base + d, mask=ok, other=0)) * inv_tau
        p = tl.exp(a - mxa) * ia
        q = tl.exp(bb - mxb) * ib
        qe = q + eps
        ratio = p / qe
        re = ratio + eps
        log_re = tl.log(re)
        acc_l += tl.where(ok, p * log_re, 0)
        acc_p += tl.where(ok, p * (log_re + ratio / re), 0)
        acc_q += tl.where(ok, -q * p * ratio / (re * qe), 0)
    tl.store(STATS + r * 6 + 0, mxa)
    tl.store(STATS + r * 6 + 1, ia)
    tl.store(STATS + r * 6 + 2, mxb)
    tl.store(STATS + r * 6 + 3, ib)
    tl.store(STATS + r * 6 + 4, tl.sum(acc_p, 0))
    tl.store(STATS + r * 6 + 5, tl.sum(acc_q, 0))
    tl.store(ROW_LOSS + r, tl.sum(acc_l, 0).to(tl.float64))


@triton.jit
def _grad_logits(a, b, st, eps):
    p = tl.exp(a - tl.load(st)) * tl.load(st + 1)
    q = tl.exp(b - tl.load(st + 2)) * tl.load(st + 3)
    sp = tl.load(st + 4)
    sq = tl.load(st + 5)
    qe = q + eps
    ratio = p / qe
    re = ratio + eps
    ga = p * (tl.log(re) + ratio / re - sp)
    gb = q * (-p * ratio / (re * qe) - sq)
    return ga, gb


@triton.jit
def _backward_kernel(G, P, Y, STATS, GP, GY, T, D, inv_tau, eps, scale, NEED_Y: tl.constexpr,
                     BLOCK: tl.constexpr):
    f = tl.program_id(0)  # output frame (b, t)
    b = f // T
    t = f % T
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = d < D
    i = f * D + d
    s = scale * tl.load(G)
    pc = tl.load(P + i, mask=ok, other=0)
    yc = tl.load(Y + i, mask=ok, other=0)
    ga = tl.zeros([BLOCK], P.dtype.element_ty)
    gb = tl.zeros([BLOCK], P.dtype.element_ty)
    if t > 0:
        st = STATS + (b * (T - 1) + t - 1) * 6
        a0, b0 = _grad_logits((pc - tl.load(P + i - D, mask=ok, other=0)) * inv_tau,
                              (yc - tl.load(Y + i - D, mask=ok, other=0)) * inv_tau,
                              st, eps)
        ga += a0
        gb += b0
    if t < T - 1:
        st = STATS + (b * (T - 1) + t) * 6
        a1, b1 = _grad_logits((tl.load(P + i + D, mask=ok, other=0) - pc) * inv_tau,
                              (tl.load(Y + i + D, mask=ok, other=0) - yc) * inv_tau,
                              st, eps)
        ga -= a1
        gb -= b1
    tl.store(GP + i, s * ga, mask=ok)
    if NEED_Y:
        tl.store(GY + i, s * gb, mask=ok)


def _block(D: int) -> int:
    return min(1024, triton.next_power_of_2(max(D, 16)))


def forward(pred: torch.Tensor, target: torch.Tensor, tau: float, eps: float):
    """pred, target: contiguous Tensor[B, T, C, H, W], T >= 3 -> (loss: Tensor[], stats: Tensor[B, T-1, 6])"""
    B, T = pred.shape[:2]
    D = pred[0, 0].numel()
    stats = pred.new_empty((B, T - 1, 6))
    row_loss = pred.new_empty((B * (T - 1),), dtype=torch.float64)
    _forward_kernel[(B * (T - 1),)](pred, target, stats, row_loss, T, D, 1.0 / tau, eps, BLOCK=_block(D))
    return (row_loss.sum() / (B * (T - 1) * D)).to(pred.dtype), stats


def backward(grad, pred, target, stats, tau: float, eps: float, need_target: bool):
    """-> (grad_pred: Tensor[B, T, C, H, W], grad_target: same, or empty unless need_target)"""
    B, T = pred.shape[:2]
    D = pred[0, 0].numel()
    gp = torch.empty_like(pred)
    gy = torch.empty_like(target) if need_target else pred.new_empty((0,))
    BLOCK = _block(D)
    grid = (B * T, triton.cdiv(D, BLOCK))
    _backward_kernel[grid](grad.to(pred.dtype).contiguous(), pred, target, stats.contiguous(), gp,
                           gy if need_target else gp, T, D, 1.0 / tau, eps, 1.0 / (tau * B * (T - 1) * D),
                           NEED_Y=need_target, BLOCK=BLOCK)
    return gp, gy
