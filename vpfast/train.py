"""Train a video-prediction model: `vpfast train ...` or `python -m vpfast.train ...` (also under torchrun).

The recipe is the reference's: Adam, a OneCycle learning-rate schedule stepped every iteration
(final_div_factor 1e4), the model's own training loss (`model.training_loss(frames, itr)`: scheduled
sampling for the RNNs, MSE + 0.1 DDR for TAU, ...). Every epoch the model is evaluated on a fixed test set
(MSE, MAE, SSIM, PSNR as in vpfast.metrics), a CSV/JSON log, a prediction grid (PNG + GIF), a loss curve
and a checkpoint are written to --out. `--resume` continues exactly where a checkpoint left off; Ctrl-C
saves a checkpoint and exits. `--device` picks the device (default: cuda if available, else cpu) and
`--precision` the arithmetic: 32 (float32), bf16-mixed (torch.autocast to bfloat16, on CPU or GPU) or
16-mixed (autocast to float16 with a GradScaler, GPU only). Under `torchrun --nproc_per_node=N` the run is
data-parallel (DistributedDataParallel; gloo on CPU, NCCL on GPU, one GPU per local rank), and rank 0 alone
writes files.
"""
import argparse
import contextlib
import csv
import importlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import (FORMAT, VERSION, CheckpointError, load_model_state, load_training_checkpoint,
                         rng_state, save_atomic, set_rng_state, write_text_atomic)
from .data import ShardedBatchSampler, make_dataset
from .metrics import METRICS, MetricAccumulator

# training arguments that define the run; on --resume they come from the checkpoint and may not change
RUN_KEYS = ("model", "preset", "config", "epochs", "batch_size", "lr", "train_size", "max_steps", "seed",
            "data", "pre", "aft", "dtype", "precision", "final_div_factor", "weight_decay", "clip_grad")
RUN_DEFAULTS = {"preset": None, "config": None, "epochs": 10, "batch_size": 16, "lr": None, "train_size": 10000,
                "max_steps": None, "seed": 0, "data": "mmnist", "pre": 10, "aft": 10, "dtype": "float32",
                "precision": "32", "final_div_factor": 1e4, "weight_decay": 0.0, "clip_grad": None}
# reference learning rates (MODELS.md section 8)
DEFAULT_LR = {"convlstm": 5e-4, "predrnn": 5e-4, "predrnnv2": 5e-4, "motionrnn": 3e-4,
              "predrnnpp": 1e-4, "mim": 5e-4, "e3dlstm": 1e-4}  # OpenSTL configs (MODELS.md §14)


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
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise UsageError(f"cannot create model {name!r}: {msg}") from None


def model_seq_lengths(model, pre, aft):
    cfg = getattr(model, "config", {}) or {}
    return int(cfg.get("pre_seq_length", pre)), int(cfg.get("aft_seq_length", aft))


class _LossModule(nn.Module):
    # DDP only synchronises gradients for computations that go through its forward(); the model's loss is a
    # separate method, so this wrapper routes it through forward.
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames, itr):
        return self.model.training_loss(frames, itr)


# ------------------------------------------------------------------------------------------ distributed
class Dist:
    """The process group (under torchrun) and this process's device.

    device: --device (None = cuda if available, else cpu). Under torchrun each process takes the GPU of its
    local rank (so "cuda:N" is refused there) and the group uses NCCL; on the CPU it uses gloo.
    """

    def __init__(self, device=None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = resolve_device(device)
        if self.enabled:
            use_cuda = self.device.type == "cuda"
            if use_cuda:
                if self.device.index is not None:
                    raise UsageError(f"--device {device}: under torchrun every process uses the GPU of its local "
                                     "rank; pass --device cuda")
                if self.local_rank >= torch.cuda.device_count():
                    raise UsageError(f"local rank {self.local_rank} has no GPU: this node has "
                                     f"{torch.cuda.device_count()}; start at most that many processes per node")
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if not use_cuda:
                # share the cores between the processes on this node
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        elif self.device.type == "cuda":
            # custom kernels launch on the current device's stream: make it the training device
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)

    @classmethod
    def single(cls):
        d = cls.__new__(cls)
        d.world, d.rank, d.local_rank, d.enabled, d.device = 1, 0, 0, False, torch.device("cpu")
        return d

    @property
    def main(self):
        return self.rank == 0

    def all_reduce(self, t, op=None):
        if self.enabled:
            t = t.to(self.device)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
            t = t.cpu()
        return t

    def any(self, flag):
        return bool(self.all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MAX if self.enabled else None)[0] > 0)

    def gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, dataset, pre, aft, batch_size=32, device="cpu", dtype=torch.float32, ddp=None,
             baselines=False, progress=False, precision="32"):
    """Metrics of `model` on `dataset` (sequences [T, C, H, W], T >= pre + aft); with baselines=True also of
    predicting zeros and repeating the last observed frame. Returns {"model": {...}, "zeros": ..., "last": ...}.
    The model (already on `device`) predicts under the autocast of `precision` (one of PRECISIONS); the
    metrics are computed in float64 whatever its output dtype.
    """
    from .metrics import baseline_prediction

    ddp = ddp or Dist.single()
    was_training = model.training
    model.eval()
    sampler = ShardedBatchSampler(len(dataset), batch_size * ddp.world, ddp.rank, ddp.world, drop_last=False)
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda")
    kinds = ["model"] + (["zeros", "last"] if baselines else [])
    accs = {k: MetricAccumulator() for k in kinds}
    bar = _progress(total=len(sampler), desc="eval", disable=not progress)
    for seqs in loader:
        seqs = seqs.to(device, dtype, non_blocking=True)
        _check_frames(seqs, pre, aft)
        x, y = seqs[:, :pre], seqs[:, pre:pre + aft]
        with autocast_for(precision, device):
            pred = model(x)
        accs["model"].update(pred, y)
        if baselines:
            accs["zeros"].update(baseline_prediction(x, aft, "zeros"), y)
            accs["last"].update(baseline_prediction(x, aft, "last"), y)
        bar.update(1)
    bar.close()
    model.train(was_training)
    out = {}
    for k, acc in accs.items():
        if ddp.enabled:
            acc.load_state(ddp.all_reduce(acc.state().clone()))
        out[k] = acc.compute()
    return out


def _check_frames(seqs, pre, aft):
    if seqs.dim() != 5:
        raise UsageError(f"sequences must be [N, T, C, H, W], got a batch of shape {tuple(seqs.shape)}")
    if seqs.shape[1] < pre + aft:
        raise UsageError(f"sequences have {seqs.shape[1]} frames but the model needs {pre} observed + {aft} "
                         f"predicted = {pre + aft}")


def _progress(**kw):
    from tqdm.auto import tqdm
    return tqdm(dynamic_ncols=True, leave=False, **kw)


def format_metrics_table(results):
    """A Markdown table of {row name: metrics dict}."""
    lines = ["| predictor | MSE | MAE | SSIM | PSNR |", "|---|---:|---:|---:|---:|"]
    names = {"model": "model", "zeros": "zeros (baseline)", "last": "repeat last frame (baseline)"}
    for k, m in results.items():
        lines.append(f"| {names.get(k, k)} | {m['mse']:.2f} | {m['mae']:.2f} | {m['ssim']:.4f} | {m['psnr']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- training
def _resolve_run_args(args, ckpt=None):
    """Fill the run-defining arguments: from the checkpoint on resume (an explicit different value is an
    error), otherwise from the defaults."""
    run = {}
    for k in RUN_KEYS:
        given = getattr(args, k, None)
        if k == "config" and given is not None and not isinstance(given, dict):
            given = _parse_config(given)
        if ckpt is not None:
            saved = ckpt["train_args"].get(k, RUN_DEFAULTS.get(k))
            if given is not None and given != saved and not (k == "model" and given == ckpt["model_name"]):
                raise CheckpointError(f"the checkpoint was trained with {k}={saved!r}, not {given!r}; drop "
                                      f"--{k.replace('_', '-')} to resume, or start a new run in another --out")
            run[k] = saved
        else:
            run[k] = given if given is not None else RUN_DEFAULTS.get(k)
    if run["model"] is None:
        raise UsageError("--model is required (e.g. --model tau --preset small)")
    if run["lr"] is None:
        run["lr"] = DEFAULT_LR.get(run["model"], 1e-3)
    for k in ("epochs", "batch_size", "train_size"):
        if run[k] is not None and int(run[k]) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {run[k]}")
    if run["max_steps"] is not None and run["max_steps"] < 1:
        raise UsageError(f"--max-steps must be >= 1, got {run['max_steps']}")
    if run["dtype"] not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64, got {run['dtype']!r}")
    return run


def _parse_config(text):
    if not text:
        return {}
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--config must be a JSON object, e.g. '{{\"hid_S\": 16}}': {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError("--config must be a JSON object")
    return cfg


def _datasets(run, args, pre, aft, model_config=None):
    data = run["data"]
    test_data = getattr(args, "test_data", None)
    seed = run["seed"]
    test_size = getattr(args, "test_size", None)
    try:
        train_ds = make_dataset(data, "train", length=run["train_size"], seed=seed)
        if test_data:
            test_ds = make_dataset(test_data, "test", length=test_size, seed=seed)
        elif data in (None, "mmnist", "moving_mnist"):
            test_ds = make_dataset("mmnist", "test", length=test_size or 1000, seed=seed)
        else:
            # hold out the last 10% of a user's file as the test set
            full = make_dataset(data, "train", seed=seed)
            n_test = max(1, len(full) // 10)
            n_train = min(len(full) - n_test, run["train_size"])
            if n_train < 1:
                raise UsageError(f"{data} has only {len(full)} sequences: too few to hold out a test set "
                                 "(pass --test-data)")
            train_ds = torch.utils.data.Subset(full, range(n_train))
            test_ds = torch.utils.data.Subset(full, range(len(full) - n_test, len(full)))
            if test_size:
                test_ds = torch.utils.data.Subset(test_ds, range(min(test_size, n_test)))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    for name, ds in (("training", train_ds), ("test", test_ds)):
        check_sequence_shape(tuple(ds[0].shape), model_config, pre, aft, name)
    return train_ds, test_ds


def check_sequence_shape(shape, model_config, pre, aft, name="input"):
    """UsageError unless sequences of `shape` [T, C, H, W] fit the model."""
    if len(shape) != 4 or shape[0] < pre + aft:
        raise UsageError(f"{name} sequences have shape {shape}; expected [T, C, H, W] with T >= "
                         f"{pre + aft} ({pre} observed + {aft} predicted)")
    in_shape = (model_config or {}).get("in_shape")
    if in_shape is not None and shape[1] != tuple(in_shape)[1]:
        raise UsageError(f"{name} frames have {shape[1]} channels but the model was built for {tuple(in_shape)[1]} "
                         f"(in_shape {tuple(in_shape)}); pass --config '{{\"in_shape\": [{pre}, {shape[1]}, "
                         f"{shape[2]}, {shape[3]}]}}' to build it for your data")


def train(args):
    """Run (or resume) a training run described by an argparse namespace; returns a summary dict."""
    ddp = Dist(getattr(args, "device", None))
    try:
        return _train(args, ddp)
    finally:
        ddp.close()


def _train(args, ddp):
    out = args.out
    ckpt_path = os.path.join(out, "last.pt")
    ckpt = None
    if args.resume:
        path = ckpt_path if args.resume == "auto" else args.resume
        ckpt = load_training_checkpoint(path)
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to start over, "
                         "or choose another --out")
    run = _resolve_run_args(args, ckpt)
    dtype = getattr(torch, run["dtype"])
    device = ddp.device
    check_precision(run["precision"], device, dtype)
    prec = Precision(run["precision"], device)

    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])
    random.seed(run["seed"])
    if ckpt is not None:
        model = build_model(ckpt["model_name"], backend=args.backend, config=ckpt["model_config"])
    else:
        model = build_model(run["model"], run["preset"], args.backend, run["config"])
    model = model.to(device, dtype)
    pre, aft = model_seq_lengths(model, run["pre"], run["aft"])
    train_ds, test_ds = _datasets(run, args, pre, aft, getattr(model, "config", None))
    try:  # one sequence through the model: shape problems become a clear message, not a traceback mid-run
        with torch.no_grad(), prec.autocast(), recording_backends() as backends_used:
            model.eval()
            model(test_ds[0][None, :pre].to(device, dtype))
    except (ValueError, TypeError, RuntimeError) as e:
        raise UsageError(f"the model cannot take these sequences ({tuple(test_ds[0].shape)} [T, C, H, W]): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    sampler = ShardedBatchSampler(len(train_ds), run["batch_size"], ddp.rank, ddp.world,
                                  shuffle=not hasattr(train_ds, "sequence_uint8"), seed=run["seed"])
    steps_per_epoch = sampler.num_batches()
    if steps_per_epoch < 1:
        raise UsageError(f"--train-size {len(train_ds)} is smaller than one batch ({run['batch_size']})")
    total_steps = run["epochs"] * steps_per_epoch
    if run["max_steps"]:
        total_steps = min(total_steps, run["max_steps"])
    optimizer = torch.optim.Adam(model.parameters(), lr=run["lr"], weight_decay=run["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=run["lr"], total_steps=total_steps,
                                                    final_div_factor=run["final_div_factor"])
    start_epoch, start_batch, global_step = 0, 0, 0
    history = {"epochs": [], "steps": []}
    if ckpt is not None:
        load_model_state(model, ckpt["state_dict"], "the checkpoint's weights")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):  # 16-mixed: the loss scale and its growth counter
                prec.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer/scheduler state does not fit this run: {e}") from None
        start_epoch, start_batch, global_step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]
        history = ckpt.get("history", history)
        rngs = ckpt.get("rng_per_rank") or []
        if len(rngs) == ddp.world:
            set_rng_state(rngs[ddp.rank], device)
        elif rngs:
            set_rng_state(rngs[0], device)
            if ddp.main:
                print(f"note: checkpoint saved by {len(rngs)} processes, resuming with {ddp.world}; random "
                      "streams differ from an uninterrupted run", file=sys.stderr)

    step_module = _LossModule(model)
    if ddp.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(args, "find_unused_parameters", False))

    if ddp.main:
        os.makedirs(out, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"vpfast train: {ckpt['model_name'] if ckpt else run['model']} ({n_params / 1e6:.2f} M parameters), "
              f"{len(train_ds)} training / {len(test_ds)} test sequences, batch {run['batch_size']}"
              f"{f' over {ddp.world} processes' if ddp.enabled else ''}, {total_steps} steps, lr {run['lr']:g}, "
              f"device {device}, {run['dtype']}, precision {run['precision']}, out {out}"
              + (f" (resumed at epoch {start_epoch + 1}, step {global_step})" if ckpt else ""), flush=True)
        if backends_used:  # what auto (or --backend) actually ran: a silent fallback shows here
            print("op backends: " + ", ".join(f"{op} {'/'.join(sorted(b))}" for op, b in sorted(backends_used.items())),
                  flush=True)

    def save(epoch, batch_in_epoch, reason):
        rngs = ddp.gather_object(rng_state(device))
        if not ddp.main:
            return
        state = {
            "format": FORMAT, "version": VERSION, "reason": reason,
            "model_name": ckpt["model_name"] if ckpt else run["model"],
            "model_config": dict(getattr(model, "config", {}) or {}),
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": prec.scaler.state_dict(), "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step, "total_steps": total_steps, "train_args": run, "history": history,
            "op_backends": {op: sorted(b) for op, b in backends_used.items()},
            "rng_per_rank": rngs, "world_size": ddp.world, "torch": str(torch.__version__),
        }
        save_atomic(state, ckpt_path)

    stop = {"flag": False, "signal": False}
    stop_after = getattr(args, "stop_after", None)
    session_steps = 0

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = stop["signal"] = True
        if ddp.main:
            print("\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    # SIGTERM too: schedulers and torchrun stop jobs with it
    handled = (signal.SIGINT, signal.SIGTERM)
    old_handlers = {s: signal.signal(s, on_sigint) for s in handled} if _is_main_thread() else {}
    eval_bs = getattr(args, "eval_batch_size", None) or max(run["batch_size"], 16)
    progress = ddp.main and not getattr(args, "no_progress", False)
    epoch = start_epoch
    interrupted = False
    last_plot = time.perf_counter()
    try:
        while epoch < run["epochs"] and global_step < total_steps:
            batch0 = start_batch if epoch == start_epoch else 0
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch, batch0)
            # a private generator: creating a DataLoader iterator draws a seed from the given generator, and
            # drawing it from the global RNG would shift the model's random streams after a mid-epoch resume
            loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, generator=torch.Generator(),
                                                 num_workers=getattr(args, "workers", 0),
                                                 pin_memory=device.type == "cuda")
            n_batches = min(len(sampler), total_steps - global_step)
            bar = _progress(total=n_batches, desc=f"epoch {epoch + 1}/{run['epochs']}", disable=not progress)
            model.train()
            t0, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            b = batch0
            if ddp.any(stop["flag"]):  # interrupted during the last evaluation
                bar.close()
                interrupted = True
                save(epoch, b, "interrupt")
                break
            for seqs in loader:
                frames = seqs[:, :pre + aft].to(device, dtype, non_blocking=True)
                with prec.autocast():  # the forward pass and the loss; backward runs outside, as AMP prescribes
                    loss, logs = step_module(frames, global_step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {global_step}")
                optimizer.zero_grad(set_to_none=True)
                prec.scaler.scale(loss).backward()
                if run["clip_grad"]:
                    prec.scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), run["clip_grad"])
                prec.scaler.step(optimizer)  # 16-mixed: skipped when the scaled gradients overflowed
                prec.scaler.update()
                scheduler.step()
                global_step += 1
                session_steps += 1
                if stop_after and session_steps >= stop_after:
                    stop["flag"] = True
                b += 1
                lv = float(loss.detach())
                loss_sum, loss_n = loss_sum + lv, loss_n + 1
                seen += frames.shape[0] * ddp.world
                if ddp.main:
                    history["steps"].append([global_step, lv])
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{lv:.4g}", seq_s=f"{seen / max(dt, 1e-9):.1f}", refresh=False)
                bar.update(1)
                if global_step >= total_steps:
                    break
                if ddp.any(stop["flag"]):
                    interrupted = True
                    break
            bar.close()
            if interrupted or (ddp.enabled and ddp.any(stop["flag"])):
                interrupted = True
                save(epoch, b, "interrupt")
                break
            epoch_time = time.perf_counter() - t0
            finished_epoch = b >= steps_per_epoch
            train_loss = float(ddp.all_reduce(torch.tensor([loss_sum, loss_n], dtype=torch.float64)).div(
                ddp.world).tolist()[0] / max(loss_n, 1)) if loss_n else math.nan
            results = evaluate(model, test_ds, pre, aft, eval_bs, device, dtype, ddp,
                               precision=run["precision"])["model"]
            record = {"epoch": epoch + 1, "step": global_step, "train_loss": train_loss,
                      "lr": scheduler.get_last_lr()[0], **results, "epoch_time_s": epoch_time,
                      "train_seq_per_s": seen / max(epoch_time, 1e-9)}
            history["epochs"].append(record)
            next_epoch, next_batch = (epoch + 1, 0) if finished_epoch else (epoch, b)
            save(next_epoch, next_batch, "epoch")
            if ddp.main:
                _write_logs(out, history, run, model, ddp)
                # the loss curve (matplotlib, ~1 s) at most once a minute and after the last epoch
                last = epoch + 1 >= run["epochs"] or global_step >= total_steps
                plot = last or time.perf_counter() - last_plot > 60
                _write_pictures(out, model, test_ds, pre, aft, device, dtype, history, loss_curve=plot,
                                precision=run["precision"])
                if plot:
                    last_plot = time.perf_counter()
                print(f"epoch {epoch + 1}/{run['epochs']} step {global_step}: loss {train_loss:.5g} | test "
                      + " ".join(f"{k} {results[k]:.4g}" for k in METRICS)
                      + f" | {record['train_seq_per_s']:.1f} seq/s", flush=True)
            epoch = next_epoch
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)

    summary = {"out": out, "global_step": global_step, "epoch": epoch, "interrupted": interrupted,
               "signal": stop["signal"], "op_backends": {op: sorted(b) for op, b in backends_used.items()},
               "checkpoint": ckpt_path, "final": history["epochs"][-1] if history["epochs"] else None}
    if ddp.enabled:
        summary["ddp_max_param_diff"] = _ddp_param_divergence(model, ddp)
    if ddp.main:
        if interrupted:
            print(f"{'interrupted' if stop['signal'] else 'stopped (--stop-after)'} at epoch {epoch + 1}, step {global_step}: saved {ckpt_path}; continue with --resume",
                  file=sys.stderr, flush=True)
        write_text_atomic(json.dumps(summary, indent=1), os.path.join(out, "summary.json"))
    return summary


@contextlib.contextmanager
def recording_backends():
    """Within the block, records which backend each vpfast op ran with: yields {op name: set of backends}."""
    from . import _dispatch
    seen = {}
    ops = list(_dispatch.REGISTRY.values())
    for op in ops:
        def select(backend, *args, _select=op.select, _name=op.name, **kwargs):
            name, fn = _select(backend, *args, **kwargs)
            seen.setdefault(_name, set()).add(name)
            return name, fn
        op.select = select  # an instance attribute over the class's method, removed below
    try:
        yield seen
    finally:
        for op in ops:
            op.__dict__.pop("select", None)


def _is_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def _ddp_param_divergence(model, ddp):
    """Largest |parameter - rank 0's parameter| over all ranks (0 when the replicas are in sync)."""
    worst = 0.0
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        worst = max(worst, (p.detach() - ref).abs().max().item() if p.numel() else 0.0)
    return float(ddp.all_reduce(torch.tensor([worst]), dist.ReduceOp.MAX)[0])


def _write_logs(out, history, run, model, ddp):
    cols = ["epoch", "step", "train_loss", "lr", *METRICS, "epoch_time_s", "train_seq_per_s"]
    tmp = os.path.join(out, f".log.csv.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for rec in history["epochs"]:
            w.writerow(rec)
    os.replace(tmp, os.path.join(out, "log.csv"))
    info = {"run": run, "model_config": dict(getattr(model, "config", {}) or {}), "world_size": ddp.world,
            "epochs": history["epochs"], "steps": history["steps"]}
    write_text_atomic(json.dumps(info, indent=1, default=str), os.path.join(out, "log.json"))


@torch.no_grad()
def predict_batch(model, seqs, pre, aft, device="cpu", dtype=torch.float32, precision="32"):
    """(inputs, truth or None, predictions as float32), all on the CPU, for sequences Tensor[N, T, C, H, W]."""
    was = model.training
    model.eval()
    x = seqs[:, :pre].to(device, dtype)
    y = seqs[:, pre:pre + aft] if seqs.shape[1] >= pre + aft else None
    with autocast_for(precision, device):
        p = model(x)
    model.train(was)
    return x.cpu(), (None if y is None else y.cpu()), p.float().cpu()


def _write_pictures(out, model, test_ds, pre, aft, device, dtype, history, loss_curve=True, precision="32"):
    from .visualize import save_gif, save_grid, save_loss_curve
    seqs = torch.stack([test_ds[i] for i in range(min(2, len(test_ds)))])
    x, y, p = predict_batch(model, seqs, pre, aft, device, dtype, precision)
    save_grid(os.path.join(out, "predictions.png"), x, y, p)
    save_gif(os.path.join(out, "predictions.gif"), x, y, p)
    if not loss_curve:
        return
    steps = [s for s, _ in history["steps"]]
    losses = [v for _, v in history["steps"]]
    save_loss_curve(os.path.join(out, "loss.png"), steps, losses, [r["step"] for r in history["epochs"]],
                    [r["mse"] for r in history["epochs"]])


# ---------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p):
    p.add_argument("--model", help="model name (convlstm, predrnn, predrnnv2, motionrnn, simvp_incepu, "
                                   "simvp_gsta, tau, predrnnpp, mim, phydnet, e3dlstm) or "
                                   "'package.module:factory'")
    p.add_argument("--preset", help="model preset: mmnist (reference size) or small")
    p.add_argument("--config", help="JSON object of model config overrides, e.g. '{\"hid_S\": 16}'")
    p.add_argument("--backend", help="op backend for the model (torch, cpp, triton, cuda; default auto)")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the reference's for the model)")
    p.add_argument("--train-size", type=int, help="training sequences per epoch (default 10000)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is "
                                                  "fitted to them)")
    p.add_argument("--seed", type=int, help="seed of initialisation, data and sampling (default 0)")
    p.add_argument("--data", help="'mmnist' (default: generated Moving MNIST) or a file of sequences "
                                  "(.npy/.npz/.pt [N, T, C, H, W], or mnist_test_seq.npy)")
    p.add_argument("--test-data", help="test sequences ('mmnist' or a file); default: generated test set, "
                                       "or the last 10%% of --data")
    p.add_argument("--test-size", type=int, help="test sequences to evaluate (default 1000)")
    p.add_argument("--pre", type=int, help="observed frames (default 10, or the model's)")
    p.add_argument("--aft", type=int, help="predicted frames (default 10, or the model's)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="parameter dtype (default float32)")
    add_device_arguments(p, "training")
    p.add_argument("--weight-decay", type=float, help="Adam weight decay (default 0)")
    p.add_argument("--final-div-factor", type=float, help="OneCycle final_div_factor (default 1e4)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default off)")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch per process")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--out", default="runs/latest", help="output directory (default runs/latest)")
    p.add_argument("--resume", nargs="?", const="auto", help="continue from OUT/last.pt (or the given file)")
    p.add_argument("--overwrite", action="store_true", help="start over even if OUT already has a checkpoint")
    p.add_argument("--stop-after", type=int, help="save and stop after this many steps of this session (for "
                                                   "time-limited jobs; continue with --resume)")
    p.add_argument("--find-unused-parameters", action="store_true", help="DDP option for models with "
                                                                          "parameters unused in some steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_device_arguments(p, what):
    """--device and --precision, shared by train, eval, predict and demo."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: $VPFAST_DEVICE, else cuda if available, "
                                    "else cpu)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"{what} arithmetic: 32 (float32, default), bf16-mixed (autocast to bfloat16, CPU or GPU) or "
                        "16-mixed (autocast to float16 with gradient scaling, GPU only)")
    return p


def _cmd_train(args):
    summary = train(args)
    return 130 if summary["signal"] else 0


def run_command(func, args):
    """Run a subcommand, turning user errors into one-line messages and exit codes (0 ok, 2 bad input or
    checkpoint, 130 interrupted)."""
    try:
        return func(args) or 0
    except (UsageError, CheckpointError) as e:
        print(f"vpfast {getattr(args, 'command', '')}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


def add_subcommands(subparsers):
    """Register train, eval, predict and demo on an argparse subparsers object (used by vpfast.cli).

    Each sets `func`: `sys.exit(args.func(args))` runs the command with its error handling and exit code.
    """
    from . import evaluate as ev
    p = subparsers.add_parser("train", help="train a model (Moving MNIST by default)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=lambda a: run_command(_cmd_train, a), command="train")
    ev.add_subcommands(subparsers)
    return subparsers


def main(argv=None):
    """`vpfast train` as a stand-alone program (`python -m vpfast.train`)."""
    p = argparse.ArgumentParser(prog="python -m vpfast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    args = p.parse_args(argv)
    args.command = "train"
    return run_command(_cmd_train, args)


def cli(argv=None):
    """A CLI with the subcommands of this module and vpfast.evaluate (train, eval, predict, demo)."""
    p = argparse.ArgumentParser(prog="vpfast")
    sub = p.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
