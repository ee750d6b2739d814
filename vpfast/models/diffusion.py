"""A conditional video diffusion predictor: DDPM training (eps, v or x0 prediction), DDPM or DDIM sampling.

The denoiser is a small U-Net over the frames stacked as channels: its input is the noisy future
x_t: [B, aft*C, H, W] concatenated with the observed frames [B, pre*C, H, W] (the condition), and the diffusion
step t enters every residual block through a sinusoidal embedding. Frames in [0, 1] are diffused in [-1, 1].

Training (Ho et al. 2020): t ~ U{0..num_steps-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; loss = MSE(net(x_t, t, past), target) where the network
predicts (config `prediction`) the noise ("eps": target eps, DDPM's choice), the velocity
("v": v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022) or the clean frames ("x0").
Every parameterisation gives both estimates: for v, x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v and
eps_hat = sqrt(1 - abar) x_t + sqrt(abar) v. Why it matters: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)
multiplies an eps error by sqrt((1 - abar) / abar), about 160 at the last linear step, so an eps-network that
is not yet accurate at high noise starts every sample from a wrong x0_hat (grey noise after 6000 CPU steps on
Moving MNIST). An x0-network's error is the x0 error itself at every step; v bounds it too but, measured after
600 CPU steps, still sampled noise where x0 drew digits, so the presets predict x0.

Sampling over a decreasing sub-sequence tau of the training steps (all of them for plain DDPM):
- DDPM: the Gaussian posterior q(x_prev | x_t, x0_hat) of the (re-spaced) forward process, with
  beta = 1 - abar_t / abar_prev, mean = sqrt(abar_prev) beta / (1 - abar_t) x0_hat
  + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) x_t, variance (1 - abar_prev) / (1 - abar_t) beta.
- DDIM (Song et al. 2021): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev): eta = 0 is deterministic
  given x_T, eta = 1 has DDPM's variance (and, without clipping, DDPM's mean).
Both run the same trained network, with any number of steps up to num_steps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base, _stochastic
from ..ops.group_norm_silu import group_norm_silu

SAMPLERS = ("ddpm", "ddim")
BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")


def _groups(c: int) -> int:
    """GroupNorm groups for c channels: up to 8, dividing c."""
    return math.gcd(c, 8)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """silu(norm(x)): nn.GroupNorm then SiLU for backend "torch", else the fused vpfast.ops.group_norm_silu."""
    if backend == "torch":
        return F.silu(norm(x))
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: Tensor[B] (step indices) -> Tensor[B, dim] of [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=1)
    return F.pad(emb, (0, dim % 2))


def beta_schedule(kind: str, num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Tensor[num_steps] of betas (float64): "linear" (DDPM) or "cosine" (Nichol & Dhariwal 2021)."""
    # on the CPU explicitly: also inside `with torch.device("meta")` (the schedule is data, not a parameter)
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")
    s = 0.008
    x = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64, device="cpu")
    ab = torch.cos((x / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)


class ResBlock(nn.Module):
    """GN-SiLU -> conv3x3 -> + time projection -> GN-SiLU -> conv3x3, plus a (1x1 when widths differ) skip."""

    def __init__(self, cin: int, cout: int, tdim: int, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, cin, H, W], temb: Tensor[B, tdim] (already through SiLU) -> Tensor[B, cout, H, W]."""
        h = self.conv1(norm_silu(self.norm1, x, self.backend))
        h = h + self.temb(temb)[:, :, None, None].to(h.dtype)
        h = self.conv2(norm_silu(self.norm2, h, self.backend))
        return h + self.skip(x)


class Denoiser(nn.Module):
    """U-Net eps_theta(x_t: Tensor[B, c_out, H, W], t: Tensor[B], cond: Tensor[B, c_cond, H, W]) -> Tensor like x_t.

    One ResBlock per level of `mult` (widths hid * mult[i]), a stride-2 convolution between levels, one middle
    block, and on the way up nearest upsampling + conv, the level's skip concatenated, one ResBlock.
    """

    def __init__(self, c_out: int, c_cond: int, hid: int, mult: list[int], backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.hid = hid
        tdim = 4 * hid
        self.time_mlp = nn.Sequential(nn.Linear(hid, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        widths = [hid * m for m in mult]
        self.stem = nn.Conv2d(c_out + c_cond, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, tdim, backend))
            c = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c, c, tdim, backend)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(widths))):
            if i < len(widths) - 1:
                self.upsample.append(nn.Conv2d(c, widths[i], 3, padding=1))
                c = widths[i]
            self.up.append(ResBlock(c + widths[i], widths[i], tdim, backend))
            c = widths[i]
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.hid).to(self.stem.weight.dtype)))
        h = self.stem(torch.cat([x, cond], dim=1))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, temb)
        for j, block in enumerate(self.up):
            if j > 0:
                h = self.upsample[j - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        return self.out(norm_silu(self.norm_out, h, self.backend))


class ConditionalDiffusion(_base.VideoPredictionModel):
    """Conditional DDPM/DDIM video predictor (see the module docstring for the arithmetic).

    ConditionalDiffusion(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32,
                         channel_mult="1,2,2", num_steps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, sample_steps=50, sampler="ddim", eta=0.0, clip_denoised=True,
                         prediction="eps", backend=None)

    in_shape: (T, C, H, W) with T = pre_seq_length; H and W divisible by 2^(len(channel_mult) - 1).
    forward(x: Tensor[B, pre, C, H, W]) -> Tensor[B, aft, C, H, W]: ONE sample, drawn with the configured
      sampler / sample_steps / eta from the global random generator (eta = 0: deterministic given x_T).
    sample(x, n=1, steps=None, sampler=None, eta=None, generator=None, noise=None) -> Tensor[B, n, aft, C, H, W].
    training_loss(frames: Tensor[B, pre + aft, C, H, W], itr) -> (loss, logs): MSE of the network's output
      against its target (`prediction`: "eps", "v" or "x0") at one uniformly drawn step per sequence.
    prediction: what the network predicts; "eps" (the constructor's default, DDPM's, which checkpoints from
      before the option was added used) or "v" / "x0" (the presets': "x0"; see the module docstring).
    backend: for the fused GroupNorm + SiLU (vpfast.ops.group_norm_silu); "torch" = nn.GroupNorm then SiLU.
    """

    name = "diffusion"

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, hid=32,
                 channel_mult="1,2,2", num_steps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 sample_steps=50, sampler="ddim", eta=0.0, clip_denoised=True, prediction="eps",
                 backend: Optional[str] = None):
        super().__init__()
        T, C, H, W, pre, aft = _stochastic.seq_shape(in_shape, pre_seq_length, aft_seq_length)
        _base.positive_int("hid", hid)
        mult = _base.as_int_list("channel_mult", channel_mult)
        _base.positive_int("num_steps", num_steps)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if beta_schedule == "linear" and not 0.0 < float(beta_start) <= float(beta_end) < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                             f"beta_end={beta_end}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self._init_config(dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, hid=hid,
                               channel_mult=mult, num_steps=num_steps, beta_schedule=beta_schedule,
                               beta_start=float(beta_start), beta_end=float(beta_end), sample_steps=sample_steps,
                               sampler=sampler, eta=float(eta), clip_denoised=bool(clip_denoised),
                               prediction=prediction), backend)
        self._check_sampling(sample_steps, sampler, eta)
        self.denoiser = Denoiser(aft * C, pre * C, hid, mult, backend=self.backend)
        # The schedule follows from the config (not in the state_dict); float64 on the CPU and outside the
        # module's buffers so that model.to(dtype) never rounds abar (1 - abar_t is tiny for small t).
        self.alphas_cumprod = torch.cumprod(1 - beta_schedule_of(self.config), dim=0)

    def _spatial_divisor(self):
        k = len(self.config["channel_mult"]) - 1
        return 2 ** k, f"the denoiser downsamples by 2 {k} times"

    def _check_sampling(self, steps, sampler, eta) -> None:
        N = self.config["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= N:
            raise ValueError(f"steps must be an int in [1, num_steps={N}], got {steps!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")

    # ---- schedule -------------------------------------------------------------------------------------
    def timesteps(self, steps: int) -> list[int]:
        """The increasing sub-sequence of `steps` training steps that sampling visits (from the last back):
        evenly spaced from 0 to num_steps - 1 (all of them when steps == num_steps)."""
        N = self.config["num_steps"]
        if steps == 1:
            return [N - 1]
        return sorted({round(i * (N - 1) / (steps - 1)) for i in range(steps)})

    def _abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def step_variance(self, t: int, t_prev: int, sampler: str = "ddpm", eta: float = 1.0) -> float:
        """The variance of x_prev given x_t for one sampling step from training step t to t_prev (-1: the end).

        ddpm: the posterior's (1 - abar_prev) / (1 - abar_t) * beta, beta = 1 - abar_t / abar_prev;
        ddim: sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev).
        """
        ab, ab_prev = self._abar(t), self._abar(t_prev)
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        return var if sampler == "ddpm" else eta * eta * var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise: Tensor[B, ...], t: Tensor[B] of ints."""
        a, s = self._coefs(t, x0)
        return (a * x0.double() + s * noise.double()).to(x0.dtype)

    # ---- the network on [B, T, C, H, W] frames -----------------------------------------------------------
    def network(self, xt: torch.Tensor, t: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output (eps, v or x0 per config `prediction`): xt: Tensor[B, aft, C, H, W]
        (in [-1, 1] units), t: Tensor[B], past: Tensor[B, pre, C, H, W] in [0, 1] -> Tensor like xt."""
        cond = (2 * past - 1).flatten(1, 2)
        return self.denoiser(xt.flatten(1, 2), t, cond).view(xt.shape)

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        """sqrt(abar_t), sqrt(1 - abar_t) as float64 Tensor[B, 1, ...] broadcasting against `like`."""
        ab = self.alphas_cumprod.to(like.device)[t.to(like.device)].view((-1,) + (1,) * (like.dim() - 1))
        return ab.sqrt(), (1 - ab).sqrt()

    def predict_noise(self, xt: torch.Tensor, t: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """eps_hat: Tensor[B, aft, C, H, W] for xt: Tensor[B, aft, C, H, W], t: Tensor[B], past: Tensor[B, pre,
        C, H, W], converted from the network's eps, v or x0 (the conversion in float64)."""
        out = self.network(xt, t, past)
        kind = self.config["prediction"]
        if kind == "eps":
            return out
        a, s = self._coefs(t, xt)
        if kind == "v":
            eps = s * xt.double() + a * out.double()
        else:  # x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar); 1 - abar >= beta_0 > 0
            eps = (xt.double() - a * out.double()) / s
        return eps.to(out.dtype)

    def training_loss(self, frames: torch.Tensor, itr: int = 0):
        """frames: Tensor[B, pre + aft, C, H, W] in [0, 1] -> (loss: Tensor[], logs: dict of floats)."""
        pre, aft = self.pre_seq_length, self.aft_seq_length
        self.check_frames(frames, pre + aft, "frames")
        past, x0 = frames[:, :pre], 2 * frames[:, pre:pre + aft] - 1
        B = frames.shape[0]
        t = torch.randint(0, self.config["num_steps"], (B,), device=frames.device)
        noise = torch.randn_like(x0)
        out = self.network(self.q_sample(x0, t, noise), t, past)
        kind = self.config["prediction"]
        if kind == "eps":
            target = noise
        elif kind == "x0":
            target = x0
        else:
            a, s = self._coefs(t, x0)
            target = (a * noise.double() - s * x0.double()).to(x0.dtype)
        loss = F.mse_loss(out, target)
        return loss, {"loss": loss.item(), f"{kind}_mse": loss.item()}

    # ---- sampling ---------------------------------------------------------------------------------------
    def sampling_step(self, xt: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, sampler: str, eta: float,
                      z: torch.Tensor) -> torch.Tensor:
        """One step from training step t to t_prev (-1 = x_0) given the predicted noise eps and fresh noise z
        (all Tensor[...] alike); the arithmetic in float64 scalars, the result in xt's dtype."""
        ab, ab_prev = self._abar(t), self._abar(t_prev)
        x0 = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if self.config["clip_denoised"]:
            x0 = x0.clamp(-1, 1)
        var = self.step_variance(t, t_prev, sampler, eta)
        if sampler == "ddpm":
            beta = 1 - ab / ab_prev
            mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * xt
        else:
            # eps re-derived from the (possibly clipped) x0 keeps the DDIM update consistent with x0_hat
            eps = (xt - math.sqrt(ab) * x0) / math.sqrt(1 - ab) if self.config["clip_denoised"] else eps
            mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - var, 0.0)) * eps
        return mean + math.sqrt(var) * z if var > 0 else mean

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int = 1, steps: Optional[int] = None, sampler: Optional[str] = None,
               eta: Optional[float] = None, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n futures per sequence: x: Tensor[B, pre, C, H, W] -> Tensor[B, n, aft, C, H, W] in [0, 1].

        steps: how many network evaluations (default config sample_steps; at most num_steps; plain DDPM is
          sampler="ddpm", steps=num_steps); sampler: "ddpm" or "ddim" (default config sampler); eta: DDIM's
          noise scale in [0, 1] (default config eta; ignored by ddpm).
        generator: the torch.Generator every random draw comes from (any device; default the global one).
        noise: x_T, Tensor[B, n, aft, C, H, W] (default drawn from `generator`).
        """
        cfg = self.config
        steps = cfg["sample_steps"] if steps is None else steps
        sampler = cfg["sampler"] if sampler is None else sampler
        eta = cfg["eta"] if eta is None else eta
        self._check_sampling(steps, sampler, eta)
        _base.positive_int("n", n)
        self.check_frames(x, self.pre_seq_length, "x")
        B, _, C, H, W = x.shape
        shape = (B * n, self.aft_seq_length, C, H, W)
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

        if noise is None:
            xt = _stochastic.randn(shape, x, generator, dtype)
        else:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, n) + shape[1:]:
                raise ValueError(f"noise must be a Tensor[B, n, aft, C, H, W] = {(B, n) + shape[1:]}, got "
                                 f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            xt = noise.reshape(shape).to(x.device, dtype)
        past = x.repeat_interleave(n, dim=0)
        ts = self.timesteps(steps)
        for i in reversed(range(len(ts))):
            t, t_prev = ts[i], (ts[i - 1] if i > 0 else -1)
            tt = torch.full((B * n,), t, device=x.device, dtype=torch.long)
            eps = self.predict_noise(xt.to(x.dtype), tt, past).to(dtype)
            noisy = self.step_variance(t, t_prev, sampler, eta) > 0
            z = _stochastic.randn(shape, x, generator, dtype) if noisy else None
            xt = self.sampling_step(xt, eps, t, t_prev, sampler, eta, z)
        out = ((xt + 1) / 2).clamp(0, 1).to(x.dtype)
        return out.view(B, n, *shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> one sampled future Tensor[B, aft_seq_length, C, H, W]."""
        return self.sample(x, n=1)[:, 0]


def beta_schedule_of(config: dict) -> torch.Tensor:
    return beta_schedule(config["beta_schedule"], config["num_steps"], config["beta_start"], config["beta_end"])


# "mmnist": a DDPM-sized U-Net for 64x64 Moving MNIST (10 -> 10 frames); "small": narrow, for a 2-core CPU.
_MMNIST = _stochastic.MMNIST
# Both predict x0: after 600 CPU steps of the small preset its samples sit near the zeros baseline (MSE 183 vs 173,
# best of 3: 164) where eps-prediction's are grey noise (1546) and v's (312) are still noisy (docs/STOCHASTIC.md).
PRESETS = {"mmnist": dict(_MMNIST, hid=64, channel_mult="1,2,2,2", num_steps=1000, sample_steps=50,
                          prediction="x0"),
           "small": dict(_MMNIST, hid=16, channel_mult="1,2,2", num_steps=1000, sample_steps=20,
                         prediction="x0")}
