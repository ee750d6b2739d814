"""`vpfast eval`, `vpfast predict` and `vpfast demo`.

- eval: metrics of a checkpoint on a test set (generated Moving MNIST test sequences, or a file such as
  mnist_test_seq.npy), next to the trivial baselines (predict zeros; repeat the last observed frame).
- predict: predictions of a checkpoint for given input sequences, as .npy plus a PNG grid and a GIF.
- demo: trains a small model for a few minutes on this machine and shows how far it beats the baselines.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from .checkpoint import FORMAT, CheckpointError, load_checkpoint_file, load_model_state, write_text_atomic
from .data import make_dataset
from .train import (UsageError, add_device_arguments, build_model, check_precision, evaluate,
                    format_metrics_table, model_seq_lengths, predict_batch, resolve_device, run_command)


def _unwrap_state_dict(obj):
    # the containers users hand us (MODELS.md section 9): raw, Lightning's, DDP's, thuml's
    if isinstance(obj, dict):
        for key in ("state_dict", "net_param", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no state_dict")
    for prefix in ("module.", "model."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_model(path, model=None, preset=None, backend=None, config=None, dtype=torch.float32, device="cpu"):
    """A model ready for evaluation, on `device`, from a vpfast training checkpoint (rebuilt from its name and
    config) or from plain weights in any common container (then `model` names the architecture). The file is
    read onto the CPU whatever device saved it."""
    ck = load_checkpoint_file(path)
    if isinstance(ck, dict) and ck.get("format") == FORMAT:
        if model and model != ck["model_name"]:
            raise CheckpointError(f"{path} holds a {ck['model_name']!r} model, not {model!r}")
        net = build_model(ck["model_name"], backend=backend, config=ck["model_config"])
        load_model_state(net, ck["state_dict"], path)
        meta = {"model": ck["model_name"], "epoch": ck["epoch"], "global_step": ck["global_step"],
                "pre": ck["train_args"].get("pre", 10), "aft": ck["train_args"].get("aft", 10)}
    else:
        if not model:
            raise UsageError(f"{path} is not a vpfast training checkpoint: pass --model (and --preset) to say "
                             "which architecture its weights belong to")
        net = build_model(model, preset, backend, config)
        try:
            from .models import load_checkpoint
        except ImportError:
            load_checkpoint = None
        if load_checkpoint is not None:
            try:
                load_checkpoint(net, ck)
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path} does not match model {model!r}: {e}") from None
        else:
            load_model_state(net, _unwrap_state_dict(ck), path)
        meta = {"model": model, "pre": 10, "aft": 10}
    net = net.to(device, dtype).eval()
    meta["pre"], meta["aft"] = model_seq_lengths(net, meta["pre"], meta["aft"])
    return net, meta


def _add_model_args(p):
    p.add_argument("checkpoint", help="a vpfast training checkpoint (OUT/last.pt) or a file of model weights")
    p.add_argument("--model", help="architecture of plain weights (not needed for vpfast checkpoints)")
    p.add_argument("--preset", help="preset of --model")
    p.add_argument("--config", help="JSON object of config overrides for --model")
    p.add_argument("--backend", help="op backend (default auto)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch (default 32)")
    add_device_arguments(p, "inference")


def _device_from_args(args):
    """(device, precision) of --device / --precision, checked."""
    device = resolve_device(getattr(args, "device", None))
    precision = getattr(args, "precision", None) or "32"
    check_precision(precision, device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device, precision


def _load_from_args(args, device="cpu"):
    from .train import _parse_config
    return load_model(args.checkpoint, args.model, args.preset, args.backend, _parse_config(args.config),
                      device=device)


def _test_set(data, size, seed):
    try:
        ds = make_dataset(data or "mmnist", "test", length=size, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return ds


def cmd_eval(args):
    device, precision = _device_from_args(args)
    net, meta = _load_from_args(args, device)
    ds = _test_set(args.data, args.test_size, args.seed)
    t0 = time.perf_counter()
    res = evaluate(net, ds, meta["pre"], meta["aft"], args.batch_size, device=device, baselines=not args.no_baselines,
                   progress=not args.no_progress, precision=precision)
    dt = time.perf_counter() - t0
    print(f"{meta['model']} on {len(ds)} test sequences ({args.data or 'generated Moving MNIST test set'}), "
          f"{dt:.1f} s on {device}, precision {precision}; MSE/MAE are per-frame sums, SSIM/PSNR per-frame means")
    print(format_metrics_table(res))
    if args.json:
        write_text_atomic(json.dumps({"checkpoint": args.checkpoint, **meta, "test_sequences": len(ds),
                                      "device": str(device), "precision": precision, "metrics": res}, indent=1),
                          args.json)
    return 0


def cmd_predict(args):
    from .visualize import save_gif, save_grid
    device, precision = _device_from_args(args)
    net, meta = _load_from_args(args, device)
    pre, aft = meta["pre"], meta["aft"]
    if args.input:
        ds = _test_set(args.input, None, 0)
    else:
        ds = _test_set("mmnist", args.num, args.seed)
    n = min(args.num, len(ds))
    seqs = torch.stack([ds[i] for i in range(n)])
    if seqs.shape[1] < pre:
        raise UsageError(f"input sequences have {seqs.shape[1]} frames; the model needs {pre} observed frames")
    preds = []
    for i in range(0, n, args.batch_size):
        x, y, p = predict_batch(net, seqs[i:i + args.batch_size], pre, aft, device, precision=precision)
        preds.append(p)
    pred = torch.cat(preds)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "predictions.npy"), pred.numpy())
    x = seqs[:, :pre]
    y = seqs[:, pre:pre + aft] if seqs.shape[1] >= pre + aft else None
    save_grid(os.path.join(args.out, "predictions.png"), x, y, pred, max_sequences=args.pictures)
    save_gif(os.path.join(args.out, "predictions.gif"), x, y, pred)
    print(f"wrote {args.out}/predictions.npy {tuple(pred.shape)} [N, T, C, H, W], predictions.png, predictions.gif")
    return 0


# ------------------------------------------------------------------------------------------------- demo
DEMO_MODEL, DEMO_PRESET = "tau", "small"
DEMO_MIN_STEPS = 300
# measured here (docs/TRAINING.md): TAU small at batch 8, peak lr 2e-3 beats the zeros baseline's MSE by ~30%
# after 300 steps
DEMO_BATCH, DEMO_LR = 8, 2e-3


def _calibrate(args, batch, device, precision):
    """Seconds per training step of the demo model at `batch` on `device` (2 timed steps after a warm-up)."""
    from .data import MovingMNIST
    from .train import Precision, _parse_config
    torch.manual_seed(0)
    net = build_model(args.model, args.preset, args.backend, _parse_config(args.config)).to(device)
    prec = Precision(precision, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ds = MovingMNIST(batch)
    frames = torch.stack([ds[i] for i in range(batch)]).to(device)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        with prec.autocast():
            loss, _ = net.training_loss(frames, i)
        opt.zero_grad()
        prec.scaler.scale(loss).backward()
        prec.scaler.step(opt)
        prec.scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def cmd_demo(args):
    from .train import train
    batch = args.batch_size
    device, precision = _device_from_args(args)
    if args.steps:
        steps = args.steps
        plan = f"{steps} steps (--steps)"
    else:
        sec = _calibrate(args, batch, device, precision)
        # ~80% of the budget for training; the rest goes to evaluation and pictures
        steps = int(args.minutes * 60 * 0.8 / sec)
        plan = f"{sec:.2f} s per step of {batch} sequences here -> {max(steps, args.min_steps)} steps"
        if steps < args.min_steps:
            plan += (f" (the budget allows only {steps}; the model needs about {args.min_steps} to learn visibly, "
                     f"so this takes ~{args.min_steps * sec / 0.8 / 60:.0f} min on this machine)")
            steps = args.min_steps
    epochs = max(1, min(args.epochs, steps // 10))
    per_epoch = math.ceil(steps / epochs)
    print(f"vpfast demo: {args.model} ({args.preset}), ~{args.minutes:g} min budget: {plan}, {epochs} epochs",
          flush=True)
    targs = argparse.Namespace(
        model=args.model, preset=args.preset, config=args.config, backend=args.backend, epochs=epochs,
        batch_size=batch, lr=args.lr, train_size=per_epoch * batch, max_steps=steps, seed=args.seed,
        data="mmnist", test_data=None, test_size=min(200, args.test_size), pre=None, aft=None, dtype=None,
        device=str(device), precision=precision,
        weight_decay=None, final_div_factor=None, clip_grad=None, eval_batch_size=32, workers=0, out=args.out,
        resume=None, overwrite=True, find_unused_parameters=False, no_progress=args.no_progress)
    t0 = time.perf_counter()
    summary = train(targs)
    train_time = time.perf_counter() - t0
    if summary["interrupted"]:
        return 130
    net, meta = load_model(os.path.join(args.out, "last.pt"), backend=args.backend, device=device)
    ds = _test_set("mmnist", args.test_size, args.seed)
    res = evaluate(net, ds, meta["pre"], meta["aft"], 32, device=device, baselines=True,
                   progress=not args.no_progress, precision=precision)
    table = format_metrics_table(res)
    ratio = {k: res[k]["mse"] / res["model"]["mse"] for k in ("zeros", "last")}
    text = (f"{args.model} ({args.preset}) trained {summary['global_step']} steps x {batch} sequences in "
            f"{train_time / 60:.1f} min, evaluated on {len(ds)} held-out Moving MNIST sequences:\n\n{table}\n\n"
            f"MSE of predicting zeros / model: {ratio['zeros']:.2f}; of repeating the last frame / model: "
            f"{ratio['last']:.2f} (above 1: the model is better).\n"
            f"pictures: {args.out}/predictions.png, predictions.gif, loss.png")
    print(text)
    write_text_atomic(text + "\n", os.path.join(args.out, "demo.md"))
    write_text_atomic(json.dumps({"model": args.model, "preset": args.preset, "steps": summary["global_step"],
                                  "batch_size": batch, "train_minutes": train_time / 60,
                                  "test_sequences": len(ds), "metrics": res}, indent=1),
                      os.path.join(args.out, "demo.json"))
    return 0


def add_subcommands(subparsers):
    p = subparsers.add_parser("eval", help="metrics of a checkpoint on a test set, with trivial baselines")
    _add_model_args(p)
    p.add_argument("--data", help="'mmnist' (default: the generated test set) or a file, e.g. mnist_test_seq.npy")
    p.add_argument("--test-size", type=int, help="number of test sequences (default 1000 generated / whole file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated test set (default 0)")
    p.add_argument("--no-baselines", action="store_true", help="skip the zeros / last-frame baselines")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: run_command(cmd_eval, a), command="eval")

    p = subparsers.add_parser("predict", help="predict future frames for given input sequences")
    _add_model_args(p)
    p.add_argument("--input", help="file of sequences [N, T, C, H, W] (T >= observed frames); default: "
                                   "generated Moving MNIST test sequences")
    p.add_argument("--num", type=int, default=8, help="sequences to predict (default 8)")
    p.add_argument("--pictures", type=int, default=2, help="sequences in the PNG grid (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    p.set_defaults(func=lambda a: run_command(cmd_predict, a), command="predict")

    p = subparsers.add_parser("demo", help="train a small model for a few minutes and compare with baselines")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--steps", type=int, help="train exactly this many steps instead of fitting the budget")
    p.add_argument("--min-steps", type=int, default=DEMO_MIN_STEPS,
                   help=f"never fewer steps than this, even on a slow machine (default {DEMO_MIN_STEPS})")
    p.add_argument("--model", default=DEMO_MODEL, help=f"default {DEMO_MODEL}")
    p.add_argument("--preset", default=DEMO_PRESET, help=f"default {DEMO_PRESET}")
    p.add_argument("--config", help="JSON object of model config overrides")
    p.add_argument("--backend", help="op backend (default auto: the fastest available)")
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH, help=f"default {DEMO_BATCH}")
    add_device_arguments(p, "training")
    p.add_argument("--lr", type=float, default=DEMO_LR, help=f"peak learning rate (default {DEMO_LR:g})")
    p.add_argument("--epochs", type=int, default=5, help="evaluations during training (default 5)")
    p.add_argument("--test-size", type=int, default=1000, help="final test sequences (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: run_command(cmd_demo, a), command="demo")
    return subparsers


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vpfast.evaluate")
    sub = p.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
