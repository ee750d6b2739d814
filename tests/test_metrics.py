import math

import numpy as np
import pytest
import torch

from vpfast.metrics import MetricAccumulator, baseline_prediction, compute_metrics, frame_metrics, ssim

skm = pytest.importorskip("skimage.metrics")


def _sk_ssim(p, t):
    # p, t: [C, H, W]; the reference's call (channels last, data_range 2.0, default 7x7 uniform window)
    return skm.structural_similarity(t.transpose(1, 2, 0), p.transpose(1, 2, 0), win_size=7,
                                     data_range=2.0, channel_axis=-1)


def test_hand_computed_values():
    true = torch.full((1, 2, 1, 8, 10), 0.5, dtype=torch.float64)
    true[0, 1] = 0.25
    pred = true + 0.1
    m = compute_metrics(pred, true)
    assert m["mse"] == pytest.approx(0.01 * 80)
    assert m["mae"] == pytest.approx(0.1 * 80)
    assert m["psnr"] == pytest.approx(20.0)
    # constant images: variances are 0, SSIM = luminance term only
    def lum(a, b):
        c1 = (0.01 * 2) ** 2
        return (2 * a * b + c1) / (a * a + b * b + c1)
    assert m["ssim"] == pytest.approx((lum(0.6, 0.5) + lum(0.35, 0.25)) / 2)
    perfect = compute_metrics(true, true)
    assert perfect["ssim"] == pytest.approx(1.0)
    assert perfect["psnr"] == pytest.approx(100.0)  # capped; the reference's inf would poison averages


@pytest.mark.parametrize("shape", [(2, 3, 1, 64, 64), (1, 2, 3, 17, 23), (1, 1, 1, 7, 7)])
def test_ssim_matches_scikit_image(shape):
    g = torch.Generator().manual_seed(0)
    true = torch.rand(shape, generator=g)
    pred = (true + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
    ours = ssim(pred, true)
    assert ours.shape == shape[:2]
    ref = np.array([[_sk_ssim(pred[b, t].numpy().astype(np.float64), true[b, t].numpy().astype(np.float64))
                     for t in range(shape[1])] for b in range(shape[0])])
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_moving_mnist_like_frames_against_scikit_image():
    from vpfast.data import MovingMNIST
    seq = MovingMNIST(length=1, seed=0)[0]
    true, pred = seq[10:], seq[9:19]  # "repeat the previous frame" as a prediction
    m = frame_metrics(pred, true)
    ref = [_sk_ssim(pred[t].double().numpy(), true[t].double().numpy()) for t in range(10)]
    np.testing.assert_allclose(m["ssim"].numpy(), ref, rtol=1e-10)
    mse = ((pred.double() - true.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(m["psnr"].numpy(), 20 * np.log10(1 / np.sqrt(mse)))


def test_clipping_applies_to_ssim_and_psnr_only():
    true = torch.rand(1, 2, 1, 16, 16, dtype=torch.float64)
    pred = true.clone()
    pred[..., :4, :] = 1.7  # far above the valid range
    m = compute_metrics(pred, true)
    clipped = compute_metrics(pred.clamp(0, 1), true)
    assert m["mse"] > clipped["mse"] and m["mae"] > clipped["mae"]
    assert m["ssim"] == clipped["ssim"] and m["psnr"] == clipped["psnr"]


def test_accumulator_streams_and_merges():
    g = torch.Generator().manual_seed(1)
    true = torch.rand(5, 3, 1, 12, 12, generator=g)
    pred = torch.rand(5, 3, 1, 12, 12, generator=g)
    whole = compute_metrics(pred, true)
    a, b = MetricAccumulator(), MetricAccumulator()
    a.update(pred[:2], true[:2])
    b.update(pred[2:], true[2:])
    merged = MetricAccumulator()
    merged.load_state(a.state() + b.state())  # what an all-reduce does
    assert merged.count == 15
    for k, v in merged.compute().items():
        assert v == pytest.approx(whole[k], rel=1e-12)
    assert all(math.isnan(v) for v in MetricAccumulator().compute().values())


def test_baselines_and_errors():
    x = torch.rand(2, 4, 1, 8, 8)
    assert torch.equal(baseline_prediction(x, 3, "zeros"), torch.zeros(2, 3, 1, 8, 8))
    last = baseline_prediction(x, 3, "last")
    assert last.shape == (2, 3, 1, 8, 8) and torch.equal(last[:, 2], x[:, 3])
    with pytest.raises(ValueError, match="kind"):
        baseline_prediction(x, 3, "mean")
    with pytest.raises(ValueError, match="same shape"):
        compute_metrics(x, x[:, :2])
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 1, 5, 9), torch.rand(1, 1, 5, 9))
    with pytest.raises(TypeError):
        ssim(np.zeros((1, 8, 8)), torch.rand(1, 8, 8))


def test_accumulator_takes_low_precision_predictions():
    # a model evaluated under autocast may return bf16 frames; metrics are computed in float64 all the same
    g = torch.Generator().manual_seed(2)
    true = torch.rand(2, 3, 1, 12, 12, generator=g)
    pred = torch.rand(2, 3, 1, 12, 12, generator=g).bfloat16()
    acc = MetricAccumulator()
    acc.update(pred, true)
    want = compute_metrics(pred.double(), true.double())
    assert acc.count == 6
    for k, v in acc.compute().items():
        assert v == pytest.approx(want[k], rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulator_on_cuda_matches_cpu():
    # the training loop evaluates CUDA predictions; the sums are kept on the CPU (what DDP all-reduces)
    g = torch.Generator().manual_seed(3)
    true = torch.rand(4, 3, 1, 16, 16, generator=g)
    pred = torch.rand(4, 3, 1, 16, 16, generator=g)
    acc = MetricAccumulator()
    acc.update(pred[:2].cuda(), true[:2].cuda())
    acc.update(pred[2:].cuda(), true[2:].cuda())
    assert acc.state().device.type == "cpu" and acc.count == 12
    want = compute_metrics(pred, true)
    for k, v in acc.compute().items():
        assert v == pytest.approx(want[k], rel=1e-9)
