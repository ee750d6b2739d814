"""MIM: Memory In Memory (OpenSTL), MODELS.md §11. The loop, patching, sampling masks and loss are PredRNN's
(MODELS.md §3)."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from . import _base
from ..nn import _mim_step
from ..nn._recurrent import fused_backend
from ..ops.convlstm import OP as _CONVLSTM
from ..ops.stlstm import GATES as _GATES
from .recurrent import _Recurrent
from ._layers import MIMN, MIMBlock, SpatioTemporalLSTMCell


def _loop_steps(model, x0: torch.Tensor, h0: torch.Tensor):
    """(steps of stlstm_layer 0..L-1, steps of stlstm_layer_diff 0..L-2) for one unrolled loop, called inside
    the cells' `unroll()`: nn/_mim_step.py's one-node Functions with this loop's merged weights bound when every
    cell qualifies (`_mim_step.usable`; layer 0 also: variant "predrnn", no layer norm), else the modules
    themselves. Deciding once per loop also skips the modules' per-step argument checks and backend choice (the
    model builds the states itself). x0: a step input, h0: a state (Tensor[B, C, H, W])."""
    layers, diffs = list(model.stlstm_layer), list(model.stlstm_layer_diff)
    cell0 = layers[0]
    kinds = [type(c) for c in layers] == [SpatioTemporalLSTMCell] + [MIMBlock] * (len(layers) - 1) and \
        all(type(c) is MIMN for c in diffs)
    # module hooks see every step only through the modules' own calls
    hooked = any(c._forward_hooks or c._forward_pre_hooks for c in layers + diffs) or \
        torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
    if not kinds or hooked or not (cell0.variant == "predrnn" and not cell0.layer_norm and
                                   all(c.stride == 1 for c in layers + diffs)):
        return layers, diffs
    B, C, H, W = h0.shape
    gates = [(B, 4 * C, H, W), (B, 3 * C, H, W)]
    names = [fused_backend(_GATES, cell.backend, x0, gates, (h0, h0)) for cell in layers]
    names += [fused_backend(_CONVLSTM, cell.backend, h0, gates[:1], (h0,)) for cell in diffs]
    tensors = [x0, h0, *model.parameters()]
    if not all(_mim_step.usable(n, cell.merge_convs, tensors) for n, cell in zip(names, layers + diffs)):
        return layers, diffs
    bind, one = _mim_step.bind, (1, 1)
    w_xh, w_xm = cell0.merged_weights()
    steps = [bind(_mim_step.STLSTMStep, w_xh, w_xm, cell0.conv_o[0].weight, cell0.conv_last.weight, one,
                  (cell0.padding,) * 2, cell0._forget_bias)]
    for b in layers[1:]:
        (w_mims,), w_x, w_s = b.merged_weights()
        steps.append(bind(_mim_step.MIMBlockStep, w_x, w_s, b.conv_t_cc[0].weight, w_mims, b.ct_weight,
                          b.oc_weight, b.conv_last.weight, one, (b.filter_size // 2,) * 2, b._forget_bias))
    diff_steps = [bind(_mim_step.MIMNStep, n.merged_weights()[0], n.ct_weight, n.oc_weight, one,
                       (n.filter_size // 2,) * 2, n._forget_bias) for n in diffs]
    return steps, diff_steps


class MIM(_Recurrent):
    """MIM (OpenSTL MIM_Model): an ST-LSTM cell (`stlstm_layer.0`), then MIM blocks (`stlstm_layer.1..L-1`) fed
    by a stack of MIM-N modules (`stlstm_layer_diff.0..L-2`) over the differences of layer 0's hidden state.

    MIM(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, num_hidden="128,128,128,128",
        filter_size=5, stride=1, patch_size=4, layer_norm=False, scheduled sampling options..., s_bptt=False,
        backend=None)

    The MIM-S state S of every block starts at zero on every call. OpenSTL keeps S on the module instead and
    carries it from one batch to the next (train, then validation, then test), so there the same input twice
    gives two outputs and a new batch size fails; its published numbers were computed that way. To reproduce
    that exactly, thread the state yourself: `preds, s = model.rollout_with_state(frames, mask, s)`.
    s_bptt: False (OpenSTL) detaches S at every step, so no gradient flows through it across steps; True
      back-propagates through S over the whole sequence, as the original TensorFlow code did.
    layer_norm must be False (OpenSTL's MIM configurations); the maps must have in_shape's size (the
    peephole weights are per position).
    """

    name = "mim"

    def __init__(self, s_bptt: bool = False, backend: Optional[str] = None, **config):
        super().__init__(extra=dict(s_bptt=bool(s_bptt)), backend=backend, **config)
        self._same_hidden()
        if self.num_layers < 2:
            raise ValueError(f"MIM needs at least 2 layers (MIM blocks follow the first ST-LSTM layer), got "
                             f"num_hidden={self.num_hidden}")
        if self.config["layer_norm"]:
            raise ValueError("MIM supports layer_norm=False only (OpenSTL's MIM configurations)")
        nh, k, s = self.num_hidden, self.config["filter_size"], self.config["stride"]
        Hp, Wp, L = self.patch_height, self.patch_width, self.num_layers
        layers = [SpatioTemporalLSTMCell(self.frame_channel, nh[0], Hp, Wp, k, s, False, backend=self.backend)]
        layers += [MIMBlock(nh[i - 1], nh[i], Hp, Wp, k, s, False, backend=self.backend) for i in range(1, L)]
        self.stlstm_layer = nn.ModuleList(layers)
        self.stlstm_layer_diff = nn.ModuleList(MIMN(nh[i], nh[i + 1], Hp, Wp, k, s, False, backend=self.backend)
                                               for i in range(L - 1))
        self.conv_last = nn.Conv2d(nh[-1], self.frame_channel, 1, bias=False)

    def _check_spatial(self, H, W, what):
        _, _, H0, W0 = self.config["in_shape"]
        if (H, W) != (H0, W0):
            raise ValueError(f"{what} must be {H0}x{W0}: MIM's peephole weights are built for in_shape, got {H}x{W}")

    def _state_shape(self, frames):
        B, _, _, Hp, Wp = frames.shape
        return (B, self.num_hidden[0], Hp, Wp)

    def initial_s_state(self, frames: torch.Tensor) -> list:
        """Zero MIM-S states for `frames` (patched, Tensor[B, T, p*p*C, H/p, W/p]): one per MIM block."""
        return [frames.new_zeros(self._state_shape(frames)) for _ in range(self.num_layers - 1)]

    def _run(self, frames, mask, first_output, s_state):
        B, _, _, Hp, Wp = frames.shape
        L, bptt = self.num_layers, self.config["s_bptt"]
        h = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        c = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        hd = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden[1:]]
        cd = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden[1:]]
        memory = frames.new_zeros(B, self.num_hidden[0], Hp, Wp)
        s = list(s_state) if s_state is not None else self.initial_s_state(frames)
        if not bptt:
            s = [t.detach() for t in s]
        preds, x_gen = [], None
        with contextlib.ExitStack() as unrolled:  # every cell's derived weights, once per loop
            for cell in (*self.stlstm_layer, *self.stlstm_layer_diff):
                unrolled.enter_context(cell.unroll())
            cells, diffs = _loop_steps(self, frames[:, 0], h[0])
            fast = not isinstance(cells[0], nn.Module)  # the one-node steps (bound Functions)
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                h_prev = h[0]
                h[0], c[0], memory = cells[0](net, h[0], c[0], memory)
                for i in range(1, L):
                    # OpenSTL also runs the MIM-N on zeros at t = 0 and discards the result: D stays 0 there
                    if t > 0:
                        d_in = h[0] - h_prev if i == 1 else hd[i - 2]
                        hd[i - 1], cd[i - 1] = diffs[i - 1](d_in, hd[i - 1], cd[i - 1])
                    if t == 0 and fast:  # zero D, h, c (and S unless given): the one-node step skips their convolutions
                        s0 = s[i - 1] if s_state is not None else None
                        h[i], c[i], memory, s[i - 1] = cells[i](h[i - 1], None, None, None, memory, s0)
                    else:
                        h[i], c[i], memory, s[i - 1] = cells[i](h[i - 1], hd[i - 1], h[i], c[i], memory, s[i - 1])
                    if not bptt:
                        s[i - 1] = s[i - 1].detach()
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        return torch.stack(preds, dim=1), s

    def _rollout(self, frames, mask, with_aux, first_output=0):
        return self._run(frames, mask, first_output, None)[0], {}

    def rollout_with_state(self, frames: torch.Tensor, mask: Optional[torch.Tensor] = None,
                           s_state: Optional[Sequence[torch.Tensor]] = None):
        """`rollout` starting the MIM-S states from `s_state` (a list of L-1 Tensor[B, C, H/p, W/p], None =
        zeros); returns (predictions, the final MIM-S states). Passing each call's final states to the next
        reproduces OpenSTL's carried state (detached between calls unless s_bptt)."""
        self._check_mask(mask, frames)
        if s_state is not None:
            s_state = list(s_state)
            if len(s_state) != self.num_layers - 1:
                raise ValueError(f"s_state must hold {self.num_layers - 1} tensors (one per MIM block), got "
                                 f"{len(s_state)}")
            want = self._state_shape(frames)
            for j, t in enumerate(s_state):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                    raise ValueError(f"s_state[{j}] must be a Tensor of shape {want}, got "
                                     f"{getattr(t, 'shape', type(t).__name__)}")
        return self._run(frames, mask, 0, s_state)

    def forward_with_state(self, x: torch.Tensor, s_state: Optional[Sequence[torch.Tensor]] = None):
        """`forward` (test-time prediction) starting the MIM-S states from `s_state`; returns (Tensor[B, aft, C,
        H, W], the final states)."""
        self.check_frames(x, self.pre_seq_length, "x")
        p = self.patch_size
        patched = _base.patch(x, p)
        if s_state is not None:
            s_state = list(s_state)
        preds, s = self._run(patched, None, self.pre_seq_length - 1, s_state)
        return _base.unpatch(preds, p, x.shape[2]), s
