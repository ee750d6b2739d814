"""torch.compile (the default Inductor backend) of a whole training step, loss and backward, of each recurrent
model that runs fused ops, against the same step in eager mode.

This is what failed before the fakes reported the kernels' strides (tests/test_fake_strides.py): Inductor
lays out the convolutions around the fused ops channels_last on the CPU, the fake kernels then copied those
strides (empty_like) while the kernels return NCHW-contiguous tensors, and the compiled backward stopped at
its run-time stride assertion (PredRNN, MIM: stlstm_gates_backward). fullgraph is not asked for: the
training losses log floats (.item()) and draw the sampling masks from a generator, which break the graph.

Tiny shapes keep the compilations short: 8x8 frames in 2x2 patches (4x4 maps; PhyDNet in 4x4 patches), one
layer of 4 channels (two where the model needs them), 2 observed + 1 predicted frames (2 recurrent steps, so
gradients flow through the recurrence).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import torch

import vpfast.models as M

# slow: Inductor's code generation and C++ compilation take 10-100 s per model here (6-8 min for the module on
# a shared 2-core CPU); `-m "not slow"` leaves it out of a quick run
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# one layer where the model allows it; MotionRNN, PredRNN++ and MIM need two (their extra modules sit between
# layers), which also covers a stacked layer's input
ONE, TWO = dict(num_hidden="4", filter_size=3, patch_size=2), dict(num_hidden="4,4", filter_size=3, patch_size=2)
MODELS = {
    "predrnn": ONE,
    "predrnnv2": ONE,
    "motionrnn": TWO,
    "predrnnpp": TWO,
    "mim": TWO,
    "e3dlstm": ONE,
    "convlstm": ONE,
    "phydnet": dict(patch_size=4),
}

# float32 tolerances. Inductor fuses the pointwise work around the convolutions and the fused ops into its own
# loops and reorders sums, so loss and gradients differ from eager by float32 roundings accumulated over two
# recurrent steps forward and back. Measured here: loss within 6e-8, gradients within 6e-8 for the RNNs and
# 1.4e-6 for PhyDNet (larger gradients, its 3M-parameter encoder), all a few float32 ulps of the values they
# belong to. rtol 1e-4 / atol 1e-6 leaves one to two orders of margin, while an output read with the wrong
# strides (the failure this guards against) is off by the gradients' own size.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module", autouse=True)
def fresh_inductor_cache():
    """A fresh Inductor/FX cache for this module: a graph cached against earlier fake kernels would be reused
    with their output strides (see vpfast.testing.private_compile_cache)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = tempfile.mkdtemp(prefix="vpfast-compile-models-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    shutil.rmtree(path, ignore_errors=True)


def _step(model, frames):
    """One training step: the loss (detached) and the parameters' gradients; fixed sampling draws."""
    for p in model.parameters():
        p.grad = None
    loss, _ = model.training_loss(frames, 10, generator=torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_step_matches_eager(name):
    torch.manual_seed(0)
    model = M.create(name, in_shape=(2, 1, 8, 8), pre_seq_length=2, aft_seq_length=1, backend="cpp",
                     **MODELS[name]).float()
    frames = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    loss_eager = _step(model, frames)
    grads_eager = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads_eager, "the step produced no gradients"

    torch._dynamo.reset()  # each model compiles afresh (the training_loss code objects are shared)
    t0 = time.perf_counter()
    loss_comp = torch.compile(_step)(model, frames)
    grads_comp = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    elapsed = time.perf_counter() - t0

    assert grads_comp.keys() == grads_eager.keys()
    torch.testing.assert_close(loss_comp, loss_eager, rtol=RTOL, atol=ATOL)
    for k in grads_eager:
        torch.testing.assert_close(grads_comp[k], grads_eager[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    worst = max((grads_comp[k] - grads_eager[k]).abs().max().item() for k in grads_eager)
    scale = max(g.abs().max().item() for g in grads_eager.values())
    print(f"{name}: compiled in {elapsed:.1f} s, |loss diff| {(loss_comp - loss_eager).abs().item():.2e}, "
          f"max |grad diff| {worst:.2e} (max |grad| {scale:.2e})")
