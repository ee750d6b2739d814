"""Evaluation: metrics of a model on a test set next to the trivial baselines (predict zeros; repeat the last
observed frame), predictions for given sequences, and loading a model for either from a training checkpoint
or from plain weights. The commands that use these (`vpfast eval`, `predict`, `demo`) are in vpfast.commands.
"""
import torch

from .checkpoint import FORMAT, CheckpointError, load_checkpoint_file, load_model_state
from .data import ShardedBatchSampler, make_dataset
from .distributed import Dist
from .metrics import MetricAccumulator
from .runtime import UsageError, autocast_for, build_model, check_frame_values, model_seq_lengths, progress_bar


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
    bar = progress_bar(total=len(sampler), desc="eval", disable=not progress)
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
    check_frame_values(seqs)


def format_metrics_table(results):
    """A Markdown table of {row name: metrics dict}."""
    lines = ["| predictor | MSE | MAE | SSIM | PSNR |", "|---|---:|---:|---:|---:|"]
    names = {"model": "model", "zeros": "zeros (baseline)", "last": "repeat last frame (baseline)"}
    for k, m in results.items():
        lines.append(f"| {names.get(k, k)} | {m['mse']:.2f} | {m['mae']:.2f} | {m['ssim']:.4f} | {m['psnr']:.2f} |")
    return "\n".join(lines)



# ------------------------------------------------------------------------------- stochastic evaluation
LOWER_IS_BETTER = {"mse": True, "mae": True, "ssim": False, "psnr": False}


def best_and_mean(samples, true):
    """Per-sequence scores of n sampled futures, as papers on stochastic prediction report them.

    samples: Tensor[B, n, T, C, H, W], true: Tensor[B, T, C, H, W] -> (best, mean), each a dict of Tensor[B]
    (float64) per metric: a sample's score is its metric averaged over the T frames; `best` takes, per sequence
    and per metric, the best sample's score (lowest MSE/MAE, highest SSIM/PSNR: each metric picks its own
    sample), `mean` the average over the n samples.
    """
    from .metrics import frame_metrics
    if samples.dim() != 6 or samples.shape[:1] + samples.shape[2:] != true.shape:
        raise ValueError(f"samples must be Tensor[B, n, T, C, H, W] matching true {tuple(true.shape)}, got "
                         f"{tuple(samples.shape)}")
    per = {k: v.mean(-1) for k, v in frame_metrics(samples, true[:, None].expand_as(samples)).items()}
    best = {k: (v.amin(1) if LOWER_IS_BETTER[k] else v.amax(1)) for k, v in per.items()}
    return best, {k: v.mean(1) for k, v in per.items()}


def check_sampler(model, n):
    """UsageError unless `model` has sample(x, n=..., generator=...) and n is a positive int."""
    if not callable(getattr(model, "sample", None)):
        raise UsageError(f"{getattr(model, 'name', type(model).__name__)} is deterministic (it has no sample "
                         "method); run it without --samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"--samples must be a positive int, got {n!r}")


@torch.no_grad()
def draw_samples(model, x, n, device="cpu", precision="32", generator=None):
    """model.sample(x, n=n) for x: Tensor[B, pre, C, H, W] -> Tensor[B, n, aft, C, H, W] float32 on the CPU, under
    the autocast of `precision`, the draws from `generator` (a torch.Generator on `device`; default global)."""
    check_sampler(model, n)
    device = torch.device(device)
    was = model.training
    model.eval()
    with autocast_for(precision, device):
        out = model.sample(x.to(device), n=n, generator=generator)
    model.train(was)
    return out.float().cpu()


def evaluate_samples(model, dataset, pre, aft, n, batch_size=32, device="cpu", precision="32", seed=0):
    """Best and mean over n samples (model.sample) per test sequence, averaged over the dataset:
    {"best of n": metrics, "mean of n": metrics}. The draws come from one generator seeded with `seed`."""
    check_sampler(model, n)
    gen = torch.Generator(torch.device(device)).manual_seed(seed)
    sums = {"best": {}, "mean": {}}
    count = 0
    for i in range(0, len(dataset), batch_size):
        seqs = torch.stack([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        _check_frames(seqs, pre, aft)
        samples = draw_samples(model, seqs[:, :pre], n, device, precision, gen)
        for kind, scores in zip(("best", "mean"), best_and_mean(samples, seqs[:, pre:pre + aft].float())):
            for k, v in scores.items():
                sums[kind][k] = sums[kind].get(k, 0.0) + v.sum().item()
        count += seqs.shape[0]
    return {f"{kind} of {n}": {k: v / count for k, v in d.items()} for kind, d in sums.items()}


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


def load_test_set(data, size, seed):
    """A test set: generated Moving MNIST ("mmnist" or None; `size` sequences from `seed`) or a file."""
    try:
        ds = make_dataset(data or "mmnist", "test", length=size, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return ds
