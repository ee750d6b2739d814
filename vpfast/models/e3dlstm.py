"""E3D-LSTM: Eidetic 3D LSTM (OpenSTL), MODELS.md §12. The loop, patching and sampling masks are PredRNN's
(MODELS.md §3); the loss adds an L1 term."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base
from .recurrent import _Recurrent
from ..nn.e3dlstm import Eidetic3DLSTMCell


class E3DLSTM(_Recurrent):
    """E3D-LSTM (OpenSTL E3DLSTM_Model).

    E3DLSTM(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, num_hidden="128,128,128,128",
            filter_size=5, stride=1, patch_size=4, layer_norm=False, scheduled sampling options...,
            update_memory=False, backend=None)

    Fixed as in OpenSTL: a temporal window of 2 frames (layer 0 sees [x̃_{t-1}, x̃_t], x̃_{-1} = 0), cell kernel
    (2, 5, 5); filter_size is accepted and, as in OpenSTL, unused. Each layer attends over its own history of
    cell states [0, c_0, ..., c_{t-1}]; the prediction is a (2, 1, 1) Conv3d with stride (2, 1, 1) over the
    top layer's h. Training loss: MSE + L1 over all T_total - 1 patch-space predictions.
    update_memory: see vpfast.nn.Eidetic3DLSTMCell (False reproduces OpenSTL: the global memory stays zero).
    layer_norm must be False.
    """

    name = "e3dlstm"
    window_length = 2
    window_stride = 1
    kernel = (2, 5, 5)

    def __init__(self, update_memory: bool = False, backend: Optional[str] = None, **config):
        super().__init__(extra=dict(update_memory=bool(update_memory)), backend=backend, **config)
        self._same_hidden()
        if self.config["layer_norm"]:
            raise ValueError("E3D-LSTM supports layer_norm=False only (OpenSTL's configurations; the cell's "
                             "_norm_c_t is always on)")
        nh, Hp, Wp = self.num_hidden, self.patch_height, self.patch_width
        self.cell_list = nn.ModuleList(
            Eidetic3DLSTMCell(self.frame_channel if i == 0 else nh[i - 1], nh[i], self.window_length, Hp, Wp,
                              self.kernel, self.config["stride"], False, update_memory=bool(update_memory),
                              backend=self.backend) for i in range(self.num_layers))
        self.conv_last = nn.Conv3d(nh[-1], self.frame_channel, kernel_size=(self.window_length, 1, 1),
                                   stride=(self.window_length, 1, 1), padding=0, bias=False)

    def _check_spatial(self, H, W, what):
        _, _, H0, W0 = self.config["in_shape"]
        if (H, W) != (H0, W0):
            raise ValueError(f"{what} must be {H0}x{W0}: the cells' LayerNorm is built for in_shape, got {H}x{W}")

    def _rollout(self, frames, mask, with_aux, first_output=0):
        B, _, _, Hp, Wp = frames.shape
        win = self.window_length
        shape = lambda n: (B, n, win, Hp, Wp)  # noqa: E731
        h = [frames.new_zeros(shape(n)) for n in self.num_hidden]
        c = [frames.new_zeros(shape(n)) for n in self.num_hidden]
        memory = frames.new_zeros(shape(self.num_hidden[0]))
        history = [None] * self.num_layers
        inputs = [frames.new_zeros(frames.shape[:1] + frames.shape[2:]) for _ in range(win - 1)]
        preds, x_gen = [], None
        for t in range(self.total_length - 1):
            net = self._step_input(t, frames, mask, x_gen)
            inputs.append(net)
            window = torch.stack(inputs[-win:], dim=2)  # [B, p*p*C, win, H, W], oldest first
            for i in range(self.num_layers):
                # each layer's history grows by its previous cell state (the zero initial state included)
                history[i] = c[i] if history[i] is None else torch.cat([history[i], c[i]], dim=1)
                inp = window if i == 0 else h[i - 1]
                h[i], c[i], memory = self.cell_list[i](inp, h[i], c[i], memory, history[i])
            if t >= first_output or mask is not None:
                x_gen = self.conv_last(h[-1]).squeeze(2)
                preds.append(x_gen)
        return torch.stack(preds, dim=1), {}

    def training_loss(self, frames: torch.Tensor, itr: int = 0, generator: Optional[torch.Generator] = None):
        """frames: Tensor[B, pre + aft, C, H, W], itr: global training iteration (0-based) -> (loss, logs):
        MSE + L1 over all T_total - 1 predictions in patch space, with the scheduled-sampling mask of `itr`."""
        self.check_frames(frames, self.total_length, "frames")
        patched = _base.patch(frames, self.patch_size)
        mask, logs = self.sampling_mask(frames.shape[0], itr, frames, generator)
        preds, _ = self._rollout(patched, mask, True)
        mse = F.mse_loss(preds, patched[:, 1:])
        l1 = F.l1_loss(preds, patched[:, 1:])
        loss = mse + l1
        logs.update(mse=mse.item(), l1=l1.item(), loss=loss.item())
        return loss, logs
