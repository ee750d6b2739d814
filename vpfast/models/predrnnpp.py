"""PredRNN++ (OpenSTL): stacked Causal LSTM cells with a Gradient Highway Unit between layers 0 and 1,
MODELS.md §10. The loop, patching, sampling masks and loss are PredRNN's (MODELS.md §3)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .recurrent import _Recurrent
from ._layers import GHU, CausalLSTMCell


class PredRNNpp(_Recurrent):
    """PredRNN++ (OpenSTL PredRNNpp_Model).

    PredRNNpp(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, num_hidden="128,128,128,128",
              filter_size=5, stride=1, patch_size=4, layer_norm=False, scheduled_sampling=True,
              sampling_stop_iter=50000, sampling_start_value=1.0, sampling_changing_rate=2e-5,
              reverse_scheduled_sampling=False, r_sampling_step_1=25000, r_sampling_step_2=50000,
              r_exp_alpha=5000, backend=None)

    Per step: cell 0 on the input frame, z = GHU(h^0_t, z), cell 1 on z, cells 2..L-1 on the layer below;
    one spatiotemporal memory (num_hidden[0] channels) zig-zags through all cells as in PredRNN; the
    prediction is conv_last(h^{L-1}_t). Needs at least 2 layers and equal num_hidden.
    layer_norm=True builds the cells' LayerNorms as OpenSTL does and the GHU's over [2C, H, W] (OpenSTL's
    own layer_norm configuration cannot run, see vpfast.nn.GHU).
    """

    name = "predrnnpp"

    def __init__(self, backend: Optional[str] = None, **config):
        super().__init__(backend=backend, **config)
        self._same_hidden()
        if self.num_layers < 2:
            raise ValueError(f"PredRNN++ needs at least 2 layers (the gradient highway sits between layers 0 and "
                             f"1), got num_hidden={self.num_hidden}")
        nh, k, s, ln = self.num_hidden, self.config["filter_size"], self.config["stride"], self.config["layer_norm"]
        Hp, Wp = self.patch_height, self.patch_width
        # registered first: the reference's state_dict lists gradient_highway before cell_list
        self.gradient_highway = GHU(nh[0], nh[0], Hp, Wp, k, s, ln, backend=self.backend)
        self.cell_list = nn.ModuleList(
            CausalLSTMCell(self.frame_channel if i == 0 else nh[i - 1], nh[i], Hp, Wp, k, s, ln,
                           backend=self.backend) for i in range(self.num_layers))
        self.conv_last = nn.Conv2d(nh[-1], self.frame_channel, 1, bias=False)

    def _rollout(self, frames, mask, with_aux, first_output=0):
        B, _, _, Hp, Wp = frames.shape
        h = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        c = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        memory = frames.new_zeros(B, self.num_hidden[0], Hp, Wp)
        z = frames.new_zeros(B, self.num_hidden[0], Hp, Wp)
        preds, x_gen = [], None
        # merged convolution weights (fast backends) derived once for the whole time loop
        cells = self.cell_list
        with self._unrolled(), self.gradient_highway.unroll():
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                if t == 0:  # zero states: the fast cells skip their convolutions
                    h[0], c[0], memory = cells[0]._forward_states(net, None, None, None)
                else:
                    h[0], c[0], memory = cells[0](net, h[0], c[0], memory)
                z = self.gradient_highway(h[0], z)
                for i in range(1, self.num_layers):
                    x_in = z if i == 1 else h[i - 1]
                    if t == 0:
                        h[i], c[i], memory = cells[i]._forward_states(x_in, None, None, memory)
                    else:
                        h[i], c[i], memory = cells[i](x_in, h[i], c[i], memory)
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        return torch.stack(preds, dim=1), {}
