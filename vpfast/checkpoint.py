"""Training checkpoints: atomic writes, validated reads, RNG state capture.

A training checkpoint is a dict with `format == "vpfast-train"`, the model's name and config (enough to
rebuild it), its state_dict, the optimizer and scheduler state, the position in the run (epoch, batch within
the epoch, global step), the training arguments and the RNG states of every process. It is written to a
temporary file in the same directory and renamed over the old one, so a crash or Ctrl-C during the write
leaves the previous checkpoint intact.
"""
import os
import random

import numpy as np
import torch

FORMAT = "vpfast-train"
VERSION = 1
REQUIRED = ("model_name", "model_config", "state_dict", "optimizer", "scheduler", "epoch", "batch_in_epoch",
            "global_step", "train_args")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, not ours, or not matching the run."""


def save_atomic(obj, path):
    """torch.save to `path` via a temporary file + fsync + rename (never leaves a half-written `path`)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rng_state(device=None):
    """RNG states of torch's CPU generator, numpy's global RNG, Python's `random` and, when `device` is a CUDA
    device, that device's generator (the one training draws from), as plain containers.

    Only the training device's CUDA generator is saved: reading every GPU's (get_rng_state_all) would create a
    CUDA context on each of them in every process of a multi-GPU run, and a CPU run draws from none.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state, device=None):
    """Restore what `rng_state` saved. The CUDA generator state goes to `device` when that is a CUDA device (a
    list from older checkpoints, one state per GPU, gives the entry of the device's index, else its first)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    if isinstance(cuda, (list, tuple)):
        if not cuda:
            return
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[idx] if idx < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), device)


def load_checkpoint_file(path):
    """Read any torch checkpoint file on the CPU with a clear error if it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file (e.g. {os.path.join(path, 'last.pt')})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, pickle errors, truncated files all mean the same to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt, truncated or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {msg[:200]})") from None


def load_training_checkpoint(path):
    """Read and validate a vpfast training checkpoint."""
    ck = load_checkpoint_file(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vpfast training checkpoint (no format '{FORMAT}'); plain model "
                              "weights can be evaluated with `vpfast eval --model NAME FILE`")
    if ck.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer vpfast (checkpoint version {ck['version']} > {VERSION})")
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    return ck


def load_model_state(model, state_dict, source="checkpoint"):
    """load_state_dict that reports missing/unexpected keys and shape mismatches as a CheckpointError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict)
