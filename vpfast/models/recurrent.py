"""Recurrent models: ConvLSTM, PredRNN, PredRNN-v2 (OpenSTL) and MotionRNN (thuml), MODELS.md §1-§4.

All four run the reference's loop in patch space: frames [B, T, C, H, W] are patched to
[B, T, p*p*C, H/p, W/p]; T_total - 1 steps each emit a next-frame prediction through `conv_last`; the input
at a step is the true frame or the model's last prediction according to the (reverse) scheduled-sampling
mask. `rollout` is that training-time forward; `forward(x)` is the reference's test-time prediction
(observed frames fed for t < pre_seq_length, own predictions afterwards).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base
from ._layers import ConvLSTMCell, MotionGRU, SpatioTemporalLSTMCell


class _Recurrent(_base.VideoPredictionModel):
    """Shared configuration, sampling masks, loss and test-time prediction of the recurrent models."""

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None,
                 num_hidden="128,128,128,128", filter_size=5, stride=1, patch_size=4, layer_norm=False,
                 scheduled_sampling=True, sampling_stop_iter=50000, sampling_start_value=1.0,
                 sampling_changing_rate=2e-5, reverse_scheduled_sampling=False, r_sampling_step_1=25000,
                 r_sampling_step_2=50000, r_exp_alpha=5000, extra: Optional[dict] = None,
                 backend: Optional[str] = None):
        super().__init__()
        T, C, H, W = _base.as_shape(in_shape)
        pre = T if pre_seq_length is None else _base.positive_int("pre_seq_length", pre_seq_length)
        aft = pre if aft_seq_length is None else _base.positive_int("aft_seq_length", aft_seq_length)
        nh = _base.as_int_list("num_hidden", num_hidden)
        _base.positive_int("filter_size", filter_size)
        _base.positive_int("patch_size", patch_size)
        if filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd (padding filter_size // 2 keeps the map size), got "
                             f"{filter_size}")
        if stride != 1:
            raise ValueError(f"stride must be 1: the reference models keep the state maps at the input size "
                             f"(got {stride})")
        if H % patch_size or W % patch_size:
            raise ValueError(f"in_shape height and width ({H}x{W}) must be divisible by patch_size={patch_size}")
        cfg = dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, num_hidden=nh,
                   filter_size=filter_size, stride=stride, patch_size=patch_size, layer_norm=bool(layer_norm),
                   scheduled_sampling=bool(scheduled_sampling), sampling_stop_iter=int(sampling_stop_iter),
                   sampling_start_value=float(sampling_start_value),
                   sampling_changing_rate=float(sampling_changing_rate),
                   reverse_scheduled_sampling=bool(reverse_scheduled_sampling),
                   r_sampling_step_1=int(r_sampling_step_1), r_sampling_step_2=int(r_sampling_step_2),
                   r_exp_alpha=float(r_exp_alpha))
        cfg.update(extra or {})
        self._init_config(cfg, backend)
        self.num_layers = len(nh)
        self.num_hidden = nh
        self.patch_size = patch_size
        self.frame_channel = patch_size * patch_size * C
        self.patch_height, self.patch_width = H // patch_size, W // patch_size

    # ---- checks -------------------------------------------------------------------------------------
    def _spatial_divisor(self):
        return self.patch_size, f"patch_size={self.patch_size}"

    def _same_hidden(self):
        if len(set(self.num_hidden)) != 1:
            raise ValueError(f"{type(self).__name__} needs equal num_hidden in all layers (the spatiotemporal "
                             f"memory passes through every layer), got {self.num_hidden}")

    # ---- sampling -----------------------------------------------------------------------------------
    @property
    def total_length(self) -> int:
        return self.pre_seq_length + self.aft_seq_length

    def sampling_mask(self, batch: int, itr: int, like: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        """The training-time input mask at iteration `itr`: Tensor[B, n, 1, 1, 1] of 0/1 (1 = feed the true
        frame), n = aft - 1 for scheduled sampling (entry t - pre drives step t >= pre) and total - 2 for
        reverse scheduled sampling (entry t - 1 drives step t >= 1); plus the probabilities used."""
        cfg = self.config
        pre, aft, total = self.pre_seq_length, self.aft_seq_length, self.total_length
        if cfg["reverse_scheduled_sampling"]:
            r_eta, eta = _base.reverse_sampling_probs(itr, cfg["r_sampling_step_1"], cfg["r_sampling_step_2"],
                                                      cfg["r_exp_alpha"])
            r = _base.bernoulli_mask(batch, pre - 1, r_eta, like, generator)
            f = _base.bernoulli_mask(batch, aft - 1, eta, like, generator)
            return torch.cat([r, f], dim=1), {"r_eta": r_eta, "eta": eta}
        if not cfg["scheduled_sampling"]:
            return like.new_zeros((batch, aft - 1, 1, 1, 1)), {"eta": 0.0}
        eta = _base.scheduled_sampling_eta(itr, cfg["sampling_stop_iter"], cfg["sampling_start_value"],
                                           cfg["sampling_changing_rate"])
        return _base.bernoulli_mask(batch, aft - 1, eta, like, generator), {"eta": eta}

    def test_mask(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The reference's test-time mask (for `rollout`): 0 for every predicted step; with reverse scheduled
        sampling 1 for the first pre - 1 entries."""
        if self.config["reverse_scheduled_sampling"]:
            m = like.new_zeros((batch, self.total_length - 2, 1, 1, 1))
            m[:, : self.pre_seq_length - 1] = 1.0
            return m
        return like.new_zeros((batch, self.aft_seq_length - 1, 1, 1, 1))

    def _step_input(self, t: int, frames: torch.Tensor, mask: Optional[torch.Tensor], x_gen):
        pre = self.pre_seq_length
        if mask is None:  # test time: observed frames, then the model's own predictions
            return frames[:, t] if t < pre else x_gen
        if self.config["reverse_scheduled_sampling"]:
            if t == 0:
                return frames[:, 0]
            mk = mask[:, t - 1]
        else:
            if t < pre:
                return frames[:, t]
            mk = mask[:, t - pre]
        return mk * frames[:, t] + (1 - mk) * x_gen

    def _check_mask(self, mask, frames):
        if mask is None:
            return
        n = self.total_length - 2 if self.config["reverse_scheduled_sampling"] else self.aft_seq_length - 1
        if not isinstance(mask, torch.Tensor) or mask.dim() != 5 or mask.shape[0] != frames.shape[0] \
                or mask.shape[1] != n:
            raise ValueError(f"mask must be Tensor[B={frames.shape[0]}, {n}, 1|C', 1|H', 1|W'], got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        if frames.shape[1] < self.total_length:
            raise ValueError(f"with a mask, frames must hold all {self.total_length} frames, got {frames.shape[1]}")

    @contextlib.contextmanager
    def _unrolled(self):
        """Let every cell derive its merged convolution weights once for the whole time loop (eager only: Dynamo
        cannot trace ExitStack, and the cells' unroll() does nothing under torch.compile)."""
        if torch.compiler.is_compiling():
            yield
            return
        with contextlib.ExitStack() as stack:
            for cell in self.cell_list:
                if hasattr(cell, "unroll"):
                    stack.enter_context(cell.unroll())
            yield

    # ---- public -------------------------------------------------------------------------------------
    def rollout(self, frames: torch.Tensor, mask: Optional[torch.Tensor] = None, with_aux: bool = False):
        """The reference's training-time forward, in patch space.

        frames: Tensor[B, T, p*p*C, H/p, W/p] (patched, see `vpfast.models.patch`; T = pre + aft when a mask
        is given, else at least pre); mask: Tensor[B, n, ...] from `sampling_mask` / `test_mask`, or None
        for test-time feeding. Returns the T_total - 1 next-frame predictions Tensor[B, T_total - 1, p*p*C,
        H/p, W/p] (and a dict of auxiliary losses when with_aux).
        """
        self._check_mask(mask, frames)
        preds, aux = self._rollout(frames, mask, with_aux)
        return (preds, aux) if with_aux else preds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> Tensor[B, aft_seq_length, C, H, W] (test-time)."""
        self.check_frames(x, self.pre_seq_length, "x")
        preds, _ = self._rollout(_base.patch(x, self.patch_size), None, False,
                                 first_output=self.pre_seq_length - 1)
        return _base.unpatch(preds, self.patch_size, x.shape[2])

    def training_loss(self, frames: torch.Tensor, itr: int = 0, generator: Optional[torch.Generator] = None):
        """frames: Tensor[B, pre + aft, C, H, W], itr: global training iteration (0-based) -> (loss, logs).

        MSE over all T_total - 1 predictions in patch space (+ decouple_beta * decoupling loss for
        PredRNN-v2), with the scheduled-sampling mask of iteration `itr`.
        """
        self.check_frames(frames, self.total_length, "frames")
        patched = _base.patch(frames, self.patch_size)
        mask, logs = self.sampling_mask(frames.shape[0], itr, frames, generator)
        preds, aux = self._rollout(patched, mask, True)
        mse = F.mse_loss(preds, patched[:, 1:])
        loss = mse
        logs["mse"] = mse.item()
        for k, (v, w) in aux.items():
            loss = loss + w * v
            logs[k] = v.item()
        logs["loss"] = loss.item()
        return loss, logs


class ConvLSTM(_Recurrent):
    """ConvLSTM (OpenSTL). ConvLSTM(in_shape, pre_seq_length, aft_seq_length, num_hidden, filter_size,
    stride, patch_size, layer_norm, scheduled sampling options..., tanh_c=True, backend=None).

    tanh_c=True is OpenSTL's current cell (h = o * tanh(c)); False is the cell of OpenSTL <= v0.3.0
    (h = o * g) that produced the published Moving-MNIST ConvLSTM numbers.
    """

    name = "convlstm"

    def __init__(self, tanh_c: bool = True, backend: Optional[str] = None, **config):
        super().__init__(extra=dict(tanh_c=bool(tanh_c)), backend=backend, **config)
        cells = []
        for i, nh in enumerate(self.num_hidden):
            cin = self.frame_channel if i == 0 else self.num_hidden[i - 1]
            cells.append(ConvLSTMCell(cin, nh, self.patch_height, self.patch_width, self.config["filter_size"],
                                      self.config["stride"], self.config["layer_norm"], tanh_c=bool(tanh_c),
                                      backend=self.backend))
        self.cell_list = nn.ModuleList(cells)
        self.conv_last = nn.Conv2d(self.num_hidden[-1], self.frame_channel, 1, bias=False)

    def _rollout(self, frames, mask, with_aux, first_output=0):
        B, _, _, Hp, Wp = frames.shape
        h = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        c = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        preds, x_gen = [], None
        with self._unrolled():
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                h[0], c[0] = self.cell_list[0](net, h[0], c[0])
                for i in range(1, self.num_layers):
                    h[i], c[i] = self.cell_list[i](h[i - 1], h[i], c[i])
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        return torch.stack(preds, dim=1), {}


class PredRNN(_Recurrent):
    """PredRNN (OpenSTL): stacked ST-LSTM cells with the zig-zag spatiotemporal memory.

    PredRNN(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, num_hidden="128,128,128,128",
            filter_size=5, stride=1, patch_size=4, layer_norm=False, scheduled_sampling=True,
            sampling_stop_iter=50000, sampling_start_value=1.0, sampling_changing_rate=2e-5,
            reverse_scheduled_sampling=False, r_sampling_step_1=25000, r_sampling_step_2=50000,
            r_exp_alpha=5000, backend=None)
    """

    name = "predrnn"
    _variant = "predrnn"

    def __init__(self, backend: Optional[str] = None, extra: Optional[dict] = None, **config):
        super().__init__(extra=extra, backend=backend, **config)
        self._same_hidden()
        cells = []
        for i, nh in enumerate(self.num_hidden):
            cin = self.frame_channel if i == 0 else self.num_hidden[i - 1]
            cells.append(SpatioTemporalLSTMCell(cin, nh, self.patch_height, self.patch_width,
                                                self.config["filter_size"], self.config["stride"],
                                                self.config["layer_norm"], variant=self._variant,
                                                backend=self.backend))
        self.cell_list = nn.ModuleList(cells)
        self.conv_last = nn.Conv2d(self.num_hidden[-1], self.frame_channel, 1, bias=False)

    def _rollout(self, frames, mask, with_aux, first_output=0):
        B, _, _, Hp, Wp = frames.shape
        h = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        c = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        memory = frames.new_zeros(B, self.num_hidden[0], Hp, Wp)
        preds, x_gen = [], None
        with self._unrolled():
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                h[0], c[0], memory = self.cell_list[0](net, h[0], c[0], memory)
                for i in range(1, self.num_layers):
                    h[i], c[i], memory = self.cell_list[i](h[i - 1], h[i], c[i], memory)
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        return torch.stack(preds, dim=1), {}


class PredRNNv2(PredRNN):
    """PredRNN-v2 (OpenSTL): PredRNN with the decoupling loss (shared 1x1 `adapter` on the cells' Δc, Δm,
    weight decouple_beta) and, in its published configuration, reverse scheduled sampling."""

    name = "predrnnv2"
    _variant = "predrnnv2"

    def __init__(self, decouple_beta: float = 0.1, backend: Optional[str] = None, **config):
        config.setdefault("reverse_scheduled_sampling", True)
        super().__init__(extra=dict(decouple_beta=float(decouple_beta)), backend=backend, **config)
        C = self.num_hidden[0]
        self.adapter = nn.Conv2d(C, C, 1, bias=False)

    def _decouple_term(self, delta_c, delta_m):
        B, C = delta_c.shape[:2]
        if self.backend == "torch":  # the reference's arithmetic verbatim
            dc = F.normalize(self.adapter(delta_c).view(B, C, -1), dim=2)
            dm = F.normalize(self.adapter(delta_m).view(B, C, -1), dim=2)
            return torch.mean(torch.abs(torch.cosine_similarity(dc, dm, dim=2)))
        # one adapter convolution for both; cosine of the L2-normalised maps = their dot product
        a = self.adapter(torch.cat([delta_c, delta_m], dim=0)).view(2, B, C, -1)
        a = F.normalize(a, dim=3)
        return (a[0] * a[1]).sum(dim=2).abs().mean()

    def _rollout(self, frames, mask, with_aux, first_output=0):
        B, _, _, Hp, Wp = frames.shape
        h = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        c = [frames.new_zeros(B, n, Hp, Wp) for n in self.num_hidden]
        memory = frames.new_zeros(B, self.num_hidden[0], Hp, Wp)
        preds, x_gen, decouple = [], None, []
        with self._unrolled():
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                for i in range(self.num_layers):
                    inp = net if i == 0 else h[i - 1]
                    h[i], c[i], memory, delta_c, delta_m = self.cell_list[i](inp, h[i], c[i], memory)
                    if with_aux:
                        decouple.append(self._decouple_term(delta_c, delta_m))
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        aux = {}
        if with_aux:
            aux["decouple"] = (torch.stack(decouple).mean(), self.config["decouple_beta"])
        return torch.stack(preds, dim=1), aux


class MotionRNN(_Recurrent):
    """MotionRNN-PredRNN (thuml): ST-LSTM cells with the motion highway; layers 0..L-2 carry a MotionGRU at
    half resolution between `enc_list` (k x k stride-2 conv, nh -> nh/4) and `dec_list` (ConvTranspose2d
    4/2/1), fused back by `gate_list`.

    random_init=False (default) starts every state at zero; True draws them like the reference (Xavier
    normal on every forward, h and c of a layer the same draw, offset F and trend D the same draw).
    Only ordinary scheduled sampling.
    """

    name = "motionrnn"

    def __init__(self, random_init: bool = False, backend: Optional[str] = None, **config):
        if config.get("reverse_scheduled_sampling"):
            raise ValueError("MotionRNN supports only ordinary scheduled sampling (reverse_scheduled_sampling=False)")
        config.setdefault("num_hidden", "64,64,64,64")
        super().__init__(extra=dict(random_init=bool(random_init)), backend=backend, **config)
        self._same_hidden()
        if len(self.num_hidden) < 2:
            raise ValueError(f"MotionRNN needs at least 2 layers, got num_hidden={self.num_hidden}")
        if self.num_hidden[0] % 4:
            raise ValueError(f"MotionRNN's num_hidden must be divisible by 4 (enc_list maps nh -> nh/4), got "
                             f"{self.num_hidden}")
        k = self.config["filter_size"]
        self.neighbour = 3
        self.motion_hidden = 2 * self.neighbour * self.neighbour
        nh, L = self.num_hidden, self.num_layers
        self.gate_list = nn.ModuleList(nn.Conv2d(nh[i] * 2, nh[i], k, 1, k // 2) for i in range(L - 1))
        self.cell_list = nn.ModuleList(
            SpatioTemporalLSTMCell(self.frame_channel if i == 0 else nh[i - 1], nh[i], self.patch_height,
                                   self.patch_width, k, self.config["stride"], self.config["layer_norm"],
                                   variant="highway", backend=self.backend) for i in range(L))
        self.motion_list = nn.ModuleList(MotionGRU(nh[i] // 4, self.motion_hidden, self.neighbour,
                                                   backend=self.backend) for i in range(L - 1))
        self.enc_list = nn.ModuleList(nn.Conv2d(nh[i], nh[i] // 4, k, 2, k // 2) for i in range(L - 1))
        self.dec_list = nn.ModuleList(nn.ConvTranspose2d(nh[i] // 4, nh[i], 4, 2, 1) for i in range(L - 1))
        self.conv_last = nn.Conv2d(nh[-1], self.frame_channel, 1, bias=False)
        self.conv_first_v = nn.Conv2d(self.frame_channel, nh[0], 1, bias=False)

    def _spatial_divisor(self):
        return 2 * self.patch_size, f"2 * patch_size: the MotionGRU runs at half the patched resolution"

    def _initial_states(self, frames):
        B, _, _, Hp, Wp = frames.shape
        nh, L, mh = self.num_hidden, self.num_layers, self.motion_hidden
        shapes_hc = [(B, nh[i], Hp, Wp) for i in range(L)]
        shapes_f = [(B, mh, Hp // 2, Wp // 2) for _ in range(L - 1)]
        if not self.config["random_init"]:
            h = [frames.new_zeros(s) for s in shapes_hc]
            c = [frames.new_zeros(s) for s in shapes_hc]
            off = [frames.new_zeros(s) for s in shapes_f]
            mean = [frames.new_zeros(s) for s in shapes_f]
            return h, c, off, mean, frames.new_zeros(shapes_hc[0])

        def xavier(s):
            return nn.init.xavier_normal_(frames.new_empty(s))

        h = [xavier(s) for s in shapes_hc]
        c = list(h)  # the reference appends the same tensor for h and c
        off = []
        for i, s in enumerate(shapes_f):  # same draw order as the reference
            xavier((B, nh[i] // 4, Hp // 2, Wp // 2))  # its MotionGRU output state, overwritten before use
            off.append(xavier(s))
        mean = list(off)  # offset and trend start as the same tensor
        mem = xavier(shapes_hc[0])
        xavier(shapes_hc[0])  # the reference's initial highway, replaced by conv_first_v(x_0) before use
        return h, c, off, mean, mem

    def _rollout(self, frames, mask, with_aux, first_output=0):
        h, c, offset, mean, mem = self._initial_states(frames)
        L = self.num_layers
        preds, x_gen = [], None
        with self._unrolled():
            for t in range(self.total_length - 1):
                net = self._step_input(t, frames, mask, x_gen)
                highway = self.conv_first_v(net)
                for i in range(L):
                    inp = net if i == 0 else h[i - 1]
                    h[i], c[i], mem, highway = self.cell_list[i](inp, h[i], c[i], mem, highway)
                    if i < L - 1:
                        z = self.enc_list[i](h[i])
                        z, offset[i], mean[i] = self.motion_list[i](z, offset[i], mean[i])
                        h_tmp = self.dec_list[i](z)
                        o = torch.sigmoid(self.gate_list[i](torch.cat([h_tmp, h[i]], dim=1)))
                        h[i] = o * h_tmp + (1 - o) * h[i]
                if t >= first_output or mask is not None:
                    x_gen = self.conv_last(h[-1])
                    preds.append(x_gen)
        return torch.stack(preds, dim=1), {}
