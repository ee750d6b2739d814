"""Stochastic and generative predictors (issue 24): each model's defining property on tiny shapes, the registry
and config contract, bad input, and a falling loss on a small Moving-MNIST run."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vpfast import models as M
from vpfast.data.moving_mnist import MovingMNIST
from vpfast.models import diffusion as D
from vpfast.models import vae as V
from vpfast.models import vptr as P

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_DIFF = dict(in_shape=(2, 1, 8, 8), aft_seq_length=2, hid=8, channel_mult="1,2", num_steps=20,
                 sample_steps=4)


TINY_VAE = dict(in_shape=(2, 1, 8, 8), aft_seq_length=2, hid=4, N_S=2, num_hidden=6, z_dim=2)
TINY_VPTR = dict(in_shape=(3, 1, 8, 8), aft_seq_length=2, hid=8, N_S=2, num_layers=2, num_dec_layers=2, heads=2,
                 window_size=2)
TINY_GAN = dict(in_shape=(2, 1, 8, 8), aft_seq_length=2, hid=4, disc_hid=4, z_dim=2)
TINY = {"diffusion": TINY_DIFF, "vae": TINY_VAE, "gan": TINY_GAN, "vptr_far": TINY_VPTR, "vptr_nar": TINY_VPTR}


def tiny(name, backend="torch", dtype=torch.float64, **over):
    torch.manual_seed(0)
    return M.create(name, backend=backend, **dict(TINY[name], **over)).to(dtype)


def tiny_diffusion(backend="torch", dtype=torch.float64, **over):
    return tiny("diffusion", backend, dtype, **over)


def tiny_vae(backend="torch", dtype=torch.float64, **over):
    return tiny("vae", backend, dtype, **over)


def mmnist_batches(n_batches, batch, pre, aft, size=32, seed=0):
    """Fixed one-digit Moving-MNIST batches Tensor[batch, pre + aft, 1, size, size]."""
    ds = MovingMNIST(length=n_batches * batch, seed=seed, n_frames=pre + aft, size=size, num_digits=1)
    seqs = torch.stack([ds[i] for i in range(len(ds))])
    return list(seqs.split(batch))


def fit(model, batches, steps, lr):
    """Adam on the model's own training_loss; returns (mean loss of the first 5 steps, of the last 5)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        loss, logs = model.training_loss(batches[i % len(batches)], i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


# ---- registry and config -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
@pytest.mark.parametrize("preset", ["mmnist", "small"])
def test_presets_and_config_rebuild(name, preset):
    with torch.device("meta"):
        m = M.create(name, preset=preset, backend="torch")
        again = M.create(m.name, backend="torch", **m.config)
    assert m.name == name and isinstance(m, M.VideoPredictionModel)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    json.dumps(m.config)  # checkpoints store the config as plain data
    if name == "diffusion":  # the noise schedule is data on the CPU, whatever the default device
        assert m.alphas_cumprod.device.type == "cpu" and 0 < float(m.alphas_cumprod[-1]) < 1


def test_unknown_model_lists_stochastic_names():
    with pytest.raises(ValueError, match="diffusion"):
        M.create("no_such_model")


@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
def test_load_checkpoint_roundtrip(name, tmp_path):
    m = tiny(name)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"model." + k: v for k, v in m.state_dict().items()}}, path)
    other = M.create(m.name, backend="torch", **m.config).double()
    M.load_checkpoint(other, str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


# ---- diffusion: schedule and the samplers' arithmetic ------------------------------------------------------
def test_diffusion_timesteps():
    m = tiny_diffusion()
    assert m.timesteps(20) == list(range(20))
    ts = m.timesteps(4)
    assert ts[0] == 0 and ts[-1] == 19 and len(ts) == 4 and ts == sorted(set(ts))
    assert m.timesteps(1) == [19]


@pytest.mark.parametrize("schedule", D.BETA_SCHEDULES)
def test_ddim_eta1_variance_is_ddpm_posterior_variance(schedule):
    m = tiny_diffusion(beta_schedule=schedule)
    betas = D.beta_schedule_of(m.config)
    ab = torch.cumprod(1 - betas, 0)
    for t in range(1, 20):  # DDPM's posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        want = float((1 - ab[t - 1]) / (1 - ab[t]) * betas[t])
        assert m.step_variance(t, t - 1, "ddim", eta=1.0) == pytest.approx(want, rel=1e-12)
        assert m.step_variance(t, t - 1, "ddpm") == pytest.approx(want, rel=1e-12)
        assert m.step_variance(t, t - 1, "ddim", eta=0.0) == 0.0
    assert m.step_variance(0, -1, "ddpm") == 0.0  # the last step returns the mean


@pytest.mark.parametrize("steps", [20, 6])
def test_ddim_eta1_step_equals_ddpm_step(steps):
    """Without clipping, one DDIM step at eta = 1 is the DDPM posterior step: the same mean and the same noise
    scale, so with the same fresh noise z the same x_prev; at eta = 0 the noise has no effect."""
    m = tiny_diffusion(clip_denoised=False)
    g = torch.Generator().manual_seed(3)
    xt, eps, z = (torch.randn(2, 2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ts = m.timesteps(steps)
    for i in range(1, len(ts)):
        t, tp = ts[i], ts[i - 1]
        ddpm = m.sampling_step(xt, eps, t, tp, "ddpm", 1.0, z)
        ddim = m.sampling_step(xt, eps, t, tp, "ddim", 1.0, z)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)
        # the part that depends on z is sqrt(posterior variance) * z
        noise_part = ddpm - m.sampling_step(xt, eps, t, tp, "ddpm", 1.0, torch.zeros_like(z))
        torch.testing.assert_close(noise_part, math.sqrt(m.step_variance(t, tp, "ddpm")) * z)
        det = m.sampling_step(xt, eps, t, tp, "ddim", 0.0, z)
        torch.testing.assert_close(det, m.sampling_step(xt, eps, t, tp, "ddim", 0.0, 5 * z), rtol=0, atol=0)


def test_samplers_draw_the_data_distribution_with_the_exact_noise_predictor():
    """Gaussian data x0 ~ N(mu, s^2) per pixel has the exact noise predictor
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar): with it in place of the network,
    DDPM and DDIM must return samples of mean mu and std s, up to their discretisation error, which shrinks
    with the number of steps."""
    N, mu, s = 200, 0.2, 0.25
    m = tiny_diffusion(num_steps=N, beta_schedule="cosine", clip_denoised=False)
    ab_all = m.alphas_cumprod

    def exact(xt, t, past):
        ab = ab_all[t].view(-1, 1, 1, 1, 1).to(xt.dtype)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * mu) / (ab * s * s + 1 - ab)

    m.predict_noise = exact
    x = torch.rand(1, 2, 1, 8, 8, dtype=torch.float64)

    def stats(**kw):
        v = 2 * m.sample(x, n=200, generator=torch.Generator().manual_seed(0), **kw) - 1
        return float(v.mean()), float(v.std())

    for kw, rel in ((dict(sampler="ddpm", steps=N), 0.05), (dict(sampler="ddim", steps=N, eta=0.0), 0.02),
                    (dict(sampler="ddim", steps=N // 2, eta=0.5), 0.05)):
        mean, std = stats(**kw)
        assert abs(mean - mu) < 0.01 and abs(std - s) < rel * s, (kw, mean, std)
    few = stats(sampler="ddim", steps=5, eta=0.0)[1]
    assert abs(few - s) > abs(stats(sampler="ddim", steps=N, eta=0.0)[1] - s)


def test_ddim_eta0_deterministic_for_fixed_noise():
    m = tiny_diffusion().eval()
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    a = m.sample(x, n=3, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(7))
    b = m.sample(x, n=3, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 3, 2, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # the n samples start from different x_T
    # given x_T, eta = 0 uses no other randomness; eta = 1 does
    xT = torch.randn(2, 3, 2, 1, 8, 8, dtype=torch.float64)
    c0 = m.sample(x, n=3, eta=0.0, noise=xT, generator=torch.Generator().manual_seed(1))
    c1 = m.sample(x, n=3, eta=0.0, noise=xT, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c0, c1)
    s0 = m.sample(x, n=3, eta=1.0, noise=xT, generator=torch.Generator().manual_seed(1))
    s1 = m.sample(x, n=3, eta=1.0, noise=xT, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(s0, s1)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_fewer_ddim_steps_run_the_ddpm_trained_model():
    """One network trained with the DDPM loss: DDPM visits every training step, DDIM a sub-sequence."""
    m = tiny_diffusion()
    fit(m, [torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)], 5, 1e-3)
    m.eval()
    seen = []
    hook = m.denoiser.register_forward_pre_hook(lambda mod, args: seen.append(args[1][0].item()))
    x = torch.rand(1, 2, 1, 8, 8, dtype=torch.float64)
    full = m.sample(x, steps=20, sampler="ddpm")
    assert seen == list(range(19, -1, -1))
    seen.clear()
    few = m.sample(x, steps=5, sampler="ddim", eta=0.0)
    assert seen == list(reversed(m.timesteps(5))) and len(seen) == 5
    hook.remove()
    assert full.shape == few.shape == (1, 1, 2, 1, 8, 8) and torch.isfinite(few).all()
    seen.clear()
    assert m(x).shape == (1, 2, 1, 8, 8)  # forward: one sample with the configured sampler and steps


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_diffusion_training_loss_is_target_mse(prediction):
    m = tiny_diffusion(prediction=prediction)
    frames = torch.rand(3, 4, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    loss, logs = m.training_loss(frames)
    torch.manual_seed(5)  # the same draws of t and eps, by hand
    t = torch.randint(0, 20, (3,))
    eps = torch.randn(3, 2, 1, 8, 8, dtype=torch.float64)
    ab = torch.cumprod(1 - D.beta_schedule_of(m.config), 0)[t].view(3, 1, 1, 1, 1)
    x0 = 2 * frames[:, 2:] - 1
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = m.denoiser(xt.flatten(1, 2), t, (2 * frames[:, :2] - 1).flatten(1, 2)).view_as(eps)
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    assert logs["loss"] == pytest.approx(loss.item())


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_diffusion_parameterisations_give_the_same_noise_estimate(prediction):
    """A v- or x0-network that outputs the value its target takes for a given (x0, eps) must yield eps itself
    through predict_noise, at every step (the conversion the samplers rely on)."""
    m = tiny_diffusion(prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(20, 2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.arange(20)
    ab = m.alphas_cumprod[t].view(20, 1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    m.network = lambda xt_, t_, past: ab.sqrt() * eps - (1 - ab).sqrt() * x0 if prediction == "v" else x0
    torch.testing.assert_close(m.predict_noise(xt, t, None), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
def test_fused_backend_matches_torch(name):
    ref = tiny(name, "torch")
    fast = tiny(name, None)
    fast.load_state_dict(ref.state_dict())
    pre, aft = ref.pre_seq_length, ref.aft_seq_length
    frames = torch.rand(2, pre + aft, 1, 8, 8, dtype=torch.float64)
    out = []
    for m in (ref, fast):
        torch.manual_seed(1)
        loss, _ = m.training_loss(frames)
        loss.backward()
        # (the ConvLSTM cell carries OpenSTL's unused conv_o / conv_last: no gradient on either backend)
        out.append((loss.detach(), [None if p.grad is None else p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert sum(g is not None for g in out[0][1]) > len(out[0][1]) - 3
    for a, b in zip(out[0][1], out[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_diffusion_float32_and_autocast():
    m = tiny_diffusion(None, torch.float32)
    frames = torch.rand(2, 4, 1, 8, 8)
    loss, _ = m.training_loss(frames)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_loss(frames)
        y = m.sample(frames[:, :2], n=2, steps=2)
    assert torch.isfinite(loss) and y.dtype == torch.float32 and y.shape == (2, 2, 2, 1, 8, 8)


def test_diffusion_loss_falls_on_moving_mnist():
    torch.manual_seed(0)
    m = M.create("diffusion", in_shape=(2, 1, 32, 32), aft_seq_length=2, hid=8, channel_mult="1,2",
                 num_steps=100, backend="torch")
    batches = mmnist_batches(4, 8, 2, 2)
    probe = batches[0]

    def probe_loss():  # the same t and noise draws before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(m.training_loss(probe)[0].item() for _ in range(4)) / 4

    before = probe_loss()
    first, last = fit(m, batches, 40, 3e-3)
    after = probe_loss()
    assert after < 0.7 * before, (before, after, first, last)


def test_diffusion_samples_beat_the_zeros_baseline_after_training():
    """What a user checks first: samples of a briefly trained model look like the data. Mostly-black Moving MNIST
    makes 'predict zeros' a strong baseline; an x0-predicting denoiser (the presets') beats it ~4x here after
    80 steps (1 thread, a few seconds), where the eps-predicting one (DDPM's parameterisation) still drew grey noise
    (sample MSE 0.23 vs zeros' 0.084 after 150 steps; see docs/STOCHASTIC.md)."""
    torch.manual_seed(0)
    m = M.create("diffusion", in_shape=(2, 1, 32, 32), aft_seq_length=2, hid=8, channel_mult="1,2",
                 num_steps=100, prediction="x0", backend="torch")
    batches = mmnist_batches(4, 8, 2, 2)
    fit(m, batches, 80, 3e-3)
    frames = torch.cat(batches)
    past, future = frames[:, :2], frames[:, 2:]
    samples = m.sample(past, n=1, steps=10, generator=torch.Generator().manual_seed(0))[:, 0]
    mse, zeros = float(((samples - future) ** 2).mean()), float((future ** 2).mean())
    assert mse < 0.5 * zeros, (mse, zeros)


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="ddpx"), "sampler"),
    (dict(eta=1.5), "eta"),
    (dict(eta=-0.1), "eta"),
    (dict(steps=0), "steps"),
    (dict(steps=21), "steps"),
    (dict(n=0), "n must"),
    (dict(noise=torch.zeros(1, 1, 2, 1, 8, 8)), "noise"),
])
def test_diffusion_sample_bad_arguments(kw, match):
    m = tiny_diffusion()
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        m.sample(x, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(beta_schedule="quadratic"), "beta_schedule"),
    (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    (dict(channel_mult="1,x"), "channel_mult"),
    (dict(num_steps=0), "num_steps"),
    (dict(sample_steps=50), "steps"),
    (dict(hid=0), "hid"),
    (dict(prediction="noise"), "prediction"),
])
def test_diffusion_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        M.create("diffusion", **dict(TINY_DIFF, **kw))


def test_diffusion_bad_frames():
    m = tiny_diffusion()
    with pytest.raises(ValueError, match="frames"):
        m.training_loss(torch.rand(2, 3, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by 2"):
        m.sample(torch.rand(1, 2, 1, 7, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.rand(1, 2, 1, 8, 8))


# ---- VAE with a learned prior --------------------------------------------------------------------------------
def test_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mu, lv, mu2, lv2 = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    assert torch.equal(V.gaussian_kl(mu, lv, mu, lv), torch.zeros_like(mu))
    N = torch.distributions.Normal
    want = torch.distributions.kl_divergence(N(mu, (0.5 * lv).exp()), N(mu2, (0.5 * lv2).exp()))
    torch.testing.assert_close(V.gaussian_kl(mu, lv, mu2, lv2), want)
    assert (V.gaussian_kl(mu, lv, mu2, lv2) > 0).all()


def posterior_as_prior(m):
    """Make the posterior the prior: its weights on the prior's inputs copied, its weights on e_t zero."""
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            src, dst = getattr(m.prior, name), getattr(m.posterior, name)
            dst.weight.zero_()
            dst.weight[:, :src.weight.shape[1]] = src.weight
            dst.bias.copy_(src.bias)


def test_vae_kl_is_zero_when_posterior_equals_prior():
    m = tiny_vae().train()
    frames = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    _, logs = m.training_loss(frames)
    assert logs["kl"] > 1e-6  # independent initialisations disagree
    posterior_as_prior(m)
    torch.manual_seed(3)
    loss, logs = m.training_loss(frames)
    assert logs["kl"] == 0.0
    assert loss.item() == pytest.approx(logs["mse"], abs=0)
    # and with the same draws the training pass is then a prior sample with teacher forcing
    assert logs["mse"] > 0


def test_vae_training_pass_agrees_with_prediction():
    """With the posterior equal to the prior and its spread ~0, the teacher-forced training pass and the
    prediction (prior mean) see the same inputs up to the first future frame: same frame."""
    m = tiny_vae()
    posterior_as_prior(m)
    with torch.no_grad():
        for head in (m.prior, m.posterior):
            head.conv2.bias[m.config["z_dim"]:] = -80.0  # logvar: std e^-40
            head.conv2.weight[m.config["z_dim"]:] = 0.0
    frames = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        train_pred, kl = m._run(frames, "train")
    assert train_pred.shape == (2, 3, 1, 8, 8) and float(kl.abs().max()) == 0.0
    torch.testing.assert_close(train_pred[:, 1], m(frames[:, :2])[:, 0], rtol=1e-10, atol=1e-10)


def test_vae_posterior_sees_the_next_frame_and_the_prior_does_not():
    """KL at step t changes with frame t only through the posterior: the prior of step t reads frames < t."""
    m = tiny_vae()
    frames = torch.rand(1, 4, 1, 8, 8, dtype=torch.float64)
    later = frames.clone()
    later[:, 3] = torch.rand(1, 8, 8, dtype=torch.float64)
    stats = []
    for f in (frames, later):
        torch.manual_seed(0)
        _, kl = m._run(f, "train")
        stats.append(kl)
    # steps 1, 2 (predicting frames 1, 2) never read frame 3; step 3's posterior does
    assert torch.equal(stats[0][:, :2], stats[1][:, :2])
    assert not torch.equal(stats[0][:, 2], stats[1][:, 2])


def test_vae_sample_and_forward():
    m = tiny_vae().eval()
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    a = m.sample(x, n=3, generator=torch.Generator().manual_seed(4))
    b = m.sample(x, n=3, generator=torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 2, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # n different futures
    y = m(x)
    assert y.shape == (2, 2, 1, 8, 8) and torch.equal(y, m(x))  # forward: the prior's mean, deterministic
    # the future depends on the observed frames only through the model: future frames of the input do not exist
    with pytest.raises(ValueError, match="x must have 2 frames"):
        m(torch.rand(2, 4, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must"):
        m.sample(x, n=0)


def test_vae_float32_and_autocast():
    m = tiny_vae(None, torch.float32)
    frames = torch.rand(2, 4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = m.training_loss(frames)
        y = m.sample(frames[:, :2], n=2)
    assert torch.isfinite(loss) and y.shape == (2, 2, 2, 1, 8, 8)


def test_vae_loss_falls_on_moving_mnist():
    torch.manual_seed(0)
    m = M.create("vae", in_shape=(2, 1, 32, 32), aft_seq_length=2, hid=8, N_S=2, num_hidden=8, z_dim=2,
                 backend="torch")
    batches = mmnist_batches(4, 8, 2, 2)
    first, last = fit(m, batches, 40, 3e-3)
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("kw, match", [
    (dict(N_S=3), "N_S"),
    (dict(hid=3), "hid"),
    (dict(z_dim=0), "z_dim"),
    (dict(filter_size=2), "filter_size"),
    (dict(beta=-1.0), "beta"),
    (dict(pre_seq_length=3), "pre_seq_length"),
])
def test_vae_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        M.create("vae", **dict(TINY_VAE, **kw))


# ---- two-stream GAN ---------------------------------------------------------------------------------------
def test_gan_streams_background_static_mask_in_unit_interval():
    m = tiny("gan")
    with torch.no_grad():  # large weights: the mask's sigmoid saturates somewhere, and must stay in [0, 1]
        for p in m.generator.parameters():
            p.mul_(20)
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        s = m.generate(x, z)
    assert s["background"].shape == (2, 1, 8, 8) and s["mask"].shape == (2, 2, 1, 8, 8)
    assert float(s["mask"].min()) >= 0.0 and float(s["mask"].max()) <= 1.0
    m_, fg, bg = s["mask"], s["foreground"], s["background"]
    torch.testing.assert_close(s["video"], m_ * fg + (1 - m_) * bg[:, None])
    with torch.no_grad():  # mask 0 everywhere: every future frame is the one background image
        m.generator.mask_out.weight.zero_()
        m.generator.mask_out.bias.fill_(-1e4)
    v = m.generate(x, z)["video"]
    assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 0], m.generate(x, z)["background"])


def test_gan_each_network_gets_its_own_objective():
    """One backward of training_loss: the generator's gradient is that of recon + adv (through a frozen D),
    the discriminator's that of its own real/fake loss."""
    m = tiny("gan", adv_weight=0.5)
    frames = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    loss, logs = m.training_loss(frames)
    loss.backward()
    total = {k: p.grad.clone() for k, p in m.named_parameters()}
    torch.manual_seed(0)
    t = m.losses(frames, m._noise(frames, 2))
    m.zero_grad()
    G = [p for k, p in m.named_parameters() if k.startswith("generator.")]
    Dp = [p for k, p in m.named_parameters() if k.startswith("discriminator.")]
    g_grads = torch.autograd.grad(t["mse"] + 0.5 * t["g_adv"], G + Dp, allow_unused=True)
    assert all(g is None for g in g_grads[len(G):])  # D's parameters enter the generator's loss detached
    d_grads = torch.autograd.grad(t["d_loss"], Dp)
    names = [k for k, _ in m.named_parameters()]
    for k, g in zip(names, list(g_grads[:len(G)]) + list(d_grads)):
        torch.testing.assert_close(total[k], g)
    assert logs["loss"] == pytest.approx(logs["mse"] + 0.5 * logs["g_adv"] + logs["d_loss"])


def test_gan_sample_and_forward():
    m = tiny("gan")
    with torch.no_grad():  # streams near mid-grey, so that the [0, 1] clamp of the predictions cuts little
        m.generator.fg_out.bias.fill_(0.5)
        m.generator.background[-1].bias.fill_(0.5)
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    a = m.sample(x, n=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 2, 1, 8, 8)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and 0 < float(a.mean()) < 1
    assert torch.equal(a, m.sample(x, n=3, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a[:, 0], a[:, 1])
    assert torch.equal(m(x), m(x))  # z = 0
    with pytest.raises(ValueError, match="z must"):
        m.generate(x, torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="adv_weight"):
        M.create("gan", **dict(TINY_GAN, adv_weight=-1))


def test_gan_reconstruction_falls_on_moving_mnist():
    torch.manual_seed(0)
    m = M.create("gan", in_shape=(2, 1, 32, 32), aft_seq_length=2, hid=8, disc_hid=4, z_dim=2, backend="torch")
    batches = mmnist_batches(4, 8, 2, 2)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    mses = []
    for i in range(40):
        loss, logs = m.training_loss(batches[i % 4], i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mses.append(logs["mse"])
    assert sum(mses[-5:]) < 0.7 * sum(mses[:5]), mses
    # and not by collapsing to a black future (sigmoid streams did: their logits ran off to -inf under Adam,
    # the prediction equalled the predict-zeros baseline and no gradient was left to leave it)
    with torch.no_grad():
        past, future = batches[0][:, :2], batches[0][:, 2:]
        pred = m(past)
    ink = future > 0.5
    assert float(((pred - future) ** 2).mean()) < 0.7 * float((future ** 2).mean())
    assert float(pred[ink].mean()) > 3 * float(pred[~ink].mean())


# ---- VPTR -------------------------------------------------------------------------------------------------
def test_attention_is_multihead_softmax_attention():
    torch.manual_seed(0)
    att = P.Attention(8, heads=2).double()
    q, k = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    v = torch.randn(3, 5, 8, dtype=torch.float64)
    for causal in (False, True):
        heads = lambda t: t.view(3, 5, 2, 4).transpose(1, 2)  # noqa: E731
        Q, K, V_ = heads(att.q(q)), heads(att.k(k)), heads(att.v(v))
        s = Q @ K.transpose(-1, -2) / 2.0
        if causal:
            s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        want = att.o((s.softmax(-1) @ V_).transpose(1, 2).reshape(3, 5, 8))
        torch.testing.assert_close(att(q, k, v, causal=causal), want)


def test_windows_roundtrip_and_grouping():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float64).view(2, 4, 6, 3)
    w = P.to_windows(x, 2)
    assert w.shape == (2 * 2 * 3, 4, 3)
    assert torch.equal(w[1], x[0, 0:2, 2:4].reshape(4, 3))  # window (0, 1) of the first map
    assert torch.equal(P.from_windows(w, 2, 4, 6, 2), x)


def test_far_is_causal():
    """FAR's teacher-forced prediction of frame t reads frames <= t - 1 only."""
    m = tiny("vptr_far")
    frames = torch.rand(1, 5, 1, 8, 8, dtype=torch.float64)
    base = m.teacher_forced(frames)
    assert base.shape == (1, 4, 1, 8, 8)
    for k in range(1, 5):
        changed = frames.clone()
        changed[:, k:] = torch.rand_like(changed[:, k:])
        out = m.teacher_forced(changed)
        torch.testing.assert_close(out[:, :k], base[:, :k], rtol=1e-12, atol=1e-12)  # frames 1..k
        if k < 4:
            assert (out[:, k] - base[:, k]).abs().max() > 1e-6  # frame k + 1 reads frame k
    # prediction's first frame is the teacher-forced pass's prediction of frame pre (same observed frames)
    torch.testing.assert_close(m(frames[:, :3])[:, 0], base[:, 2], rtol=1e-10, atol=1e-10)


def test_nar_predicts_all_frames_in_one_pass():
    m = tiny("vptr_nar", aft_seq_length=4)
    calls = {"enc": [], "dec": []}
    m.blocks[0].register_forward_hook(lambda mod, a, out: calls["enc"].append(out.shape[1]))
    m.dec_blocks[0].register_forward_hook(lambda mod, a, out: calls["dec"].append(out.shape[1]))
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    y = m(x)
    assert y.shape == (2, 4, 1, 8, 8)
    assert calls == {"enc": [3], "dec": [4]}  # one encoder pass over 3 frames, one decoder pass for all 4
    x2 = x.clone()
    x2[:, 0] = torch.rand_like(x2[:, 0])  # no mask: every future frame reads the first observed frame
    assert ((m(x2) - y).flatten(2).abs().amax(2) > 1e-8).all()
    far = tiny("vptr_far", aft_seq_length=4)
    calls_far = []
    far.blocks[0].register_forward_hook(lambda mod, a, out: calls_far.append(out.shape[1]))
    far(x)
    assert calls_far == [3, 4, 5, 6]  # FAR: one pass per predicted frame


@pytest.mark.parametrize("name", ["vptr_far", "vptr_nar"])
def test_vptr_float32_autocast_and_loss_falls_on_moving_mnist(name):
    m = tiny(name, None, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_loss(torch.rand(2, 5, 1, 8, 8))
    assert torch.isfinite(loss)
    torch.manual_seed(0)
    m = M.create(name, in_shape=(2, 1, 32, 32), aft_seq_length=2, hid=8, N_S=2, num_layers=1, num_dec_layers=1,
                 heads=2, window_size=4, backend="torch")
    first, last = fit(m, mmnist_batches(4, 8, 2, 2), 40, 3e-3)
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="bidirectional"), "mode"),
    (dict(heads=3), "heads"),
    (dict(hid=7, heads=1), "hid"),
    (dict(window_size=0), "window_size"),
])
def test_vptr_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        M.create("vptr_far", **dict(TINY_VPTR, **kw))
    with pytest.raises(ValueError, match="VPTR_NAR has mode 'nar', got 'far'"):
        M.create("vptr_nar", **dict(TINY_VPTR, mode="far"))
    m = tiny("vptr_far")
    with pytest.raises(ValueError, match="divisible by 4"):
        m(torch.rand(1, 3, 1, 6, 8, dtype=torch.float64))


# ---- the CLI through the registry -------------------------------------------------------------------------
CLI_CONFIGS = {"diffusion": dict(hid=4, channel_mult=[1, 2], num_steps=10, sample_steps=2),
               "vae": dict(hid=4, N_S=2, num_hidden=4, z_dim=2),
               "gan": dict(hid=4, disc_hid=4, z_dim=2),
               "vptr_far": dict(hid=4, N_S=4, num_layers=1, heads=2),
               "vptr_nar": dict(hid=4, N_S=4, num_layers=1, num_dec_layers=1, heads=2)}


@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
def test_cli_train_and_eval(name, tmp_path, monkeypatch):
    from vpfast import commands
    monkeypatch.setenv("VPFAST_DEVICE", "cpu")
    cfg = json.dumps(dict(CLI_CONFIGS[name], in_shape=[10, 1, 64, 64]))
    out = str(tmp_path / "run")
    assert commands.train_main(["--model", name, "--config", cfg, "--epochs", "1", "--out", out, "--train-size",
                                "4", "--batch-size", "4", "--test-size", "2", "--no-progress"]) == 0
    res = str(tmp_path / "eval.json")
    ckpt = os.path.join(out, "last.pt")
    args = ["eval", ckpt, "--test-size", "2", "--batch-size", "2", "--no-progress", "--no-baselines"]
    assert commands.cli([*args, "--json", res]) == 0
    assert math.isfinite(json.load(open(res))["metrics"]["model"]["mse"])
    stochastic = callable(getattr(M.CLASSES[name], "sample", None))
    assert commands.cli([*args, "--samples", "2", "--json", res]) == (0 if stochastic else 2)
    if stochastic:
        metrics = json.load(open(res))["metrics"]
        assert set(metrics) == {"model", "best of 2", "mean of 2"}
        assert metrics["best of 2"]["mse"] <= metrics["mean of 2"]["mse"]
        assert metrics["best of 2"]["ssim"] >= metrics["mean of 2"]["ssim"]
    pics = str(tmp_path / "pics")
    assert commands.cli(["predict", ckpt, "--num", "2", "--samples", "3", "--out", pics]) == (0 if stochastic else 2)
    if stochastic:
        import numpy as np
        assert np.load(os.path.join(pics, "samples.npy")).shape == (2, 3, 10, 1, 64, 64)
        assert os.path.getsize(os.path.join(pics, "samples.png")) > 0


# ---- best / mean over n samples -----------------------------------------------------------------------------
def test_best_and_mean_over_samples():
    from vpfast.evaluate import best_and_mean
    from vpfast.metrics import frame_metrics
    g = torch.Generator().manual_seed(0)
    true = torch.rand(2, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    samples = torch.rand(2, 4, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    samples[0, 2] = true[0]  # sequence 0 has a perfect sample
    samples[1, 1] = true[1] + 0.5  # sequence 1: a far-off sample (clipped to [0, 1] for SSIM/PSNR only)
    best, mean = best_and_mean(samples, true)
    per = {k: torch.stack([frame_metrics(samples[:, j], true)[k].mean(-1) for j in range(4)], 1)
           for k in ("mse", "mae", "ssim", "psnr")}
    assert best["mse"][0] == 0 and best["psnr"][0] == 100.0 and best["ssim"][0] == pytest.approx(1.0)
    for k, lower in (("mse", True), ("mae", True), ("ssim", False), ("psnr", False)):
        want = per[k].amin(1) if lower else per[k].amax(1)
        torch.testing.assert_close(best[k], want)
        torch.testing.assert_close(mean[k], per[k].mean(1))
    assert per["mse"][1].argmax() == 1  # the off sample is the worst, and not the mean's whole story
    with pytest.raises(ValueError, match="samples must be"):
        best_and_mean(samples[:, 0], true)


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", M.STOCHASTIC_NAMES)
def test_gpu_small_preset_training_step(name):
    """The "small" preset at batch 2 on the GPU: in float32 (no TF32) the default backend's loss and gradients
    match backend="torch" (same random draws); under bf16 autocast the step is finite; sampling runs."""
    from vpfast.testing import exact_float32
    frames = torch.rand(2, 20, 1, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    torch.manual_seed(0)
    ref = M.create(name, preset="small", backend="torch").cuda()
    fast = M.create(name, preset="small").cuda()
    fast.load_state_dict(ref.state_dict())
    results = []
    with exact_float32():
        for m in (ref, fast):
            torch.manual_seed(1)
            loss, _ = m.training_loss(frames)
            loss.backward()
            results.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    fast.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = fast.training_loss(frames)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    fast.eval()
    with torch.no_grad():
        y = fast.sample(frames[:, :10], n=2) if hasattr(fast, "sample") else fast(frames[:, :10])[:, None]
    assert y.shape[-4:] == (10, 1, 64, 64) and torch.isfinite(y).all()
