"""Model-level benchmarks: a training step (forward, loss, backward) and an inference call per model.

Providers: `eager` = the model with backend="torch" (the reference arithmetic, PyTorch eager), `compile` =
torch.compile of that model (SimVP/TAU; the recurrent models unroll 19 steps x 4 layers, which takes minutes
to compile here, so they are not compiled at model level), `vpfast` = the model with its fused layers
(backend auto: cpp kernels on this CPU; with --device cuda, what auto picks on the GPU).
With --dtype bfloat16/float16 the models keep float32 weights and run under torch.autocast at that dtype.
Shapes: each model's `small` preset at batch 16 and its Moving-MNIST preset at batch 4 (64x64, 10 -> 10).
With --benchmark-disable (CI smoke run) only the small presets run, at batch 2.

The baselines (PredRNN++, MIM, E3D-LSTM, PhyDNet; test_baseline_train) are timed for a training step only, at
the small preset (PhyDNet's sizes are fixed in code: its small preset is OpenSTL's) and at the batch of
BASELINE_BATCH, eager vs vpfast: a step of theirs at batch 16 takes 5-60 s on a 2-core CPU. Their smoke run
(--benchmark-disable) uses batch 1 and 2 -> 2 frames.

The stochastic predictors (diffusion, VAE, GAN, VPTR; test_stochastic_train) are timed the same way: a training
step (their own training_loss: one noise level per sequence for diffusion, KL for the VAE, both GAN objectives)
at the small preset and batch 8, eager vs vpfast; smoke run at batch 1.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from vpfast import models as M
from vpfast.ops.ddr_loss import ddr_loss_reference

SHAPES = {"small-b16": ("small", 16), "mmnist-b4": ("mmnist", 4)}
SIMVPS = ("simvp_incepu", "simvp_gsta", "tau")
BASELINES = ("predrnnpp", "mim", "phydnet", "e3dlstm")
ORIGINAL = tuple(n for n in M.NAMES if n not in BASELINES)
# one training step of each, eager, at the small preset: about 3 s (measured on the 2-core CPU, loaded)
BASELINE_BATCH = {"predrnnpp": 4, "mim": 8, "e3dlstm": 1, "phydnet": 1}
STOCHASTIC_BATCH = 8


@functools.lru_cache(maxsize=None)
def _gflops(name, preset, batch, mode, **config):
    """Work of one call in GFLOP (2 x multiply-adds of the convolutions and matmuls), counted on the meta
    device for the forward pass; a training step is taken as 3 x forward (torch's FlopCounterMode counts
    grouped-convolution backward as dense, so it is not used for backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = M.create(name, preset=preset, backend="torch", **config)
        pre, aft = model.pre_seq_length, model.aft_seq_length
        _, C, H, W = model.config["in_shape"]
        x = torch.empty(batch, pre + aft, C, H, W)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            if name in SIMVPS:
                model._predict(x[:, :pre])
            elif not hasattr(model, "rollout"):  # PhyDNet: its encoder runs over the observed frames too
                model(x[:, :pre])
            else:
                model.rollout(M.patch(x, model.patch_size), model.test_mask(batch, x))
    fwd = fc.get_total_flops() / 1e9
    return 3 * fwd if mode == "train" else fwd


def _setup(name, preset, batch, provider, device="cpu", **config):
    torch.manual_seed(0)
    backend = "torch" if provider in ("eager", "compile") else None
    model = M.create(name, preset=preset, backend=backend, **config).to(device)
    T = model.pre_seq_length + model.aft_seq_length
    _, C, H, W = model.config["in_shape"]
    frames = torch.rand(batch, T, C, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    return model, frames


def _step(model, frames, mode, name, provider, autocast):
    pre = model.pre_seq_length
    if mode == "infer":
        model.eval()
        fwd = torch.compile(model) if provider == "compile" else model

        def infer():
            with torch.no_grad(), autocast():
                return fwd(frames[:, :pre])
        return infer
    model.train()
    if provider == "compile":
        cstep = torch.compile(model.step)

        def loss_fn():
            pred, target = cstep(frames[:, :pre]), frames[:, pre:]
            loss = F.mse_loss(pred, target)
            return loss + 0.1 * ddr_loss_reference(pred, target) if name == "tau" else loss
    else:
        def loss_fn():
            return model.training_loss(frames, 10000)[0]

    def train():
        for p in model.parameters():
            p.grad = None
        with autocast():
            loss = loss_fn()
        loss.backward()
    return train


@pytest.mark.parametrize("provider", ["eager", "compile", "vpfast"])
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ORIGINAL)
def test_model(record, benchmark, name, shape, mode, provider):
    preset, batch = SHAPES[shape]
    if provider == "compile" and name not in SIMVPS:
        pytest.skip("recurrent models: torch.compile of the whole 19-step unroll takes minutes here "
                    "(tests/test_models.py compiles a cell)")
    if benchmark.disabled:  # CI smoke run: the code paths at batch 2, small presets only
        if shape != "small-b16":
            pytest.skip("timing disabled: the Moving-MNIST-size cases only run when timing")
        batch = 2
    model, frames = _setup(name, preset, batch, provider, record.device)
    benchmark.group = f"{name} {shape} {mode}"
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    gflops = None if benchmark.disabled else _gflops(name, preset, batch, mode)
    record(provider, _step(model, frames, mode, name, provider, record.autocast), gflops=gflops)


@pytest.mark.parametrize("provider", ["eager", "vpfast"])
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_train(record, benchmark, name, provider):
    batch, config = BASELINE_BATCH[name], {}
    if benchmark.disabled:  # CI smoke run: the code paths, at a fraction of the cost
        batch, config = 1, dict(in_shape=(2, 1, 64, 64), pre_seq_length=2, aft_seq_length=2)
    model, frames = _setup(name, "small", batch, provider, record.device, **config)
    benchmark.group = f"{name} small-b{batch} train"
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    gflops = None if benchmark.disabled else _gflops(name, "small", batch, "train")
    record(provider, _step(model, frames, "train", name, provider, record.autocast), gflops=gflops)


@pytest.mark.parametrize("provider", ["eager", "vpfast"])
@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
def test_stochastic_train(record, benchmark, name, provider):
    batch = 1 if benchmark.disabled else STOCHASTIC_BATCH
    model, frames = _setup(name, "small", batch, provider, record.device)
    benchmark.group = f"{name} small-b{batch} train"
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    record(provider, _step(model, frames, "train", name, provider, record.autocast))
