"""A tiny model with vpfast.models' interface, for testing the training machinery without the real models.

Used as `--model standin:create` with tests/ on sys.path (PYTHONPATH for subprocesses).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyPredictor(nn.Module):
    def __init__(self, pre_seq_length=10, aft_seq_length=10, channels=1, hidden=8, noise=0.0):
        super().__init__()
        self.name = "standin:create"
        self.config = dict(pre_seq_length=pre_seq_length, aft_seq_length=aft_seq_length, channels=channels,
                           hidden=hidden, noise=noise)
        self.pre, self.aft, self.c, self.noise = pre_seq_length, aft_seq_length, channels, noise
        self.enc = nn.Conv2d(pre_seq_length * channels, hidden, 3, padding=1)
        self.dec = nn.Conv2d(hidden, aft_seq_length * channels, 3, padding=1)

    def forward(self, x):  # x: Tensor[B, pre, C, H, W] -> Tensor[B, aft, C, H, W]
        B, T, C, H, W = x.shape
        h = F.relu(self.enc(x.reshape(B, T * C, H, W)))
        return self.dec(h).reshape(B, self.aft, C, H, W) + x[:, -1:]

    def training_loss(self, frames, itr):
        x, y = frames[:, :self.pre], frames[:, self.pre:self.pre + self.aft]
        if self.noise:
            # consumes the global torch RNG, like scheduled sampling does: resume must restore it
            x = x + self.noise * torch.randn_like(x)
        loss = F.mse_loss(self(x), y)
        return loss, {"mse": float(loss.detach())}


def create(preset=None, backend=None, **config):
    if preset not in (None, "small", "mmnist"):
        raise ValueError(f"unknown preset {preset!r}")
    return TinyPredictor(**config)


class InterruptingPredictor(TinyPredictor):
    """Sends itself SIGINT during training step `sigint_at`, as a user pressing Ctrl-C would."""

    def __init__(self, sigint_at=None, **kw):
        super().__init__(**kw)
        self.sigint_at = sigint_at
        self.name = "standin:create_interrupting"
        self.config["sigint_at"] = sigint_at

    def training_loss(self, frames, itr):
        if itr == self.sigint_at:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)
        return super().training_loss(frames, itr)


def create_interrupting(preset=None, backend=None, **config):
    return InterruptingPredictor(**config)
