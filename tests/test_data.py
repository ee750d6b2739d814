import os

import numpy as np
import pytest
import torch

from vpfast.data import (ArraySequences, MovingMNIST, ShardedBatchSampler, load_digits, load_sequences,
                         make_dataset, moving_mnist_sequence)
from vpfast.data import moving_mnist as mm


def test_shipped_digits():
    path = mm._DIGITS_FILE
    assert os.path.getsize(path) < 3e6
    allx = load_digits("all")
    assert allx.dtype == np.uint8 and allx.shape == (5000, 28, 28)
    tr, te = load_digits("train"), load_digits("test")
    assert len(tr) + len(te) == 5000 and len(te) > 0
    with np.load(path) as z:
        labels, tri, tei = z["labels"], z["train_index"], z["test_index"]
    # every class on both sides of the split, no digit on both
    assert (np.bincount(labels[tri], minlength=10) > 0).all() and (np.bincount(labels[tei], minlength=10) > 0).all()
    assert not set(tri.tolist()) & set(tei.tolist())
    # real handwritten digits: dark borders, bright strokes, ~100-200 lit pixels each
    assert allx[:, 0, :].max() < 64 and allx.max() == 255
    lit = (allx > 127).sum(axis=(1, 2))
    assert 30 < lit.mean() < 250
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_sequence_shape_range_and_determinism():
    ds = MovingMNIST(length=8, seed=3)
    x = ds[5]
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert torch.equal(x, MovingMNIST(length=8, seed=3)[5])
    assert not torch.equal(x, ds[4])
    ds.set_epoch(1)
    assert not torch.equal(x, ds[5])  # fresh training sequences every epoch
    test = MovingMNIST(length=8, split="test", seed=3)
    assert not torch.equal(x, test[5])
    with pytest.raises(IndexError):
        ds[8]


def test_two_digits_inside_the_frame_and_bouncing():
    # a "digit" that is one lit pixel at its centre makes each digit's position readable
    digit = np.zeros((1, 28, 28), np.uint8)
    digit[0, 14, 14] = 255
    lit_counts = []
    bounces = 0
    for i in range(40):
        rng = np.random.default_rng([7, i])
        seq = moving_mnist_sequence(rng, digit)
        assert seq.shape == (20, 64, 64)
        n = (seq > 0).reshape(20, -1).sum(1)
        lit_counts += n.tolist()
        ys, xs = np.nonzero(seq.reshape(20, 64, 64) > 0)[1:]
        # the digit's box (centre +-14) stays inside the 64x64 frame
        assert ys.min() >= 14 and ys.max() <= 14 + 36 and xs.min() >= 14 and xs.max() <= 14 + 36
        # trajectories of the two digits: velocity reverses at borders
        rng = np.random.default_rng([7, i])
        for _ in range(2):
            top, left = mm._trajectory(rng, 20, 36)
            rng.integers(1)  # the digit draw
            for pos in (top, left):
                assert 0 <= pos.min() and pos.max() <= 36
                step = np.diff(pos)
                assert np.abs(step).max() <= 4  # 0.1 * 36 = 3.6 pixels per frame
                bounces += int(np.any(step[:-1] * step[1:] < 0))
    lit_counts = np.array(lit_counts)
    assert set(np.unique(lit_counts)) <= {1, 2} and (lit_counts == 2).mean() > 0.9
    assert bounces > 10


def test_real_digit_sequences_have_two_digits():
    ds = MovingMNIST(length=20, seed=1)
    mass = torch.stack([ds[i] for i in range(20)]).sum(dim=(2, 3, 4))  # [N, T]
    single = load_digits("train").astype(np.float64).sum(axis=(1, 2)) / 255
    # two digits: more mass than a typical single digit on average, never more than two big digits
    assert mass.mean() > 1.5 * single.mean()
    assert mass.max() <= 2 * single.max() + 1e-3


def test_load_mnist_test_seq_layout(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(20, 3, 64, 64), dtype=np.uint8)
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, raw)
    ds = load_sequences(str(path))
    assert len(ds) == 3
    x = ds[1]
    assert x.shape == (20, 1, 64, 64)
    assert torch.allclose(x[:, 0], torch.from_numpy(raw[:, 1]).float() / 255)


def test_load_generic_arrays(tmp_path):
    arr = np.random.default_rng(0).random((4, 6, 2, 16, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    torch.save(torch.from_numpy(arr), tmp_path / "a.pt")
    np.savez(tmp_path / "a.npz", seq=arr)
    for name in ("a.npy", "a.pt", "a.npz"):
        ds = load_sequences(str(tmp_path / name))
        assert len(ds) == 4 and torch.equal(ds[2], torch.from_numpy(arr[2]))
    ds = make_dataset(torch.from_numpy(arr), length=3)
    assert len(ds) == 3
    with pytest.raises(ValueError, match=r"\[N, T, C, H, W\]"):
        ArraySequences(arr[0])
    np.save(tmp_path / "bad.npy", arr[0, 0, 0])
    with pytest.raises(ValueError, match="expected"):
        load_sequences(str(tmp_path / "bad.npy"))
    with pytest.raises(FileNotFoundError):
        load_sequences(str(tmp_path / "missing.npy"))


@pytest.mark.parametrize("shuffle", [False, True])
def test_sharded_batches_match_single_process(shuffle):
    single = ShardedBatchSampler(37, 8, shuffle=shuffle, seed=1)
    ranks = [ShardedBatchSampler(37, 8, rank=r, world_size=2, shuffle=shuffle, seed=1) for r in range(2)]
    for s in [single] + ranks:
        s.set_epoch(2)
    merged = [a + b for a, b in zip(*[list(r) for r in ranks])]
    assert merged == list(single) and len(merged) == 4
    single.set_epoch(2, start_batch=3)
    assert list(single) == merged[3:]
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(10, 3, world_size=2)
