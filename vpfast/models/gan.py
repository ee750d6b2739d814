"""A two-stream video GAN predictor (Vondrick, Pirsiavash & Torralba 2016), conditioned on the observed frames.

Generator: the observed frames (stacked as channels) and a noise map z go through a convolutional encoder to
features f: [B, hid, H/4, W/4]. Two streams decode them:
- background: a 2-D decoder -> one image b: [B, C, H, W], shared by every future frame (static by construction);
- foreground: f -> [B, hid, aft, H/4, W/4] -> 3-D convolutions with spatial upsampling -> a moving clip
  fg: [B, C, aft, H, W] and a spatio-temporal mask m: [B, 1, aft, H, W] in [0, 1] (sigmoid);
video = m * fg + (1 - m) * b, with b and fg linear; predictions (forward, sample) are the video clamped to [0, 1].
The streams are linear because sigmoid streams saturate on Moving MNIST: the reconstruction term first pulls
every pixel towards the black background, and Adam keeps moving the logits at its step size however small
their gradient gets (measured: after 600 steps of the small preset the foreground logits were near -200, the
future all black, equal to the predict-zeros baseline to 1e-6, and no gradient left to leave it).
Discriminator: 3-D convolutions over the whole clip (observed frames followed by real or generated future
frames) -> one logit per clip.

Training with the package's single optimizer: the loss sums
  recon_weight * MSE(video, future) + adv_weight * BCE(D(fake), real)   (gradients to G only: D's
                                                                          parameters enter detached)
  + BCE(D(real), real) + BCE(D(fake.detach()), fake)                    (gradients to D only)
so one backward pass gives each network the gradient of its own objective (simultaneous gradient descent).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import _base, _stochastic


def _act():
    return nn.LeakyReLU(0.2)


class Generator(nn.Module):
    def __init__(self, C: int, pre: int, aft: int, hid: int, z_dim: int):
        super().__init__()
        self.aft, self.hid = aft, hid
        self.enc = nn.Sequential(nn.Conv2d(pre * C + z_dim, hid, 3, padding=1), _act(),
                                 nn.Conv2d(hid, hid, 4, 2, 1), _act(), nn.Conv2d(hid, hid, 4, 2, 1), _act())
        up2d = lambda: nn.Sequential(nn.Upsample(scale_factor=2.0),  # noqa: E731
                                     nn.Conv2d(hid, hid, 3, padding=1), _act())
        self.background = nn.Sequential(up2d(), up2d(), nn.Conv2d(hid, C, 3, padding=1))
        self.to_time = nn.Conv2d(hid, hid * aft, 1)
        up3d = lambda: nn.Sequential(nn.Upsample(scale_factor=(1.0, 2.0, 2.0)),  # noqa: E731
                                     nn.Conv3d(hid, hid, 3, padding=1), _act())
        self.foreground = nn.Sequential(nn.Conv3d(hid, hid, 3, padding=1), _act(), up3d(), up3d())
        self.fg_out = nn.Conv3d(hid, C, 3, padding=1)
        self.mask_out = nn.Conv3d(hid, 1, 3, padding=1)

    def forward(self, past: torch.Tensor, z: torch.Tensor) -> dict:
        """past: Tensor[B, pre, C, H, W], z: Tensor[B, z_dim, H, W] -> dict of video Tensor[B, aft, C, H, W],
        foreground Tensor[B, aft, C, H, W], background Tensor[B, C, H, W], mask Tensor[B, aft, 1, H, W]."""
        B = past.shape[0]
        f = self.enc(torch.cat([2 * past.flatten(1, 2) - 1, z.to(past.dtype)], 1))
        bg = self.background(f)
        g = self.to_time(f).view(B, self.hid, self.aft, *f.shape[-2:])
        g = self.foreground(g)
        fg = self.fg_out(g).transpose(1, 2)
        m = torch.sigmoid(self.mask_out(g)).transpose(1, 2)
        video = m * fg + (1 - m) * bg[:, None]
        return {"video": video, "foreground": fg, "background": bg, "mask": m}


class Discriminator(nn.Module):
    """clip: Tensor[B, T, C, H, W] (real frames in [0, 1], generated ones unclamped) -> Tensor[B] of logits
    (real vs generated)."""

    def __init__(self, C: int, hid: int):
        super().__init__()
        # kernels (3, 4, 4), strides (1, 2, 2): any clip length, H and W halved twice
        self.net = nn.Sequential(nn.Conv3d(C, hid, (3, 4, 4), (1, 2, 2), 1), _act(),
                                 nn.Conv3d(hid, 2 * hid, (3, 4, 4), (1, 2, 2), 1), _act(),
                                 nn.Conv3d(2 * hid, 2 * hid, 3, 1, 1), _act())
        self.out = nn.Linear(2 * hid, 1)

    def forward(self, clip):
        h = self.net(2 * clip.transpose(1, 2) - 1)
        return self.out(h.mean(dim=(2, 3, 4))).squeeze(1)


class TwoStreamGAN(_base.VideoPredictionModel):
    """Conditional two-stream video GAN (see the module docstring).

    TwoStreamGAN(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32, disc_hid=16,
                 z_dim=4, recon_weight=1.0, adv_weight=0.01, backend=None)

    in_shape: (T, C, H, W), T = pre_seq_length; H, W divisible by 4.
    forward(x: Tensor[B, pre, C, H, W]) -> Tensor[B, aft, C, H, W] in [0, 1]: the generator at z = 0
      (deterministic);
    sample(x, n=1, generator=None) -> Tensor[B, n, aft, C, H, W] in [0, 1] with z ~ N(0, I);
    generate(x, z) -> the streams (dict: video, foreground, background, mask), unclamped (as trained).
    training_loss(frames: Tensor[B, pre + aft, C, H, W], itr) -> (loss, logs with mse, g_adv, d_loss, loss).
    backend: accepted for the package's interface; the layers are PyTorch's.
    """

    name = "gan"

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32, disc_hid=16,
                 z_dim=4, recon_weight=1.0, adv_weight=0.01, backend: Optional[str] = None):
        super().__init__()
        T, C, H, W, pre, aft = _stochastic.seq_shape(in_shape, pre_seq_length, aft_seq_length)
        for k, v in dict(hid=hid, disc_hid=disc_hid, z_dim=z_dim).items():
            _base.positive_int(k, v)
        recon_weight = _stochastic.nonnegative("recon_weight", recon_weight)
        adv_weight = _stochastic.nonnegative("adv_weight", adv_weight)
        self._init_config(dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, hid=hid,
                               disc_hid=disc_hid, z_dim=z_dim, recon_weight=float(recon_weight),
                               adv_weight=float(adv_weight)), backend)
        self.generator = Generator(C, pre, aft, hid, z_dim)
        self.discriminator = Discriminator(C, disc_hid)

    def _spatial_divisor(self):
        return 4, "the generator's encoder downsamples by 2 twice"

    def _noise(self, x, n_rows, generator=None, zero=False):
        shape = (n_rows, self.config["z_dim"], *x.shape[-2:])
        if zero:
            return x.new_zeros(shape)
        return _stochastic.randn(shape, x, generator)

    def generate(self, x: torch.Tensor, z: torch.Tensor) -> dict:
        """x: Tensor[B, pre, C, H, W], z: Tensor[B, z_dim, H, W] -> the generator's streams (see Generator)."""
        self.check_frames(x, self.pre_seq_length, "x")
        want = (x.shape[0], self.config["z_dim"], *x.shape[-2:])
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != want:
            raise ValueError(f"z must be a Tensor{list(want)}, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        return self.generator(x, z)

    def losses(self, frames: torch.Tensor, z: torch.Tensor) -> dict:
        """The loss terms for frames: Tensor[B, pre + aft, C, H, W] and noise z (see the module docstring)."""
        pre = self.pre_seq_length
        past, future = frames[:, :pre], frames[:, pre:]
        fake = self.generate(past, z)["video"]
        mse = F.mse_loss(fake, future)
        # the generator's adversarial term sees D with detached parameters: its gradient reaches G only
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_logit = functional_call(self.discriminator, frozen, (torch.cat([past, fake], 1),))
        bce = F.binary_cross_entropy_with_logits
        g_adv = bce(g_logit, torch.ones_like(g_logit))
        real_logit = self.discriminator(frames)
        fake_logit = self.discriminator(torch.cat([past, fake.detach()], 1))
        d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
        return {"mse": mse, "g_adv": g_adv, "d_loss": d_loss}

    def training_loss(self, frames: torch.Tensor, itr: int = 0):
        """frames: Tensor[B, pre + aft, C, H, W] -> (loss: Tensor[], logs: dict of floats)."""
        self.check_frames(frames, self.pre_seq_length + self.aft_seq_length, "frames")
        t = self.losses(frames, self._noise(frames, frames.shape[0]))
        cfg = self.config
        loss = cfg["recon_weight"] * t["mse"] + cfg["adv_weight"] * t["g_adv"] + t["d_loss"]
        logs = {k: v.item() for k, v in t.items()}
        logs["loss"] = loss.item()
        return loss, logs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> Tensor[B, aft_seq_length, C, H, W] (z = 0)."""
        return self.generate(x, self._noise(x, x.shape[0], zero=True))["video"].clamp(0, 1)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n futures per sequence: x: Tensor[B, pre, C, H, W] -> Tensor[B, n, aft, C, H, W], z ~ N(0, I)."""
        _base.positive_int("n", n)
        self.check_frames(x, self.pre_seq_length, "x")
        xs = x.repeat_interleave(n, dim=0)
        video = self.generate(xs, self._noise(xs, xs.shape[0], generator))["video"].clamp(0, 1)
        return video.unflatten(0, (x.shape[0], n))


_MMNIST = _stochastic.MMNIST
PRESETS = {"mmnist": dict(_MMNIST, hid=64, disc_hid=32, z_dim=8),
           "small": dict(_MMNIST, hid=16, disc_hid=8, z_dim=4)}
