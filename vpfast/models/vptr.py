"""VPTR, the video prediction transformer (Ye & Bilodeau 2022), fully (FAR) and non-autoregressive (NAR).

A frame autoencoder (SimVP's ConvSC encoder / decoder, with the decoder's skip taken from the last observed
frame) maps each frame to a feature grid [h, w, d] (d = hid). VidHRFormer blocks work on [B, T, h, w, d]:

1. local spatial multi-head self-attention inside ws x ws windows, 2-D sinusoidal positions added to q and k;
2. a convolutional feed-forward network (1x1 -> depthwise 3x3 -> GELU -> 1x1) that mixes the windows;
3. temporal multi-head self-attention at each spatial position, 1-D sinusoidal positions added to q and k;
   FAR masks it causally;
4. an MLP feed-forward network; every sub-layer pre-LayerNorm and residual.

FAR: the output at position t (after seeing frames <= t) is the feature of frame t + 1: training is one
teacher-forced pass over frames 0 .. T-2, prediction decodes the last output, appends the encoding of that
frame and runs again.
NAR: the encoder stack (no mask) turns the observed frames into memories; a decoder stack turns N learned
queries into all N future features in one pass: per block the steps 1-3 among the queries (no mask), then
encoder-decoder attention at each spatial position (queries from the decoder; keys and values from the
memories), then the MLP.
All attention runs through torch.nn.functional.scaled_dot_product_attention (PyTorch's fused kernels).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base, _stochastic
from .simvp import Decoder, Encoder

MODES = ("far", "nar")


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos: Tensor[L] -> Tensor[L, dim] of [sin(pos f_k), cos(pos f_k)], f_k = 10000^(-2k/dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    a = pos.float()[:, None] * freqs[None]
    return torch.stack([a.sin(), a.cos()], dim=-1).flatten(1)[:, :dim]


def position_2d(h: int, w: int, d: int, device=None) -> torch.Tensor:
    """Tensor[h, w, d]: the first d/2 channels encode the row, the others the column."""
    ys = sinusoid(torch.arange(h, device=device), d // 2)
    xs = sinusoid(torch.arange(w, device=device), d - d // 2)
    return torch.cat([ys[:, None].expand(h, w, -1), xs[None].expand(h, w, -1)], dim=-1)


def to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """x: Tensor[N, h, w, d] -> Tensor[N * (h/ws) * (w/ws), ws*ws, d]."""
    N, h, w, d = x.shape
    x = x.reshape(N, h // ws, ws, w // ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, d)


def from_windows(x: torch.Tensor, N: int, h: int, w: int, ws: int) -> torch.Tensor:
    """Inverse of `to_windows`."""
    d = x.shape[-1]
    x = x.reshape(N, h // ws, w // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, h, w, d)


class Attention(nn.Module):
    """Multi-head attention: q_in: Tensor[N, Lq, d], k_in, v_in: Tensor[N, Lk, d] -> Tensor[N, Lq, d]."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, q_in, k_in, v_in, causal: bool = False):
        N, Lq, d = q_in.shape
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [N, heads, L, dh]
        y = F.scaled_dot_product_attention(split(self.q(q_in)), split(self.k(k_in)), split(self.v(v_in)),
                                           is_causal=causal)
        return self.o(y.transpose(1, 2).reshape(N, Lq, d))


class ConvFFN(nn.Module):
    """1x1 -> depthwise 3x3 -> GELU -> 1x1 over Tensor[N, h, w, d] (channels last in and out)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(d, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, d, 1)

    def forward(self, x):
        y = self.fc2(F.gelu(self.dw(self.fc1(x.permute(0, 3, 1, 2)))))
        return y.permute(0, 2, 3, 1)


class VidHRFormerBlock(nn.Module):
    """One block on x: Tensor[B, T, h, w, d] (see the module docstring); `cross` adds encoder-decoder attention
    to memory: Tensor[B, Tm, h, w, d] (with its temporal positions mem_pos: Tensor[Tm, d])."""

    def __init__(self, d: int, heads: int, window: int, mlp_ratio: float, cross: bool = False):
        super().__init__()
        self.window = window
        hidden = int(d * mlp_ratio)
        self.norm_s, self.spatial = nn.LayerNorm(d), Attention(d, heads)
        self.norm_c, self.conv_ffn = nn.LayerNorm(d), ConvFFN(d, hidden)
        self.norm_t, self.temporal = nn.LayerNorm(d), Attention(d, heads)
        if cross:
            self.norm_x, self.cross = nn.LayerNorm(d), Attention(d, heads)
        self.norm_m = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    @staticmethod
    def _per_position(x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, T, h, w, d] -> Tensor[B*h*w, T, d] (one temporal sequence per spatial position)."""
        return x.permute(0, 2, 3, 1, 4).flatten(0, 2)

    def forward(self, x, pos2d, pos1d, causal=False, memory=None, mem_pos=None):
        B, T, h, w, d = x.shape
        ws = self.window
        y = self.norm_s(x).flatten(0, 1)
        qk = to_windows(y + pos2d.to(y.dtype), ws)
        att = self.spatial(qk, qk, to_windows(y, ws))
        x = x + from_windows(att, B * T, h, w, ws).view(B, T, h, w, d)
        x = x + self.conv_ffn(self.norm_c(x).flatten(0, 1)).view(B, T, h, w, d)
        back = lambda t: t.view(B, h, w, T, d).permute(0, 3, 1, 2, 4)  # noqa: E731  inverse of _per_position
        y = self._per_position(self.norm_t(x))
        qk = y + pos1d.to(y.dtype)
        x = x + back(self.temporal(qk, qk, y, causal=causal))
        if memory is not None:
            q = self._per_position(self.norm_x(x))
            m = self._per_position(memory)
            x = x + back(self.cross(q + pos1d.to(q.dtype), m + mem_pos.to(m.dtype), m))
        return x + self.mlp(self.norm_m(x))


class VPTR(_base.VideoPredictionModel):
    """VPTR-FAR / VPTR-NAR (see the module docstring).

    VPTR(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, mode="far", hid=64, N_S=4,
         num_layers=4, num_dec_layers=4, heads=4, window_size=4, mlp_ratio=2.0, backend=None)

    in_shape: (T, C, H, W), T = pre_seq_length; the feature grid (H, W) / 2^(N_S/2) must be divisible by
      window_size; hid (= the transformer width d) divisible by heads and even.
    forward(x: Tensor[B, pre, C, H, W]) -> Tensor[B, aft, C, H, W] (deterministic).
    training_loss(frames: Tensor[B, pre + aft, C, H, W], itr) -> (loss, logs): MSE of the teacher-forced
      next-frame predictions of frames 1 .. pre+aft-1 (FAR) or of the aft future frames (NAR).
    backend: for the autoencoder's fused GroupNorm + SiLU; the attention is PyTorch's fused SDPA either way.
    """

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, mode="far", hid=64,
                 N_S=4, num_layers=4, num_dec_layers=4, heads=4, window_size=4, mlp_ratio=2.0,
                 backend: Optional[str] = None):
        super().__init__()
        T, C, H, W, pre, aft = _stochastic.seq_shape(in_shape, pre_seq_length, aft_seq_length)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for k, v in dict(hid=hid, N_S=N_S, num_layers=num_layers, num_dec_layers=num_dec_layers, heads=heads,
                         window_size=window_size).items():
            _base.positive_int(k, v)
        if N_S % 2 or hid % 2:
            raise ValueError(f"N_S and hid must be even, got N_S={N_S}, hid={hid}")
        if hid % heads:
            raise ValueError(f"hid ({hid}) must be divisible by heads ({heads})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self._init_config(dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, mode=mode, hid=hid,
                               N_S=N_S, num_layers=num_layers, num_dec_layers=num_dec_layers, heads=heads,
                               window_size=window_size, mlp_ratio=float(mlp_ratio)), backend)
        self.name = f"vptr_{mode}"
        self.enc = Encoder(C, hid, N_S, 3, backend=self.backend)
        self.dec = Decoder(hid, C, N_S, 3, backend=self.backend)
        blk = lambda cross: VidHRFormerBlock(hid, heads, window_size, mlp_ratio, cross)  # noqa: E731
        self.blocks = nn.ModuleList(blk(False) for _ in range(num_layers))
        if mode == "nar":
            self.queries = nn.Parameter(torch.randn(aft, hid) * 0.02)
            self.dec_blocks = nn.ModuleList(blk(True) for _ in range(num_dec_layers))
        self.head = nn.Sequential(nn.LayerNorm(hid), nn.Linear(hid, hid))

    def _spatial_divisor(self):
        s = 2 ** (self.config["N_S"] // 2)
        ws = self.config["window_size"]
        return s * ws, f"the encoder downsamples by {s} and the feature grid is cut into {ws}x{ws} windows"

    # ---- pieces -------------------------------------------------------------------------------------------
    def _encode(self, frames):
        """Tensor[B, T, C, H, W] -> (features Tensor[B, T, h, w, d], skips Tensor[B, T, d, H, W])."""
        B, T = frames.shape[:2]
        e, skip = self.enc(frames.flatten(0, 1))
        return e.permute(0, 2, 3, 1).unflatten(0, (B, T)), skip.unflatten(0, (B, T))

    def _decode(self, feats, skip):
        """feats: Tensor[B, N, h, w, d], skip: Tensor[B, N, d, H, W] or one frame's Tensor[B, d, H, W]
        -> Tensor[B, N, C, H, W]."""
        B, N = feats.shape[:2]
        skip = skip.flatten(0, 1) if skip.dim() == 5 else skip.repeat_interleave(N, dim=0)
        y = self.dec(feats.flatten(0, 1).permute(0, 3, 1, 2), skip)
        return y.unflatten(0, (B, N))

    def _positions(self, feats, t0, T):
        h, w, d = feats.shape[-3:]
        pos1d = sinusoid(torch.arange(t0, t0 + T, device=feats.device), d)
        return position_2d(h, w, d, feats.device), pos1d

    def far_step(self, feats):
        """FAR: features of frames 0..T-1, Tensor[B, T, h, w, d] -> predicted features of frames 1..T."""
        pos2d, pos1d = self._positions(feats, 0, feats.shape[1])
        x = feats
        for b in self.blocks:
            x = b(x, pos2d, pos1d, causal=True)
        return self.head(x)

    def nar_step(self, feats):
        """NAR: observed features Tensor[B, pre, h, w, d] -> all aft future features, one decoder pass."""
        B, pre, h, w, d = feats.shape
        pos2d, mem_pos = self._positions(feats, 0, pre)
        mem = feats
        for b in self.blocks:
            mem = b(mem, pos2d, mem_pos)
        aft = self.aft_seq_length
        q_pos = sinusoid(torch.arange(pre, pre + aft, device=feats.device), d)
        x = self.queries.to(feats.dtype)[None, :, None, None].expand(B, aft, h, w, d)
        for b in self.dec_blocks:
            x = b(x, pos2d, q_pos, memory=mem, mem_pos=mem_pos)
        return self.head(x)

    def teacher_forced(self, frames):
        """FAR's training pass: frames Tensor[B, T, C, H, W] -> predictions of frames 1..T-1, Tensor[B, T-1, ...];
        prediction j reads frames <= j only (the decoder's skip: frame min(j, pre - 1))."""
        pre = self.pre_seq_length
        feats, skips = self._encode(frames[:, :-1])
        out = self.far_step(feats)
        idx = torch.arange(out.shape[1], device=frames.device).clamp(max=pre - 1)
        return self._decode(out, skips[:, idx])

    def _predict(self, x):
        pre, aft = self.pre_seq_length, self.aft_seq_length
        feats, skips = self._encode(x)
        if self.config["mode"] == "nar":
            return self._decode(self.nar_step(feats), skips[:, -1])
        preds = []
        for _ in range(aft):
            # FAR: one frame at a time; the loss trains the decoded frames, so each prediction re-enters as
            # the encoding of its decoded frame (a feature the blocks have seen in training)
            preds.append(self._decode(self.far_step(feats)[:, -1:], skips[:, -1]))
            feats = torch.cat([feats, self._encode(preds[-1])[0]], dim=1)
        return torch.cat(preds, dim=1)

    def training_loss(self, frames: torch.Tensor, itr: int = 0):
        """frames: Tensor[B, pre + aft, C, H, W] -> (loss: Tensor[], logs: dict of floats)."""
        pre, aft = self.pre_seq_length, self.aft_seq_length
        self.check_frames(frames, pre + aft, "frames")
        if self.config["mode"] == "far":
            loss = F.mse_loss(self.teacher_forced(frames), frames[:, 1:])
        else:
            loss = F.mse_loss(self._predict(frames[:, :pre]), frames[:, pre:])
        return loss, {"loss": loss.item(), "mse": loss.item()}


class _OneModeVPTR(VPTR):
    """VPTR with its mode fixed by the subclass's `_mode` (the registry's vptr_far / vptr_nar): `mode` may be
    left out or given as that mode (model.config, which records it, rebuilds the model)."""

    _mode = ""

    def __init__(self, **config):
        config.setdefault("mode", self._mode)
        if config["mode"] != self._mode:
            raise ValueError(f"{type(self).__name__} has mode {self._mode!r}, got {config['mode']!r}")
        super().__init__(**config)


class VPTR_FAR(_OneModeVPTR):  # noqa: N801
    """VPTR, fully autoregressive (mode="far")."""

    _mode = "far"


class VPTR_NAR(_OneModeVPTR):  # noqa: N801
    """VPTR, non-autoregressive (mode="nar")."""

    _mode = "nar"


_MMNIST = _stochastic.MMNIST
PRESETS = {"mmnist": dict(_MMNIST, hid=128, N_S=4, num_layers=4, num_dec_layers=4, heads=8, window_size=4),
           "small": dict(_MMNIST, hid=32, N_S=4, num_layers=2, num_dec_layers=2, heads=4, window_size=4)}
