"""What training, evaluation and the commands share: the user-error type, the device and precision of a run,
and building a model from its name.

Everything here is below vpfast.train, vpfast.evaluate and vpfast.commands in the import order (it imports
none of them), so each of those can use it without importing the others.
"""
import contextlib
import importlib
import json
import os

import torch

from ._dispatch import BackendUnavailable


class UsageError(ValueError):
    """Bad command-line input: printed without a traceback, exit code 2."""


# ------------------------------------------------------------------------------------- device, precision
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_AMP_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# float16 autocast on the CPU has few fast kernels and is not what anyone trains with; refused with a pointer to
# bf16-mixed (tests switch this off to run the GradScaler code on the CPU)
CPU_FLOAT16_REFUSED = True


def resolve_device(text=None):
    """torch.device for --device: "cpu", "cuda" (the current GPU; returned without an index), "cuda:N"; None =
    $VPFAST_DEVICE if set, else cuda if available, else cpu. Creates no CUDA context (under torchrun each
    process must select its own GPU before touching one)."""
    if text is None:
        text = os.environ.get("VPFAST_DEVICE") or None
    if text is None or str(text).strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(str(text).strip().lower())
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_precision(precision, device, dtype=torch.float32):
    """UsageError unless `precision` (one of PRECISIONS) can run on `device` with parameters of `dtype`."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "32":
        return
    if dtype != torch.float32:
        raise UsageError(f"--precision {precision} runs float32 parameters under autocast; it cannot be combined "
                         f"with --dtype {str(dtype).replace('torch.', '')}")
    if precision == "16-mixed" and device.type == "cpu" and CPU_FLOAT16_REFUSED:
        raise UsageError("--precision 16-mixed needs a CUDA device (float16 autocast with a GradScaler); on the CPU "
                         "use --precision bf16-mixed")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16-mixed: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "use --precision 16-mixed")


class Precision:
    """What --precision does: autocast around the forward pass and loss (not the backward), and for 16-mixed a
    torch.amp.GradScaler (a disabled one otherwise, whose scale/step/update are the plain calls)."""

    def __init__(self, name, device):
        self.name = name
        self.device = device
        self.amp_dtype = _AMP_DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "16-mixed")

    def autocast(self):
        return autocast_for(self.name, self.device)


def autocast_for(precision, device):
    """The autocast context of `precision` on `device` (a no-op context for "32")."""
    dt = _AMP_DTYPES[precision or "32"]
    return contextlib.nullcontext() if dt is None else torch.autocast(torch.device(device).type, dtype=dt)


# ----------------------------------------------------------------------------------------------- models
def build_model(name, preset=None, backend=None, config=None):
    """A model from a registered name (vpfast.models.create) or a 'package.module:factory' spec."""
    config = dict(config or {})
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot import model factory {name!r}: {e}") from None
        return factory(preset=preset, backend=backend, **config)
    try:
        from . import models
    except ImportError as e:
        raise UsageError(f"cannot create model {name!r}: vpfast.models is not available ({e}); pass a "
                         "'module:factory' model") from None
    try:
        return models.create(name, preset=preset, backend=backend, **config)
    except (KeyError, ValueError, TypeError, BackendUnavailable) as e:
        msg = e.args[0] if e.args else str(e)
        raise UsageError(f"cannot create model {name!r}: {msg}") from None


def model_seq_lengths(model, pre, aft):
    cfg = getattr(model, "config", {}) or {}
    return int(cfg.get("pre_seq_length", pre)), int(cfg.get("aft_seq_length", aft))


def parse_config(text):
    """The dict of a --config JSON object (None or "" -> {})."""
    if not text:
        return {}
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--config must be a JSON object, e.g. '{{\"hid_S\": 16}}': {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError("--config must be a JSON object")
    return cfg


def check_sequence_shape(shape, model_config, pre, aft, name="input", trained=False):
    """UsageError unless sequences of `shape` [T, C, H, W] fit the model: at least pre + aft frames, and the
    channels and frame size of its in_shape. trained: the model's weights exist already (eval, predict), so
    the way out is other data, not another --config."""
    shape = tuple(shape)
    if len(shape) != 4 or shape[0] < pre + aft:
        need = f"{pre + aft} ({pre} observed + {aft} predicted)" if aft else f"{pre} (observed)"
        raise UsageError(f"{name} sequences have shape {shape}; expected [T, C, H, W] with T >= {need}")
    in_shape = (model_config or {}).get("in_shape")
    if in_shape is None:
        return
    in_shape = tuple(in_shape)
    if shape[1:] != in_shape[1:]:
        what = (f"{shape[1]} channels" if shape[1] != in_shape[1] else f"{shape[2]}x{shape[3]} pixels")
        want = f"{in_shape[1]} channels of {in_shape[2]}x{in_shape[3]} pixels"
        if trained:
            raise UsageError(f"{name} frames have {what} but the model was built and trained for {want} "
                             f"(in_shape {in_shape})")
        raise UsageError(f"{name} frames have {what} but the model was built for {want} (in_shape {in_shape}); "
                         f"pass --config '{{\"in_shape\": [{pre}, {shape[1]}, {shape[2]}, {shape[3]}]}}' to build "
                         "it for your data")


def check_frame_values(frames, name="input"):
    """UsageError unless the float frames lie in [0, 1], the range every dataset and metric here assumes
    (uint8 files are divided by 255 when read; float files are taken as they are)."""
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        fix = " (0..255 pixel values: divide by 255, or store them as uint8)" if hi > 1.5 else ""
        raise UsageError(f"{name} frames must have values in [0, 1], got {lo:.4g}..{hi:.4g}{fix}")


def progress_bar(**kw):
    """A tqdm bar that fits the terminal and disappears when done."""
    from tqdm.auto import tqdm
    return tqdm(dynamic_ncols=True, leave=False, **kw)
