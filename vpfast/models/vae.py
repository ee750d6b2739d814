"""A VAE video predictor with a learned prior (SVG-LP, Denton & Fergus 2018, on convolutional features).

Per frame, SimVP's ConvSC encoder gives features e_t: [B, hid, H/s, W/s] and a full-size skip. For each step
t = 1 .. pre + aft - 1, with h the ConvLSTM predictor's state after step t - 1:

- learned prior      p(z_t | x_<t):  (mu, logvar) = prior(cat[h, e_{t-1}])         (used at test time)
- posterior          q(z_t | x_<=t): (mu, logvar) = posterior(cat[h, e_{t-1}, e_t]) (used in training; it also
                                                                                       sees the frame to predict)
- z_t: [B, z_dim, H/s, W/s]; h = ConvLSTM(cat[e_{t-1}, z_t], h); x_hat_t = decoder(out(h), skip)

where the skip comes from frame t - 1 while it is observed and from the last observed frame afterwards (as SVG),
and e_{t-1} is the encoding of the true frame while observed (and always in training: teacher forcing), of
the model's own prediction at test time. Training loss: MSE of x_hat_1.. against the frames plus
beta * KL(q || p) (mean per latent element).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base, _stochastic
from ._layers import ConvLSTMCell
from .simvp import Decoder, Encoder


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), all Tensor[...] alike -> Tensor[...]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1)


class GaussianHead(nn.Module):
    """conv3x3 -> SiLU -> conv3x3 to (mu, logvar): Tensor[B, cin, h, w] -> 2 x Tensor[B, z_dim, h, w]."""

    def __init__(self, cin: int, width: int, z_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor):
        return self.conv2(F.silu(self.conv1(x))).chunk(2, dim=1)


class VAEPredictor(_base.VideoPredictionModel):
    """Stochastic video prediction with a learned prior (see the module docstring).

    VAEPredictor(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32, N_S=4,
                 num_hidden=64, z_dim=8, filter_size=3, beta=1e-3, backend=None)

    in_shape: (T, C, H, W), T = pre_seq_length; H, W divisible by 2^(N_S/2) (the encoder's downsampling).
    forward(x: Tensor[B, pre, C, H, W]) -> Tensor[B, aft, C, H, W]: the prediction with z_t at the learned
      prior's MEAN (deterministic; `sample` draws z_t from the prior).
    sample(x, n=1, generator=None) -> Tensor[B, n, aft, C, H, W].
    training_loss(frames: Tensor[B, pre + aft, C, H, W], itr) -> (loss, logs with "mse", "kl", "loss").
    backend: for the ConvLSTM cell and the encoder/decoder's fused GroupNorm + SiLU; "torch" = reference.
    """

    name = "vae"

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32, N_S=4,
                 num_hidden=64, z_dim=8, filter_size=3, beta=1e-3, backend: Optional[str] = None):
        super().__init__()
        T, C, H, W, pre, aft = _stochastic.seq_shape(in_shape, pre_seq_length, aft_seq_length)
        for k, v in dict(hid=hid, N_S=N_S, num_hidden=num_hidden, z_dim=z_dim, filter_size=filter_size).items():
            _base.positive_int(k, v)
        if N_S % 2 or hid % 2:
            raise ValueError(f"N_S and hid must be even (ConvSC [no, down] pairs; GroupNorm with 2 groups), got "
                             f"N_S={N_S}, hid={hid}")
        if filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd (same-size convolutions), got {filter_size}")
        beta = _stochastic.nonnegative("beta", beta)
        self._init_config(dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, hid=hid, N_S=N_S,
                               num_hidden=num_hidden, z_dim=z_dim, filter_size=filter_size, beta=float(beta)),
                          backend)
        s = 2 ** (N_S // 2)
        self.enc = Encoder(C, hid, N_S, 3, backend=self.backend)
        self.dec = Decoder(hid, C, N_S, 3, backend=self.backend)
        # the posterior's input is the prior's plus e_t, in the same leading order (see the KL test)
        self.prior = GaussianHead(num_hidden + hid, num_hidden, z_dim)
        self.posterior = GaussianHead(num_hidden + 2 * hid, num_hidden, z_dim)
        self.cell = ConvLSTMCell(hid + z_dim, num_hidden, H // s, W // s, filter_size, 1, False,
                                 backend=self.backend)
        self.out = nn.Conv2d(num_hidden, hid, 1)

    def _spatial_divisor(self):
        k = self.config["N_S"] // 2
        return 2 ** k, f"the encoder downsamples by 2 {k} times"

    def _encode(self, frames: torch.Tensor):
        """Tensor[B, T, C, H, W] -> (features Tensor[B, T, hid, h, w], skips Tensor[B, T, hid, H, W])."""
        B, T = frames.shape[:2]
        e, skip = self.enc(frames.flatten(0, 1))
        return e.unflatten(0, (B, T)), skip.unflatten(0, (B, T))

    def _run(self, frames: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None):
        """The recurrence over t = 1 .. pre + aft - 1.

        mode "train": frames Tensor[B, pre + aft, C, H, W], z from the posterior, teacher forcing; returns
          (predictions Tensor[B, pre + aft - 1, C, H, W], KL Tensor[B, pre + aft - 1, z_dim, h, w]).
        mode "mean" / "sample": frames Tensor[B, pre, C, H, W], z at the prior's mean / drawn from the prior;
          returns (predictions of the aft future frames, None).
        """
        pre, aft = self.pre_seq_length, self.aft_seq_length
        B = frames.shape[0]
        e_all, skips = self._encode(frames)
        nh = self.config["num_hidden"]
        h = e_all.new_zeros(B, nh, *e_all.shape[-2:])
        c = torch.zeros_like(h)
        preds, kls, states = [], [], []
        e_prev = e_all[:, 0]
        for t in range(1, pre + aft):
            mu_p, lv_p = self.prior(torch.cat([h, e_prev], 1))
            if mode == "train":
                mu_q, lv_q = self.posterior(torch.cat([h, e_prev, e_all[:, t]], 1))
                z = mu_q + (0.5 * lv_q).exp() * torch.randn_like(mu_q)
                kls.append(gaussian_kl(mu_q, lv_q, mu_p, lv_p))
            elif mode == "sample":
                z = mu_p + (0.5 * lv_p).exp() * _stochastic.randn(mu_p.shape, mu_p, generator)
            else:
                z = mu_p
            h, c = self.cell(torch.cat([e_prev, z.to(e_prev.dtype)], 1), h, c)
            if mode == "train":  # teacher forcing: nothing in the loop needs the frame, decode all at the end
                states.append(h)
                e_prev = e_all[:, t]
            elif t >= pre:  # at test time the future is encoded from the model's own prediction
                preds.append(self.dec(self.out(h), skips[:, pre - 1]))
                e_prev = self.enc(preds[-1])[0]
            else:
                e_prev = e_all[:, t]
        if mode == "train":
            hs = torch.stack(states, 1)  # [B, T-1, num_hidden, h, w]; step t's skip: frame min(t - 1, pre - 1)
            idx = torch.arange(hs.shape[1], device=hs.device).clamp(max=pre - 1)
            y = self.dec(self.out(hs.flatten(0, 1)), skips[:, idx].flatten(0, 1))
            return y.unflatten(0, hs.shape[:2]), torch.stack(kls, 1)
        return torch.stack(preds, 1), None

    def training_loss(self, frames: torch.Tensor, itr: int = 0):
        """frames: Tensor[B, pre + aft, C, H, W] -> (loss: Tensor[], logs: dict of floats)."""
        pre, aft = self.pre_seq_length, self.aft_seq_length
        self.check_frames(frames, pre + aft, "frames")
        pred, kl = self._run(frames, "train")
        mse = F.mse_loss(pred, frames[:, 1:])
        kl = kl.float().mean().to(mse.dtype)
        loss = mse + self.config["beta"] * kl
        return loss, {"loss": loss.item(), "mse": mse.item(), "kl": kl.item()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> Tensor[B, aft_seq_length, C, H, W] (z at the prior's mean)."""
        self.check_frames(x, self.pre_seq_length, "x")
        return self._run(x, "mean")[0]

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n futures per sequence, z_t drawn from the learned prior: x: Tensor[B, pre, C, H, W]
        -> Tensor[B, n, aft, C, H, W]. generator: the torch.Generator of the draws (default the global one)."""
        _base.positive_int("n", n)
        self.check_frames(x, self.pre_seq_length, "x")
        out = self._run(x.repeat_interleave(n, dim=0), "sample", generator)[0]
        return out.unflatten(0, (x.shape[0], n))


_MMNIST = _stochastic.MMNIST
PRESETS = {"mmnist": dict(_MMNIST, hid=64, N_S=4, num_hidden=128, z_dim=16),
           "small": dict(_MMNIST, hid=16, N_S=4, num_hidden=32, z_dim=4)}
