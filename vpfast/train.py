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
import contextlib
import csv
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import (FORMAT, VERSION, CheckpointError, load_model_state, load_training_checkpoint,
                         rng_state, save_atomic, set_rng_state, write_text_atomic)
from .data import ShardedBatchSampler, layout_note, make_dataset
from .distributed import Dist, param_divergence
from .evaluate import evaluate, predict_batch
from .metrics import METRICS
from .runtime import (Precision, UsageError, build_model, check_frame_values, check_precision,
                      check_sequence_shape, model_seq_lengths, parse_config, progress_bar)

# training arguments that define the run; on --resume they come from the checkpoint and may not change
# (the test set is part of the run: a resumed run that evaluated on another one would log incomparable rows)
RUN_KEYS = ("model", "preset", "config", "epochs", "batch_size", "lr", "train_size", "max_steps", "seed",
            "data", "test_data", "test_size", "pre", "aft", "dtype", "precision", "final_div_factor",
            "weight_decay", "clip_grad")
RUN_DEFAULTS = {"preset": None, "config": None, "epochs": 10, "batch_size": 16, "lr": None, "train_size": 10000,
                "max_steps": None, "seed": 0, "data": "mmnist", "test_data": None, "test_size": None, "pre": 10, "aft": 10, "dtype": "float32",
                "precision": "32", "final_div_factor": 1e4, "weight_decay": 0.0, "clip_grad": None}
# reference learning rates (MODELS.md section 8)
DEFAULT_LR = {"convlstm": 5e-4, "predrnn": 5e-4, "predrnnv2": 5e-4, "motionrnn": 3e-4,
              "predrnnpp": 1e-4, "mim": 5e-4, "e3dlstm": 1e-4}  # OpenSTL configs (MODELS.md §14)


class _LossModule(nn.Module):
    # DDP only synchronises gradients for computations that go through its forward(); the model's loss is a
    # separate method, so this wrapper routes it through forward.
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames, itr):
        return self.model.training_loss(frames, itr)


# ---------------------------------------------------------------------------------------------- training
def _resolve_run_args(args, ckpt=None):
    """Fill the run-defining arguments: from the checkpoint on resume (an explicit different value is an
    error), otherwise from the defaults."""
    run = {}
    for k in RUN_KEYS:
        given = getattr(args, k, None)
        if k == "config" and given is not None and not isinstance(given, dict):
            given = parse_config(given)
        if ckpt is not None and k not in ckpt["train_args"] and k in ("test_data", "test_size"):
            run[k] = given  # a checkpoint from before the test set was saved: as given now
        elif ckpt is not None:
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


def _datasets(run, pre, aft, model_config=None):
    data = run["data"]
    test_data, test_size = run["test_data"], run["test_size"]
    seed = run["seed"]
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
        check_frame_values(ds[0], name)  # the first sequence only: a file can be large
    return train_ds, test_ds


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
    train_ds, test_ds = _datasets(run, pre, aft, getattr(model, "config", None))
    for note in {layout_note(train_ds), layout_note(test_ds)} - {None}:
        if ddp.main:
            print(f"note: {note}", file=sys.stderr, flush=True)
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
    resumed_acc = None
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
        # the partial sums of the epoch the checkpoint stopped in, so that its log row is the uninterrupted one's
        accs = ckpt.get("epoch_acc_per_rank") or []
        resumed_acc = accs[ddp.rank] if len(accs) == ddp.world else None
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

    def save(epoch, batch_in_epoch, reason, acc=None):
        # acc: this process's sums over the unfinished epoch (None when the next epoch starts afresh)
        per_rank = ddp.gather_object((rng_state(device), acc))
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
            "rng_per_rank": [r for r, _ in per_rank], "world_size": ddp.world,
            "epoch_acc_per_rank": [a for _, a in per_rank] if acc is not None else None, "torch": str(torch.__version__),
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
            bar = progress_bar(total=n_batches, desc=f"epoch {epoch + 1}/{run['epochs']}", disable=not progress)
            model.train()
            t0, seen, loss_sum, loss_n, time0 = time.perf_counter(), 0, 0.0, 0, 0.0
            if batch0 and resumed_acc is not None:
                seen, loss_sum, loss_n, time0 = (resumed_acc[k] for k in ("seen", "loss_sum", "loss_n", "time_s"))
            b = batch0

            def epoch_acc():
                return {"seen": seen, "loss_sum": loss_sum, "loss_n": loss_n,
                        "time_s": time0 + time.perf_counter() - t0}

            if ddp.any(stop["flag"]):  # interrupted during the last evaluation
                bar.close()
                interrupted = True
                save(epoch, b, "interrupt", epoch_acc())
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
                bar.set_postfix(loss=f"{lv:.4g}", seq_s=f"{seen / max(time0 + dt, 1e-9):.1f}", refresh=False)
                bar.update(1)
                if global_step >= total_steps:
                    break
                if ddp.any(stop["flag"]):
                    interrupted = True
                    break
            bar.close()
            if interrupted or (ddp.enabled and ddp.any(stop["flag"])):
                # also when this was the epoch's last step: the evaluation and log row come after the resume,
                # from these sums, as they would have come now
                interrupted = True
                save(epoch, b, "interrupt", epoch_acc())
                break
            epoch_time = epoch_acc()["time_s"]
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
        summary["ddp_max_param_diff"] = param_divergence(model, ddp)
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


if __name__ == "__main__":  # `python -m vpfast.train` (and torchrun -m vpfast.train): the train command
    from .commands import train_main

    sys.exit(train_main())
