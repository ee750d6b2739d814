"""Drop-in Causal LSTM cell and Gradient Highway Unit (OpenSTL's PredRNN++ modules), MODELS.md §10.

The fast backends run the Causal LSTM step's pointwise work with the three fused `vpfast.ops.causal_lstm`
stages and, with layer_norm off, can merge its convolutions (merge_convs=True, see CausalLSTMCell). The GHU's
pointwise step is the Motion-Highway output of the ST-LSTM (σ(a + b) ⊙ tanh(p) + (1 − σ) ⊙ z), so the fast
backends run it with the fused `vpfast.ops.stlstm_output` kernels (backward keeps σ and tanh(p) only), its two
convolutions merged into one. On the compiled kernels (cpp / cuda) the default configurations run each cell or
GHU step as a single autograd node (`_CausalStep`, `_GHUStep`): at PredRNN++'s `small` preset the per-op
autograd bridges, checks and ConvolutionBackward nodes cost more than the kernels (docs/performance.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.causal_lstm import CELL as _CELL, causal_lstm_cell, causal_lstm_memory, causal_lstm_output
from ..ops.stlstm import OUTPUT as _STLSTM_OUTPUT, stlstm_output
from ._recurrent import (MERGE_AUTO_MAX_ELEMENTS, MergedWeightsMixin, cat_conv, cat_conv_many, check_input,
                         check_state, choose_merge, conv_block, fused_backend, keep_cell_args,
                         state_shape)


class CausalLSTMCell(MergedWeightsMixin, nn.Module):
    """Causal LSTM cell with OpenSTL's constructor and state_dict.

    CausalLSTMCell(in_channel, num_hidden, height, width, filter_size, stride, layer_norm, backend=None,
                   merge_convs=None)

    Parameters (C = num_hidden, k = filter_size; no biases; k x k convolutions in a Sequential, `.0.weight`):
      conv_x [7C, in_channel]   i, f, g, i', f', g', o from x
      conv_h [4C, C]            i, f, g, o from h
      conv_c [3C, C]            i, f, g from c_{t-1}
      conv_m [3C, C]            i', f', m̂ from m_{t-1}
      conv_o [C, 2C]            built by the reference and never used (kept for the state_dict)
      conv_c2m [4C, C]          i', g', f', o from the new c_t (note the order)
      conv_om [C, C]            o from the new m_t
      conv_last.weight [C, 2C, 1, 1]
      with layer_norm: LayerNorm([channels, height, width]) after each k x k convolution (`.1.*`)

    forward(x: Tensor[B, in_channel, H, W], h, c, m: Tensor[B, C, H, W]) -> (h, c, m), all Tensor[B, C, H, W]:
      i = σ(i_x + i_h + i_c), f = σ(f_x + f_h + f_c + 1), g = tanh(g_x + g_h + g_c), c_t = f ⊙ c + i ⊙ g
      i' = σ(i'_x + i'_m + i'_c2m), f' = σ(f'_x + f'_m + f'_c2m + 1), g' = tanh(g'_x + g'_c2m)
      m_t = f' ⊙ tanh(m̂) + i' ⊙ g',  o = tanh(o_x + o_h + o_c2m + conv_om(m_t)),
      h_t = o ⊙ tanh(conv_last([c_t, m_t]))

    backend: "torch" runs the reference arithmetic verbatim (seven convolutions, splits, adds, cat);
      "cpp" / "cuda" / "triton" run the pointwise work as the three fused stages of vpfast.ops.causal_lstm
      (cell, memory, output); None = $VPFAST_BACKEND or "auto". With separate convolutions, no LayerNorm, the
      compiled kernels (cpp / cuda), outside autocast and torch.compile, the whole step is one autograd node
      (`_CausalStep`: the stage kernels and aten.convolution_backward called directly, tanh(conv_last) recomputed
      in backward rather than kept); otherwise the public stage ops run, each its own node.
    merge_convs: with layer_norm off (and stride 1), compute the gates with four k x k convolutions instead of
      six: one over [x, h, c_{t-1}] (i, f, g, o: the sums i_x + i_h + i_c happen inside the convolution; o gets
      x and h, its c block is zero), conv_m over m, one over [x, c_t] (i', g', f' with their x terms, and o_c2m,
      whose x block is zero) and conv_om. The zero blocks cost (in_channel + C) C k^2 multiply-adds per pixel out
      of the cell's 7 in_channel C + 15 C^2 (about 4% at in_channel = C); merging without zero blocks would take
      more convolutions. The assembled weights are derived from conv_x/conv_h/conv_c/conv_c2m on every use
      (state_dict keys unchanged), once per time loop inside `with cell.unroll():`. None (default) = separate
      convolutions: on this package's 2-core CPU a 10-step unrolled `small` cell (B=4, C=16, 16x16, k=3, fwd+bwd,
      interleaved rounds) ran 1.06x the reference merged and 1.10x separate (the concatenations and the zero
      blocks cost more than the fewer, larger convolutions save); not measured on a GPU yet.
    CPU layout: with layer_norm off and small weights (at most MERGE_AUTO_MAX_ELEMENTS in all: the `small`
      preset) the fused path runs in channels_last on the CPU (oneDNN's convolutions at these sizes ran 12-13%
      faster in it) and returns channels_last states; its convolution weights are converted once per
      `unroll()` (values and state_dict unchanged). The Moving-MNIST cells (C=128, k=5: 9M weight elements)
      stay planar: there the converted copies and their gradients cost more memory than the fused stages
      save (a B=1 training step peaked at 357 MiB against eager's 294) and the step ran 0.92x.
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool, backend: Optional[str] = None, merge_convs: Optional[bool] = None):
        super().__init__()
        keep_cell_args(self, in_channel, num_hidden, backend, filter_size=filter_size, stride=stride,
                       layer_norm=bool(layer_norm))
        C, k, ln = num_hidden, filter_size, self.layer_norm
        self.padding = k // 2
        if merge_convs and stride != 1:
            raise ValueError(f"merge_convs=True needs stride 1 (the [x, c_t] convolution), got stride={stride}")
        # None = separate convolutions: merged ones measured slower on the CPU at the `small` preset (see the
        # class docstring); choose_merge still refuses merge_convs=True with layer_norm
        self.merge_convs = choose_merge(bool(merge_convs), ln, 0)
        # channels_last on the CPU only where the per-loop weight copies are small (class docstring)
        self._cpu_channels_last = (7 * in_channel + 15 * C) * C * k * k <= MERGE_AUTO_MAX_ELEMENTS
        self.conv_x = conv_block(in_channel, 7 * C, k, stride, ln, height, width)
        self.conv_h = conv_block(C, 4 * C, k, stride, ln, height, width)
        self.conv_c = conv_block(C, 3 * C, k, stride, ln, height, width)
        self.conv_m = conv_block(C, 3 * C, k, stride, ln, height, width)
        self.conv_o = conv_block(2 * C, C, k, stride, ln, height, width)  # unused by the reference's forward
        self.conv_c2m = conv_block(C, 4 * C, k, stride, ln, height, width)
        self.conv_om = conv_block(C, C, k, stride, ln, height, width)
        self.conv_last = nn.Conv2d(2 * C, C, kernel_size=1, stride=1, padding=0, bias=False)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, merge_convs={self.merge_convs}, layer_norm={self.layer_norm}"

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor):
        """h, c, m = cell(x, h, c, m); see the class docstring."""
        check_input(x, self.in_channel, self.conv_x[0].weight)
        shape = state_shape(self, x)
        for name, t in (("h", h), ("c", c), ("m", m)):
            check_state(name, t, "x", x, shape)
        B, C = shape[0], self.num_hidden
        gate_shapes = [(B, k * C) + shape[2:] for k in ((4,) if self.merge_convs else (7, 4, 3))]
        name = fused_backend(_CELL, self.backend, x, gate_shapes, (c,))
        if name == "torch":
            return self._forward_reference(x, h, c, m)
        if name in ("cpp", "cuda") and self._one_node_ok(x):
            return self._forward_one_node(x, h, c, m)
        return self._forward_fused(x, h, c, m)

    # ---- the fused path as one autograd node per step ----------------------------------------------------
    def _one_node_ok(self, x) -> bool:
        """Whether this step can run as one `_CausalStep` node: separate convolutions without LayerNorm, the
        compiled kernels (cpp / cuda), no autocast (its casts belong to the public ops) and not under
        torch.compile (which traces the per-stage ops, whose fake kernels it knows)."""
        dev = x.device.type
        return (not self.layer_norm and not self.merge_convs and not torch.is_autocast_enabled(dev)
                and not torch.compiler.is_compiling())

    def _forward_states(self, x, h, c, m):
        """cell(x, h, c, m) where any of h, c, m may be None: a zero state (a time loop's first step). On the
        one-node path their convolutions are skipped (at t = 0 that is 160 of the cell's 352 output channels
        over the states, ~1.5% of a `small` PredRNN++ training step); elsewhere they become zeros. Modules with
        hooks run as modules, on zeros."""
        if h is not None and c is not None and m is not None:
            return self(x, h, c, m)
        shape = state_shape(self, x)
        for name, t in (("h", h), ("c", c), ("m", m)):
            if t is not None:
                check_state(name, t, "x", x, shape)
        ref = next((t for t in (c, h, m) if t is not None), None)
        if ref is None:
            ref = x.new_zeros(shape)
        hooked = self._forward_hooks or self._forward_pre_hooks or nn.modules.module._global_forward_hooks or \
            nn.modules.module._global_forward_pre_hooks
        if not hooked and type(self).forward is CausalLSTMCell.forward:
            check_input(x, self.in_channel, self.conv_x[0].weight)
            gate_shapes = [(shape[0], k * self.num_hidden) + shape[2:] for k in (7, 4, 3)]
            name = fused_backend(_CELL, self.backend, x, gate_shapes, (ref,))
            if name in ("cpp", "cuda") and self._one_node_ok(x) and \
                    all(t is None or (t.dtype, t.device) == (x.dtype, x.device) for t in (h, c, m)):
                return self._forward_one_node(x, h, c, m)
        h, c, m = (x.new_zeros(shape) if t is None else t for t in (h, c, m))
        return self(x, h, c, m)

    def _forward_one_node(self, x, h, c, m):
        if x.device.type == "cpu" and self._cpu_channels_last:
            # as in _forward_fused; x itself is left as given: the convolution converts it on the fly (and again
            # in backward), so a frame slice is saved as the view it is, not as a channels_last copy per step
            h, c, m = (None if t is None else t.contiguous(memory_format=torch.channels_last) for t in (h, c, m))
        return _CausalStep.apply(x, h, c, m, self.stride, self.padding, self._forget_bias, *self.merged_weights())

    # ---- the fused path --------------------------------------------------------------------------------
    def _derive_merged_weights(self):
        """The fused path's convolution weights (no LayerNorm): merged or the reference's own, channels_last on
        the CPU (a convolution of channels_last input would otherwise copy its NCHW weight on every call)."""
        C = self.num_hidden
        wx, wh, wc, wm, wk, wo, wl = (self.conv_x[0].weight, self.conv_h[0].weight, self.conv_c[0].weight,
                                      self.conv_m[0].weight, self.conv_c2m[0].weight, self.conv_om[0].weight,
                                      self.conv_last.weight)
        if self.merge_convs:
            zero_c = wc.new_zeros((C,) + tuple(wc.shape[1:]))
            zero_x = wx.new_zeros((C,) + tuple(wx.shape[1:]))
            # [4C, in + 2C]: i, f, g over x, h, c; o over x and h (no c term)
            w_xhc = torch.cat((torch.cat((wx[: 3 * C], wx[6 * C:]), 0), wh, torch.cat((wc, zero_c), 0)), 1)
            # [4C, in + C] in conv_c2m's order i', g', f', o: the x terms of i', g', f' (o_x went to w_xhc)
            w_xk = torch.cat((torch.cat((wx[3 * C: 4 * C], wx[5 * C: 6 * C], wx[4 * C: 5 * C], zero_x), 0), wk), 1)
            ws = (w_xhc, wm, w_xk, wo, wl)
        else:
            ws = (wx, wh, wc, wm, wk, wo, wl)
        if wx.device.type == "cpu" and self._cpu_channels_last:
            ws = tuple(w.contiguous(memory_format=torch.channels_last) for w in ws)
        return ws

    def _forward_fused(self, x, h, c, m):
        s, p, fb = self.stride, self.padding, self._forget_bias

        def conv(t, w):
            return F.conv2d(t, w, None, s, p)

        if self.layer_norm:  # the reference's conv -> LayerNorm blocks, planar
            x_g, h_g, c_g = self.conv_x(x), self.conv_h(h), self.conv_c(c)
            conv_m, conv_c2m, conv_om, w_last = self.conv_m, self.conv_c2m, self.conv_om, self.conv_last.weight
        else:
            if x.device.type == "cpu" and self._cpu_channels_last:
                # channels_last on the CPU: oneDNN's convolutions at these sizes ran 12-13% faster in it (the
                # six of a `small` cell step, fwd+bwd, interleaved runs), the fused stages run in it too, and
                # the returned states stay in it, so a time loop converts its inputs once (no copy after that)
                x, h, c, m = (t.contiguous(memory_format=torch.channels_last) for t in (x, h, c, m))
            ws = self.merged_weights()
            if self.merge_convs:
                w_xhc, w_m, w_xk, w_om, w_last = ws
                x_g, h_g, c_g = None, cat_conv_many((x, h, c), w_xhc, s, p), None
            else:
                w_x, w_h, w_c, w_m, w_k, w_om, w_last = ws
                x_g, h_g, c_g = conv(x, w_x), conv(h, w_h), conv(c, w_c)
            conv_m, conv_om = (lambda t: conv(t, w_m)), (lambda t: conv(t, w_om))
            conv_c2m = (lambda t: cat_conv(x, t, w_xk, s, p)) if self.merge_convs else (lambda t: conv(t, w_k))
        # the public ops, not their kernels: they cast by their autocast policy, run the kernel with autocast
        # off, and auto picks by what they are actually handed (fused_backend predicted that choice)
        c_new, carry = causal_lstm_cell(x_g, h_g, c_g, c, fb, backend=self.backend)
        m_new, o_part = causal_lstm_memory(carry, conv_m(m), conv_c2m(c_new), fb, backend=self.backend)
        last = cat_conv(c_new, m_new, w_last, 1, 0)
        h_new = causal_lstm_output(o_part, conv_om(m_new), last, backend=self.backend)
        return h_new, c_new, m_new

    # ---- the reference arithmetic, verbatim ------------------------------------------------------------
    def _forward_reference(self, x, h, c, m):
        C = self.num_hidden
        i_x, f_x, g_x, i_xp, f_xp, g_xp, o_x = torch.split(self.conv_x(x), C, dim=1)
        i_h, f_h, g_h, o_h = torch.split(self.conv_h(h), C, dim=1)
        i_c, f_c, g_c = torch.split(self.conv_c(c), C, dim=1)
        i_m, f_m, m_m = torch.split(self.conv_m(m), C, dim=1)
        i_t = torch.sigmoid(i_x + i_h + i_c)
        f_t = torch.sigmoid(f_x + f_h + f_c + self._forget_bias)
        g_t = torch.tanh(g_x + g_h + g_c)
        c_new = f_t * c + i_t * g_t
        i_c2m, g_c2m, f_c2m, o_c2m = torch.split(self.conv_c2m(c_new), C, dim=1)
        i_tp = torch.sigmoid(i_xp + i_m + i_c2m)
        f_tp = torch.sigmoid(f_xp + f_m + f_c2m + self._forget_bias)
        g_tp = torch.tanh(g_xp + g_c2m)
        m_new = f_tp * torch.tanh(m_m) + i_tp * g_tp
        o_t = torch.tanh(o_x + o_h + o_c2m + self.conv_om(m_new))
        h_new = o_t * torch.tanh(self.conv_last(torch.cat((c_new, m_new), 1)))
        return h_new, c_new, m_new


class _CausalStep(torch.autograd.Function):
    """One Causal LSTM step (separate convolutions, no LayerNorm, compiled kernels) as a single autograd node.

    Why: at the `small` preset (B=4, C=16, 16x16) a step is ~1.5 ms of convolutions and kernels, and the
    per-stage path (three torch.library ops with Python autograd bridges, their public checks and backend
    selection, seven ConvolutionBackward nodes and a _CatConv node) added ~0.5 ms of overhead to each
    forward+backward. Forward and backward are one call each of the compiled compositions
    `vpfast::causal_lstm_step` / `causal_lstm_step_backward` (csrc/causal_lstm.cpp: the stage kernels and
    aten's convolutions called from C++, where the ~25 calls of a step cost ~1-2 us each instead of ~5-8 from
    Python). h, c, m may be None: zero states (a loop's first step), whose convolutions are skipped.

    Saved: x, h, c, m (the step's inputs, alive anyway as frames / earlier states), c_t, m_t (its outputs,
    alive as the next step's states), the weights, the kernels' gates (i, f; i', f', tanh(m̂); o: 6 maps) and
    nothing else: tanh(conv_last([c_t, m_t])) is recomputed in backward (a 1x1 convolution, 2C -> C, plus a
    tanh: ~1% of the step) instead of being kept, one C-sized map per step less than the per-stage ops keep.
    """

    @staticmethod
    def forward(ctx, x, h, c, m, stride, padding, forget_bias, w_x, w_h, w_c, w_m, w_k, w_om, w_last):
        h_new, c_new, m_new, act1, act2, o = torch.ops.vpfast.causal_lstm_step.default(
            x, h, c, m, w_x, w_h, w_c, w_m, w_k, w_om, w_last, stride, padding, forget_bias)
        ctx.save_for_backward(x, h, c, m, c_new, m_new, act1, act2, o, w_x, w_h, w_c, w_m, w_k, w_om, w_last)
        ctx.conv = (stride, padding)
        ctx.set_materialize_grads(False)
        return h_new, c_new, m_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_h, g_c, g_m):
        need = ctx.needs_input_grad
        mask = list(need[:4]) + list(need[7:])
        grads = torch.ops.vpfast.causal_lstm_step_backward.default(g_h, g_c, g_m, *ctx.saved_tensors, *ctx.conv,
                                                                   mask)
        g = [t if n and t.numel() else None for t, n in zip(grads, mask)]
        return (*g[:4], None, None, None, *g[4:])


class _GHUStep(torch.autograd.Function):
    """One GHU step with its merged [x, z] convolution (stride 1) and the compiled stlstm_output kernels
    (cpp / cuda), as a single autograd node.

    Why: the per-op path (a _CatConv node, the public stlstm_output with its checks, backend selection and
    Python autograd bridge, a zero-filled second pre-activation) cost ~0.3 ms of overhead per forward+backward
    at PredRNN++'s `small` preset, a few % of a training step. Forward and backward are the compiled
    compositions `vpfast::causal_lstm_ghu_step` / `causal_lstm_ghu_step_backward` (csrc/causal_lstm.cpp).
    Saved: x, z (alive anyway as the cell's output and the previous highway state), the merged weight, σ(u)
    and tanh(p) (the kernel's o and tl): what the per-op path keeps, without the [x, z] concatenation (rebuilt
    in backward).
    """

    @staticmethod
    def forward(ctx, x, z, padding, w):
        z_new, sg, tp = torch.ops.vpfast.causal_lstm_ghu_step.default(x, z, w, padding)
        ctx.save_for_backward(x, z, w, sg, tp)
        ctx.padding = padding
        return z_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[3]]
        grads = torch.ops.vpfast.causal_lstm_ghu_step_backward.default(g, *ctx.saved_tensors, ctx.padding, mask)
        g_x, g_z, g_w = (t if n and t.numel() else None for t, n in zip(grads, mask))
        return g_x, g_z, None, g_w


class GHU(MergedWeightsMixin, nn.Module):
    """Gradient Highway Unit with OpenSTL's constructor and state_dict.

    GHU(in_channel, num_hidden, height, width, filter_size, stride, layer_norm, initializer=0.001, backend=None,
        merge_convs=None)

    Parameters (C = num_hidden, no biases): z_concat.0.weight [2C, C, k, k] over z and x_concat.0.weight
    [2C, in_channel, k, k] over x, both drawn from U(-initializer, initializer) as the reference does; with
    layer_norm a LayerNorm([2C, height, width]) after each (`.1.*`). OpenSTL declares that LayerNorm over
    [C, height, width], which cannot run on the 2C-channel outputs (its layer_norm configuration raises on the
    first step); no checkpoint exists for it, so this layer builds the working [2C, H, W] norm.

    forward(x: Tensor[B, in_channel, H, W], z: Tensor[B, C, H, W]) -> z_t: Tensor[B, C, H, W]
      [p, u] = x_concat(x) + z_concat(z);  z_t = σ(u) ⊙ tanh(p) + (1 − σ(u)) ⊙ z

    merge_convs (fast backends): with layer_norm off and stride 1, one convolution over [x, z] yields [p, u]
      (exact: the sum happens inside it), its weight assembled from x_concat/z_concat on use (once per time
      loop inside `with ghu.unroll():`); None = merge when that weight is small (as CausalLSTMCell). Merged, on
      the compiled kernels and outside autocast and torch.compile, the step is one autograd node (`_GHUStep`).
    """

    def __init__(self, in_channel: int, num_hidden: int, height: int, width: int, filter_size: int, stride: int,
                 layer_norm: bool, initializer: float = 0.001, backend: Optional[str] = None,
                 merge_convs: Optional[bool] = None):
        super().__init__()
        keep_cell_args(self, in_channel, num_hidden, backend, filter_size=filter_size, stride=stride,
                       layer_norm=bool(layer_norm))
        C, k = num_hidden, filter_size
        if merge_convs and stride != 1:
            raise ValueError(f"merge_convs=True needs stride 1 (the [x, z] convolution), got stride={stride}")
        self.merge_convs = choose_merge(merge_convs, self.layer_norm, 2 * C * (in_channel + C) * k * k) \
            and stride == 1
        self.z_concat = conv_block(C, 2 * C, k, stride, self.layer_norm, height, width)
        self.x_concat = conv_block(in_channel, 2 * C, k, stride, self.layer_norm, height, width)
        if initializer:
            for conv in (self.z_concat[0], self.x_concat[0]):
                nn.init.uniform_(conv.weight, -initializer, initializer)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, merge_convs={self.merge_convs}, layer_norm={self.layer_norm}"

    def _derive_merged_weights(self):
        return torch.cat((self.x_concat[0].weight, self.z_concat[0].weight), 1)  # [2C, in + C]: p, u over [x, z]

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z_t = ghu(x, z); see the class docstring."""
        check_input(x, self.in_channel, self.x_concat[0].weight)
        shape = state_shape(self, x)
        check_state("z", z, "x", x, shape)
        name = fused_backend(_STLSTM_OUTPUT, self.backend, x, [shape] * 3, (z,))
        if name == "torch":
            p, u = torch.split(self.x_concat(x) + self.z_concat(z), self.num_hidden, dim=1)
            u = torch.sigmoid(u)
            return u * torch.tanh(p) + (1 - u) * z
        if self.merge_convs and name in ("cpp", "cuda") and not torch.is_autocast_enabled(x.device.type) \
                and not torch.compiler.is_compiling():
            return _GHUStep.apply(x, z, self.filter_size // 2, self.merged_weights())
        if self.merge_convs:
            p, u = torch.split(cat_conv(x, z, self.merged_weights(), self.stride, self.filter_size // 2),
                               self.num_hidden, dim=1)
            # the op sums two pre-activations of the gate; the merged convolution gave the whole sum
            z_new = stlstm_output(u, torch.zeros_like(u), p, z, backend=self.backend)
            if x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
                # next to channels_last Causal LSTM cells (their CPU layout): hand z on in it, so that the cell
                # and this unit's next step keep one copy of it for backward, not one per layout
                z_new = z_new.contiguous(memory_format=torch.channels_last)
            return z_new
        # the same sums, split before adding: u = u_x + u_z inside the op, p = p_x + p_z here
        p_x, u_x = torch.split(self.x_concat(x), self.num_hidden, dim=1)
        p_z, u_z = torch.split(self.z_concat(z), self.num_hidden, dim=1)
        return stlstm_output(u_x, u_z, p_x + p_z, z, backend=self.backend)
