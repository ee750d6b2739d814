"""Checks shared by the whole-model test files (test_models.py, test_models_baselines.py), which build their tiny
configurations differently but hold every model to the same contract. Imported with tests/ on sys.path."""
import pytest
import torch


def ref_patch(frames, p):
    """MODELS.md §3: [B,T,C,H,W] -> [B,T,H,W,C] -> reshape_patch -> channels first."""
    x = frames.permute(0, 1, 3, 4, 2)
    B, T, H, W, C = x.shape
    a = x.reshape(B, T, H // p, p, W // p, p, C).permute(0, 1, 2, 4, 3, 5, 6)
    return a.reshape(B, T, H // p, W // p, p * p * C).permute(0, 1, 4, 2, 3)


def check_fast_matches_torch(tiny, name, loss_of):
    """The default (fast) backend against backend="torch" with the same weights: one training step's loss and
    gradients and the eval prediction agree to float64 rounding. `tiny(name, backend=...)` builds the float64
    model with 3 observed and 2 predicted 1x16x16 frames; `loss_of(model, frames)` returns its training loss
    (with whatever seeding makes the two models' random draws equal)."""
    ref = tiny(name, backend="torch").train()
    fast = tiny(name, backend=None).train()
    fast.load_state_dict(ref.state_dict())
    frames = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    outs = []
    for m in (ref, fast):
        loss = loss_of(m, frames)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        with torch.no_grad():
            y = m.eval()(frames[:, :3])
        outs.append((loss.detach(), grads, y))
    (l0, g0, y0), (l1, g1, y1) = outs
    torch.testing.assert_close(l1, l0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-11)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-8, atol=1e-10, msg=k)


def check_bad_input(m):
    """Bad input to a float64 model observing 3 frames of 1x16x16 (patch or stride 2) raises a clear exception
    that names what is wrong, from forward and from training_loss."""
    x = torch.rand(2, 3, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="5 dimensions"):
        m(x[0])
    with pytest.raises(ValueError, match="pre_seq_length=3"):
        m(torch.rand(2, 4, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="C=1 channels"):
        m(torch.rand(2, 3, 2, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by"):
        m(torch.rand(2, 3, 1, 17, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.float())
    with pytest.raises(ValueError, match="frames"):
        m.training_loss(x, 0)
