"""One autograd node per step of MIM's cells on the compiled backends (cpp, cuda): the ST-LSTM layer 0, the
MIM blocks and the MIM-N modules.

Why: at MIM's small preset (batch 8, C = 16, 16x16) a training step is ~75% dense convolutions and the rest was
mostly per-call cost, not arithmetic: each MIM block step ran ~15 autograd nodes (four convolutions, two Python
Functions for the gate sums and peepholes, the fused ops behind their dispatch and torch.library autograd
wrappers, and the torch ops around them), each MIM-N step ~7, the ST-LSTM step ~6. Here each step is one
`torch.autograd.Function` whose forward and backward are one call each of a compiled composition
(csrc/mim_step.cpp: vpfast::mim_stlstm_step, mim_block_step, mim_n_step and their backwards), which calls the
fused kernels (`vpfast::stlstm_*`, `convlstm_*`) and the convolutions from C++ and runs backward by hand with
`aten::convolution_backward`. The arithmetic and what
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
from torch.autograd.function import once_differentiable

_OPS = torch.ops.vpfast


def _grads(grads, mask, n_tail):
    """The compositions' gradients as autograd wants them: None where not asked (they return empty tensors
    there; a slice of an empty joint gradient is empty too), then None for the n_tail non-tensor arguments."""
    return (*(g if want and g.numel() else None for g, want in zip(grads, mask)),) + (None,) * n_tail


def _split(joint, n):
    """The gradients of the two inputs of one merged convolution, returned as one [B, n + m, H, W] buffer (two
    outputs of an op may not alias): its first n channels and the rest (both empty when it is)."""
    return (joint[:, :n], joint[:, n:]) if joint.numel() else (joint, joint)


class MIMBlockStep(torch.autograd.Function):
    """(x, D, h, c, m, s, w_x, w_s, w_t, w_mims, ct_weight, oc_weight, w_last, stride, padding, forget_bias)
    -> (h', c', m', s').

    w_x, w_s: conv_x_cc / conv_s_cc weights with gates reordered to i, f, g, o; w_t: conv_t_cc's (i, g, o);
    w_mims: MIM-S's merged weight over [D, c_{t-1}] (i, f, g, o); w_last: conv_last's. m' and s' are views of
    one [B, 2C, H, W] buffer (s' first), as on the multi-node path. D, h, c, s may be None: zero (the model loop's
    first step), their convolutions skipped. Forward and backward: the compiled
    compositions vpfast::mim_block_step / mim_block_step_backward (csrc/mim_step.cpp)."""

    @staticmethod
    def forward(ctx, x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last, stride, padding, forget_bias):
        C = m.shape[1]
        h_new, c_new, sm, *kept = _OPS.mim_block_step.default(x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc,
                                                              w_last, stride, padding, forget_bias)
        ctx.save_for_backward(x, diff_h, h, c, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last, *kept[:1], sm,
                              *kept[1:], h_new, c_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, c_new, sm[:, C:], sm[:, :C]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c, g_m, g_s):
        mask = list(ctx.needs_input_grad[:13])
        saved = ctx.saved_tensors  # unpacked once: each access unpacks (and checks) every saved tensor
        g_x, g_dc, g_h, *rest = _OPS.mim_block_step_backward.default(g_h, g_c, g_m, g_s, *saved, *ctx.conv, mask)
        g_d, g_cp = _split(g_dc, saved[9].shape[1] - saved[4].shape[1])  # w_mims over [D, c]; c has m's channels
        return _grads((g_x, g_d, g_h, g_cp, *rest), mask, 3)


class MIMNStep(torch.autograd.Function):
    """(x, h, c, w, ct_weight, oc_weight, stride, padding, forget_bias) -> (h', c'): the MIM-N peephole LSTM with
    its merged weight w over [x, h] (gates i, f, g, o). The cell update is `convlstm` (its own h, which lacks the
    peephole, is not used), the output gate `stlstm_output`; compiled as vpfast::mim_n_step (+ _backward)."""

    @staticmethod
    def forward(ctx, x, h, c, w, ct, oc, stride, padding, forget_bias):
        h_new, c_new, act, o = _OPS.mim_n_step.default(x, h, c, w, ct, oc, stride, padding, forget_bias)
        ctx.save_for_backward(x, h, c, w, ct, oc, act, c_new, o, h_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c):
        mask = list(ctx.needs_input_grad[:6])
        saved = ctx.saved_tensors
        g_xh, *rest = _OPS.mim_n_step_backward.default(g_h, g_c, *saved, *ctx.conv, mask)
        return _grads((*_split(g_xh, saved[0].shape[1]), *rest), mask, 3)


class STLSTMStep(torch.autograd.Function):
    """(x, h, c, m, w_xh, w_xm, w_o, w_last, stride, padding, forget_bias) -> (h', c', m'): PredRNN's ST-LSTM cell
    (MIM's layer 0) with merged convolutions over [x, h] (w_xh: i, f, g, o) and [x, m] (w_xm: i', f', g'), then
    `stlstm_gates`, conv_o (stride 1, `padding`) and conv_last over [c', m'], and `stlstm_output`. c' and m' are
    views of one [B, 2C, H, W] buffer (c' first), as in SpatioTemporalLSTMCell's fused path. Compiled as
    vpfast::mim_stlstm_step (+ _backward)."""

    @staticmethod
    def forward(ctx, x, h, c, m, w_xh, w_xm, w_o, w_last, stride, padding, forget_bias):
        C = c.shape[1]
        h_new, cm, act, o = _OPS.mim_stlstm_step.default(x, h, c, m, w_xh, w_xm, w_o, w_last, stride, padding,
                                                         forget_bias)
        ctx.save_for_backward(x, h, c, m, w_xh, w_xm, w_o, w_last, act, cm, o, h_new)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, cm[:, :C], cm[:, C:]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_c, g_m):
        mask = list(ctx.needs_input_grad[:8])
        return _grads(_OPS.mim_stlstm_step_backward.default(g_h, g_c, g_m, *ctx.saved_tensors, *ctx.conv, mask),
                      mask, 3)


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
