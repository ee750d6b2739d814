"""Pictures of a run: prediction grids (PNG), side-by-side animations (GIF) and the loss curve (PNG)."""
import numpy as np
from PIL import Image, ImageDraw

_GAP = 2
_LABEL_W = 44


def _to_uint8(frames):
    """Tensor/array [T, C, H, W] in [0, 1] -> uint8 [T, H, W] (1 channel) or [T, H, W, 3]."""
    x = frames.detach().float().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames, np.float32)
    x = np.clip(x, 0.0, 1.0)
    x = x[:, 0] if x.shape[1] != 3 else x.transpose(0, 2, 3, 1)
    return (x * 255.0 + 0.5).astype(np.uint8)


def _paste_row(canvas, frames, y, x0, scale):
    for t, f in enumerate(frames):
        img = Image.fromarray(f).convert("RGB")
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        canvas.paste(img, (x0 + t * (img.width + _GAP), y))


def save_grid(path, inputs, truth, pred, max_sequences=2, scale=1):
    """PNG grid: per sequence three rows (inputs, ground truth, prediction), time running left to right.

    inputs: Tensor[B, pre, C, H, W]; truth, pred: Tensor[B, aft, C, H, W] (truth may be None); pred may also
    be n sampled futures Tensor[B, n, aft, C, H, W] (a stochastic model's), one row each ("s1" .. "sn").
    """
    n = min(max_sequences, inputs.shape[0])
    H, W = inputs.shape[-2] * scale, inputs.shape[-1] * scale
    cols = max(inputs.shape[1], pred.shape[-4])
    preds = [(f"s{j + 1}", pred[:, j]) for j in range(pred.shape[1])] if pred.dim() == 6 else [("pred", pred)]
    rows = [(name, x) for name, x in [("input", inputs), ("truth", truth)] + preds if x is not None]
    width = _LABEL_W + cols * (W + _GAP)
    height = n * (len(rows) * (H + _GAP) + 2 * _GAP)
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for b in range(n):
        for name, x in rows:
            draw.text((3, y + H // 2 - 5), name, fill=(230, 230, 230))
            _paste_row(canvas, _to_uint8(x[b]), y, _LABEL_W, scale)
            y += H + _GAP
        y += 2 * _GAP
    canvas.save(path)
    return path


def save_gif(path, inputs, truth, pred, index=0, scale=2, duration_ms=150):
    """Animated GIF of one sequence: ground truth (left) next to the model (right); the model's side shows
    the observed frames first, then its predictions."""
    obs = _to_uint8(inputs[index])
    model_side = np.concatenate([obs, _to_uint8(pred[index])])
    truth_side = np.concatenate([obs, _to_uint8(truth[index])]) if truth is not None else model_side
    frames = []
    for t in range(len(model_side)):
        pair = np.concatenate([truth_side[t], np.full_like(truth_side[t][:, :4], 128), model_side[t]], axis=1)
        img = Image.fromarray(pair).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        if t >= len(obs):  # a red bar marks predicted frames
            ImageDraw.Draw(img).rectangle([0, 0, img.width - 1, 3], fill=(220, 40, 40))
        frames.append(img.convert("P", palette=Image.ADAPTIVE))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path


def save_loss_curve(path, steps, losses, epoch_steps=(), epoch_mse=()):
    """Training loss per step (raw and smoothed) and, on a second axis, the test MSE per epoch."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    if len(losses):
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        k = max(1, len(losses) // 50)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.6, label=f"train loss (mean of {k})")
        if np.all(losses > 0):
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    handles, labels = ax.get_legend_handles_labels()
    if len(epoch_mse):
        ax2 = ax.twinx()
        ax2.plot(list(epoch_steps), list(epoch_mse), "o-", color="tab:red", label="test MSE")
        ax2.set_ylabel("test MSE (per frame)", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
