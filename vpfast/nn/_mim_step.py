"""One autograd node per step of MIM's cells on the compiled backends (cpp, cuda): the ST-LSTM layer 0, the
MIM blocks and the MIM-N modules.

Why: at MIM's small preset (batch 8, C = 16, 16x16) a training step is ~75% dense convolutions and the rest was
mostly per-call cost, not arithmetic: each MIM block step ran ~15 autograd nodes (four convolutions, two Python
Functions for the gate sums and peepholes, the fused ops behind their dispatch and torch.library autograd
wrappers, and the torch ops around them), each MIM-N step ~7, the ST-LSTM step ~6. Here each step is one
`torch.autograd.Function` that calls the compiled kernels (`torch.ops.vpfast.stlstm_*`, `convlstm_*`) and the
convolutions directly, and runs backward by hand with `aten.convolution_backward`. The arithmetic and what
backward keeps are those of the multi-node paths (nn/mim.py, nn/stlstm.py: the same kernels, the same saved
maps: gates, not the reference's sums, sigmoids and tanh maps; no concatenation saved), so results agree with
them to rounding and with the reference to the kernels' own tolerance. Measured in docs/performance.md
("Baselines: MIM and PhyDNet").

Used when (`usable`) the ops' backend is cpp or cuda, the convolutions are merged (over [D, c_{t-1}], [x, h],
[x, m]), autocast is off, and every tensor has one dtype and device: by MIMBlock / MIMN.forward, and by
vpfast.models.MIM's loop for all three cells (decided once per loop, models/mim.py `_loop_steps`); otherwise
the multi-node paths run. Backward is not differentiable twice (create_graph=True raises).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._recurrent import conv_grads as _conv_grads


def _cat_conv_grads(grad, parts, weight, stride, padding, need_parts, need_w):
    """Gradients of conv2d(cat(parts, 1), weight): ([grad wrt each part or None], grad wrt weight or None).
    As nn/_recurrent.py's _CatConv: when only the last part needs a gradient (layer 0's first input is a data
    frame), its input gradient is computed over its own channels only."""
    cat = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    sizes = [t.shape[1] for t in parts]
    if len(parts) > 1 and need_parts[-1] and not any(need_parts[:-1]):  # only the last part
        _, gw = _conv_grads(grad, cat, weight, stride, padding, False, need_w)
        start = sum(sizes[:-1])
        gi, _ = _conv_grads(grad, parts[-1], weight[:, start:].contiguous(), stride, padding, True, False)
        gis = [None] * (len(parts) - 1) + [gi]
    else:
        gi, gw = _conv_grads(grad, cat, weight, stride, padding, any(need_parts), need_w)
        gis = gi.split(sizes, 1) if gi is not None else [None] * len(parts)
    return [g if n else None for g, n in zip(gis, need_parts)], gw


def _plus(a, b):
    return a if b is None else (b if a is None else a + b)


def _peephole_grads(g_q, s, ct, C, need_s, need_ct):
    """Gradients of q[:, :C] += s * ct[:C], q[:, C:2C] += s * ct[C:] (wrt s and ct) given g_q."""
    g_i, g_f = g_q[:, :C], g_q[:, C:2 * C]
    g_s = torch.addcmul(g_i * ct[:C], g_f, ct[C:]) if need_s else None
    g_ct = torch.cat(((g_i * s).sum(0), (g_f * s).sum(0)), 0) if need_ct else None
    return g_s, g_ct


class MIMBlockStep(torch.autograd.Function):
    """(x, D, h, c, m, s, w_x, w_s, w_t, w_mims, ct_weight, oc_weight, w_last, stride, padding, forget_bias)
    -> (h', c', m', s').

    w_x, w_s: conv_x_cc / conv_s_cc weights with gates reordered to i, f, g, o; w_t: conv_t_cc's (i, g, o);
    w_mims: MIM-S's merged weight over [D, c_{t-1}] (i, f, g, o); w_last: conv_last's. m' and s' are views of
    one [B, 2C, H, W] buffer (s' first), as on the multi-node path."""

    @staticmethod
    def forward(ctx, x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last, stride, padding, forget_bias):
        C = c.shape[1]
        ops = torch.ops.vpfast
        x_g = F.conv2d(x, w_x, None, stride, padding)  # i, f, g, o
        s_g = F.conv2d(m, w_s, None, stride, padding)  # i, f, g, o
        t_g = F.conv2d(h, w_t, None, stride, padding)  # i, g, o
        q = F.conv2d(torch.cat((diff_h, c), 1), w_mims, None, stride, padding)  # MIM-S gates i, f, g, o
        q[:, :C].addcmul_(s, ct[:C])  # Hadamard peepholes, in place (q is not kept)
        q[:, C:2 * C].addcmul_(s, ct[C:])
        m_g = torch.add(x_g[:, :3 * C], s_g[:, :3 * C])
        # c-half of the ST-LSTM gates: the MIM-S cell (S); m-half: the zig-zag memory
        sm, o_mims, act, _ = ops.stlstm_gates_forward(None, q, m_g, s, m, forget_bias, False)
        del q, m_g
        s_new, m_new = sm[:, :C], sm[:, C:]
        t_mem, o1, _ = ops.stlstm_output_forward(o_mims, s_new * oc, s_new, None)
        ia = torch.add(x_g[:, :C], t_g[:, :C]).sigmoid_()
        ga = torch.add(x_g[:, 2 * C:3 * C], t_g[:, C:2 * C]).tanh_()
        c_new = torch.addcmul(t_mem, ia, ga)
        last = F.conv2d(torch.cat((c_new, m_new), 1), w_last)
        h_new, o2, _ = ops.stlstm_output_forward(torch.add(x_g[:, 3 * C:], t_g[:, 2 * C:]), s_g[:, 3 * C:], last,
                                                 None)
        ctx.save_for_backward(x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last, act, sm, o1, t_mem, ia,
                              ga, o2, h_new, c_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, c_new, m_new, s_new

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c, g_m, g_s):
        (x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last, act, sm, o1, t_mem, ia, ga, o2, h_new,
         c_new) = ctx.saved_tensors
        need = ctx.needs_input_grad
        stride, padding = ctx.conv
        ops = torch.ops.vpfast
        C = c.shape[1]
        s_new, m_new = sm[:, :C], sm[:, C:]
        if g_h is None:
            g_h = torch.zeros_like(h_new)
        # h' = σ(o_x + o_t + o_s) ⊙ tanh(conv_last([c', m']))
        g_o, g_last, _ = ops.stlstm_output_backward(g_h, o2, h_new, None)
        g_cm_last, g_wlast = _conv_grads(g_last, torch.cat((c_new, m_new), 1), w_last, (1, 1), (0, 0), True,
                                         need[12])
        g_cn = _plus(g_cm_last[:, :C], g_c)
        g_mn = _plus(g_cm_last[:, C:], g_m)
        # c' = T + σ(a_i) ⊙ tanh(a_g)
        g_ai = g_cn * ga * ia * (1 - ia)
        g_ag = g_cn * ia * (1 - ga * ga)
        # T = σ(o_mims + S' ⊙ oc) ⊙ tanh(S')
        g_o1, g_sn, _ = ops.stlstm_output_backward(g_cn, o1, t_mem, None)
        g_sn = _plus(g_sn.addcmul_(g_o1, oc), g_s)
        g_oc = (g_o1 * s_new).sum(0) if need[11] else None
        _, g_q, g_mg, g_s_prev, g_m_prev = ops.stlstm_gates_backward(torch.cat((g_sn, g_mn), 1), g_o1, None, act,
                                                                     sm, s, m, False)
        g_s_peep, g_ct = _peephole_grads(g_q, s, ct, C, need[5], need[10])
        g_s_prev = g_s_prev + g_s_peep if need[5] else None
        g_dc, g_wmims = _conv_grads(g_q, torch.cat((diff_h, c), 1), w_mims, stride, padding, need[1] or need[3],
                                    need[9])
        g_dh, g_cp = g_dc.split(C, 1) if g_dc is not None else (None, None)
        # the three gate convolutions' gradients: x (i, f, g, o) feeds m, c' and h'; m (i, f, g, o) feeds m and h';
        # h_{t-1} (i, g, o) feeds c' and h'
        g_xg = torch.cat((g_mg[:, :C] + g_ai, g_mg[:, C:2 * C], g_mg[:, 2 * C:] + g_ag, g_o), 1)
        g_x, g_wx = _conv_grads(g_xg, x, w_x, stride, padding, need[0], need[6])
        del g_xg
        g_m2, g_ws = _conv_grads(torch.cat((g_mg, g_o), 1), m, w_s, stride, padding, need[4], need[7])
        g_hp, g_wt = _conv_grads(torch.cat((g_ai, g_ag, g_o), 1), h, w_t, stride, padding, need[2], need[8])
        return (g_x, g_dh if need[1] else None, g_hp, g_cp if need[3] else None,
                g_m_prev + g_m2 if need[4] else None, g_s_prev, g_wx, g_ws, g_wt, g_wmims, g_ct, g_oc, g_wlast,
                None, None, None)


class MIMNStep(torch.autograd.Function):
    """(x, h, c, w, ct_weight, oc_weight, stride, padding, forget_bias) -> (h', c'): the MIM-N peephole LSTM with
    its merged weight w over [x, h] (gates i, f, g, o). The cell update is `convlstm` (its own h, which lacks the
    peephole, is not used), the output gate `stlstm_output`."""

    @staticmethod
    def forward(ctx, x, h, c, w, ct, oc, stride, padding, forget_bias):
        C = c.shape[1]
        ops = torch.ops.vpfast
        q = F.conv2d(torch.cat((x, h), 1), w, None, stride, padding)
        q[:, :C].addcmul_(c, ct[:C])
        q[:, C:2 * C].addcmul_(c, ct[C:])
        _, c_new, act = ops.convlstm_forward(None, q, c, forget_bias, True)
        h_new, o, _ = ops.stlstm_output_forward(q[:, 3 * C:], c_new * oc, c_new, None)
        ctx.save_for_backward(x, h, c, w, ct, oc, act, c_new, o, h_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c):
        x, h, c, w, ct, oc, act, c_new, o, h_new = ctx.saved_tensors
        need = ctx.needs_input_grad
        stride, padding = ctx.conv
        ops = torch.ops.vpfast
        C = c.shape[1]
        g_cn, g_o = g_c, None
        if g_h is not None:
            g_o, g_cn_h, _ = ops.stlstm_output_backward(g_h, o, h_new, None)
            g_cn = _plus(g_cn_h.addcmul_(g_o, oc), g_c)
        g_oc = (g_o * c_new).sum(0) if need[5] and g_o is not None else None
        if g_cn is None:
            g_cn = torch.zeros_like(c_new)
        # convlstm's h is not an output here (no gradient): with tanh_c its backward does not read h, so c_new
        # stands in for it
        _, g_q, g_cp = ops.convlstm_backward(None, g_cn, act, c, c_new, c_new, False, True)
        if g_o is not None:
            g_q[:, 3 * C:].copy_(g_o)
        g_c_peep, g_ct = _peephole_grads(g_q, c, ct, C, need[2], need[4])
        g_xh, g_w = _conv_grads(g_q, torch.cat((x, h), 1), w, stride, padding, need[0] or need[1], need[3])
        g_x, g_hp = g_xh.split((x.shape[1], C), 1) if g_xh is not None else (None, None)
        return (g_x if need[0] else None, g_hp if need[1] else None, g_cp + g_c_peep if need[2] else None, g_w,
                g_ct, g_oc, None, None, None)


class STLSTMStep(torch.autograd.Function):
    """(x, h, c, m, w_xh, w_xm, w_o, w_last, stride, padding, forget_bias) -> (h', c', m'): PredRNN's ST-LSTM cell
    (MIM's layer 0) with merged convolutions over [x, h] (w_xh: i, f, g, o) and [x, m] (w_xm: i', f', g'), then
    `stlstm_gates`, conv_o (stride 1, `padding`) and conv_last over [c', m'], and `stlstm_output`. c' and m' are
    views of one [B, 2C, H, W] buffer (c' first), as in SpatioTemporalLSTMCell's fused path."""

    @staticmethod
    def forward(ctx, x, h, c, m, w_xh, w_xm, w_o, w_last, stride, padding, forget_bias):
        C = c.shape[1]
        ops = torch.ops.vpfast
        h_g = F.conv2d(torch.cat((x, h), 1), w_xh, None, stride, padding)
        m_g = F.conv2d(torch.cat((x, m), 1), w_xm, None, stride, padding)
        cm, o_part, act, _ = ops.stlstm_gates_forward(None, h_g, m_g, c, m, forget_bias, False)
        del h_g, m_g
        o_m = F.conv2d(cm, w_o, None, 1, padding)
        last = F.conv2d(cm, w_last)
        h_new, o, _ = ops.stlstm_output_forward(o_part, o_m, last, None)
        ctx.save_for_backward(x, h, c, m, w_xh, w_xm, w_o, w_last, act, cm, o, h_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, cm[:, :C], cm[:, C:]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c, g_m):
        x, h, c, m, w_xh, w_xm, w_o, w_last, act, cm, o, h_new = ctx.saved_tensors
        need = ctx.needs_input_grad
        stride, padding = ctx.conv
        ops = torch.ops.vpfast
        C = c.shape[1]
        if g_h is None:
            g_h = torch.zeros_like(h_new)
        g_pre, g_last, _ = ops.stlstm_output_backward(g_h, o, h_new, None)
        g_cm, g_wo = _conv_grads(g_pre, cm, w_o, (1, 1), padding, True, need[6])
        g_cm_last, g_wlast = _conv_grads(g_last, cm, w_last, (1, 1), (0, 0), True, need[7])
        g_cm += g_cm_last
        del g_cm_last
        if g_c is not None:
            g_cm[:, :C] += g_c
        if g_m is not None:
            g_cm[:, C:] += g_m
        _, g_hg, g_mg, g_cp, g_mp = ops.stlstm_gates_backward(g_cm, g_pre, None, act, cm, c, m, False)
        del g_cm
        (g_x1, g_hp), g_wxh = _cat_conv_grads(g_hg, (x, h), w_xh, stride, padding, (need[0], need[1]), need[4])
        del g_hg
        (g_x2, g_mp2), g_wxm = _cat_conv_grads(g_mg, (x, m), w_xm, stride, padding, (need[0], need[3]), need[5])
        g_x = g_x1 + g_x2 if need[0] else None
        return (g_x, g_hp, g_cp if need[2] else None, g_mp + g_mp2 if need[3] else None, g_wxh, g_wxm, g_wo,
                g_wlast, None, None, None)


def usable(backend: str, merge_convs: bool, tensors) -> bool:
    """Whether the one-node steps apply: compiled backend, merged convolutions, autocast off, one dtype and
    device for every tensor."""
    if backend not in ("cpp", "cuda") or not merge_convs:
        return False
    t0 = tensors[0]
    dev = t0.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return False
    return all(t.dtype == t0.dtype and t.device == t0.device for t in tensors)


def bind(fn, *tail):
    """states -> fn.apply(*states, *tail): a step with the loop's weights and settings bound."""
    return lambda *states: fn.apply(*states, *tail)
