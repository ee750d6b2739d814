"""Video-prediction metrics by the reference (OpenSTL) definitions, on frames in [0, 1].

- MSE, MAE: per frame, the *sum* over C*H*W of the squared / absolute error, averaged over sequences and
  frames, on unclipped predictions.
- SSIM and PSNR use predictions clipped to [0, 1].
- SSIM: scikit-image's structural_similarity per (sequence, frame) with a 7x7 uniform window, sample
  covariance, K1 = 0.01, K2 = 0.03 and data_range 2.0 (what the reference's pinned scikit-image used for
  float images), channels averaged, computed here in torch (float64); scikit-image is only the test oracle.
- PSNR: 20*log10(1/sqrt(MSE of the frame)) per frame, averaged. One deliberate difference: a frame predicted
  exactly (MSE 0) counts as 100 dB (MSE floored at 1e-10), where the reference gives inf and so an infinite
  average; this happens to trivial predictors (repeating the last frame when the digits return to where they
  were), never in practice to a trained model.
"""
import math

import torch
import torch.nn.functional as F

METRICS = ("mse", "mae", "ssim", "psnr")
PSNR_MIN_MSE = 1e-10  # PSNR of a perfect frame: 100 dB (the reference: inf)


def _check_pair(pred, true):
    if not isinstance(pred, torch.Tensor) or not isinstance(true, torch.Tensor):
        raise TypeError("pred and true must be tensors")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    if pred.dim() < 3:
        raise ValueError(f"expected frames [..., C, H, W], got shape {tuple(pred.shape)}")


def ssim(pred, true, data_range=2.0, win_size=7):
    """Mean SSIM of each image. pred, true: Tensor[..., C, H, W] -> Tensor[...] (float64).

    Matches skimage.metrics.structural_similarity(t, p, win_size=7, data_range=data_range,
    channel_axis=<C>) with its defaults (uniform filter, sample covariance). Only pixels whose 7x7 window lies
    inside the image enter the mean, so the filter's border mode never matters.
    """
    _check_pair(pred, true)
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    *lead, C, H, W = pred.shape
    if H < win_size or W < win_size:
        raise ValueError(f"images of {H}x{W} are smaller than the {win_size}x{win_size} window")
    x = pred.detach().reshape(-1, 1, H, W).double()
    y = true.detach().reshape(-1, 1, H, W).double()
    # one pooling call for the five local means
    stats = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], 1), win_size, stride=1)
    ux, uy, uxx, uyy, uxy = stats.unbind(1)
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(-2, -1)).reshape(*lead, C).mean(-1)


def frame_metrics(pred, true):
    """Per-frame metrics. pred, true: Tensor[..., C, H, W] in [0, 1] -> dict of Tensor[...] (float64)."""
    _check_pair(pred, true)
    p, t = pred.detach().double(), true.detach().double()
    err = p - t
    pc = p.clamp(0.0, 1.0)
    mse_c = (pc - t).pow(2).mean(dim=(-3, -2, -1))
    return {
        "mse": err.pow(2).sum(dim=(-3, -2, -1)),
        "mae": err.abs().sum(dim=(-3, -2, -1)),
        "ssim": ssim(pc, t),
        "psnr": 20.0 * torch.log10(1.0 / torch.sqrt(mse_c.clamp_min(PSNR_MIN_MSE))),
    }


def compute_metrics(pred, true):
    """All metrics of a set of sequences. pred, true: Tensor[B, T, C, H, W] -> dict of floats."""
    acc = MetricAccumulator()
    acc.update(pred, true)
    return acc.compute()


class MetricAccumulator:
    """Streams batches `Tensor[B, T, C, H, W]` and averages per-frame metrics over everything seen.

    `state()` / `load_state()` expose the sums as one float64 tensor, so multi-process evaluation can
    all-reduce it.
    """

    def __init__(self):
        self.sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)

    def update(self, pred, true):
        """Add a batch: pred, true: Tensor[B, T, C, H, W] on any device (the sums stay on the CPU)."""
        m = frame_metrics(pred, true)
        n = m["mse"].numel()
        # the per-batch sums are reduced where the frames are (one transfer of 4 numbers per batch), then
        # joined with the count on the CPU
        sums = torch.stack([m[k].sum() for k in METRICS]).cpu()
        self.sums += torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64)])

    def state(self):
        return self.sums

    def load_state(self, sums):
        self.sums = sums.detach().to(torch.float64).cpu().clone()

    @property
    def count(self):
        return int(self.sums[-1].item())

    def compute(self):
        n = self.sums[-1].item()
        if n == 0:
            return {k: math.nan for k in METRICS}
        return {k: self.sums[i].item() / n for i, k in enumerate(METRICS)}


def baseline_prediction(inputs, aft, kind):
    """Trivial predictions for `aft` frames from inputs Tensor[B, pre, C, H, W]: 'zeros' or 'last' (repeat the
    last observed frame)."""
    B, _, C, H, W = inputs.shape
    if kind == "zeros":
        return inputs.new_zeros(B, aft, C, H, W)
    if kind == "last":
        return inputs[:, -1:].expand(B, aft, C, H, W)
    raise ValueError(f"baseline kind must be 'zeros' or 'last', got {kind!r}")
