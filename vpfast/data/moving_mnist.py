"""Moving MNIST (2 digits bouncing in 64x64, 20 frames) generated from real MNIST digits.

The generator follows the reference definition (OpenSTL's MovingMNIST, after Srivastava et al. 2015): each digit
starts at a uniform random position in the unit square, moves with speed 0.1 in a uniform random direction,
reflects off the borders, positions are scaled to the canvas (64 - 28) and truncated to integers, and digits
are pasted with a pixelwise maximum; values are divided by 255.

Unlike the reference (which draws from Python's global `random`), a sequence here is a pure function of
(seed, epoch, index): the fixed test set is reproducible, training sequences are fresh every epoch, a
resumed run sees exactly the sequences an uninterrupted run would, and multi-process ranks can shard
indices without communicating.
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_digits.npz")
_DIGITS = None


def load_digits(split="train"):
    """The MNIST digits shipped with vpfast: uint8 array [N, 28, 28] (split 'train', 'test' or 'all')."""
    global _DIGITS
    if _DIGITS is None:
        if not os.path.exists(_DIGITS_FILE):
            raise FileNotFoundError(
                f"{_DIGITS_FILE} is missing; rebuild it with scripts/make_mnist_digits.py (see docs/DATA.md)")
        with np.load(_DIGITS_FILE) as z:
            _DIGITS = (z["images"], z["train_index"].astype(np.int64), z["test_index"].astype(np.int64))
    images, train_index, test_index = _DIGITS
    if split == "train":
        return images[train_index]
    if split == "test":
        return images[test_index]
    if split == "all":
        return images
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def _trajectory(rng, n_frames, canvas, step_length=0.1):
    # reference order of draws per digit: x, y, theta
    x, y, theta = rng.random(3)
    theta *= 2 * np.pi
    vy, vx = np.sin(theta), np.cos(theta)
    ys = np.empty(n_frames)
    xs = np.empty(n_frames)
    for i in range(n_frames):
        y += vy * step_length
        x += vx * step_length
        if x <= 0:
            x, vx = 0.0, -vx
        if x >= 1.0:
            x, vx = 1.0, -vx
        if y <= 0:
            y, vy = 0.0, -vy
        if y >= 1.0:
            y, vy = 1.0, -vy
        ys[i], xs[i] = y, x
    return (canvas * ys).astype(np.int64), (canvas * xs).astype(np.int64)


def moving_mnist_sequence(rng, digits, n_frames=20, size=64, num_digits=2, step_length=0.1):
    """One sequence as uint8 [n_frames, size, size]; `rng` is a numpy Generator, `digits` uint8 [N, d, d]."""
    d = digits.shape[-1]
    out = np.zeros((n_frames, size, size), dtype=np.uint8)
    for _ in range(num_digits):
        top, left = _trajectory(rng, n_frames, size - d, step_length)
        digit = digits[rng.integers(len(digits))]
        for t in range(n_frames):
            win = out[t, top[t]:top[t] + d, left[t]:left[t] + d]
            np.maximum(win, digit, out=win)
    return out


class MovingMNIST(Dataset):
    """Moving MNIST sequences `Tensor[T, 1, size, size]` in [0, 1], generated on the fly.

    length: sequences per epoch. split: which shipped digits to draw ('train' or 'test'). seed + epoch +
    index determine a sequence; call `set_epoch(e)` for fresh training sequences each epoch (a test set keeps
    epoch 0 and is fixed).
    """

    def __init__(self, length=10000, split="train", seed=0, n_frames=20, size=64, num_digits=2,
                 step_length=0.1, digits=None):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = int(length)
        self.digits = load_digits(split) if digits is None else np.asarray(digits, dtype=np.uint8)
        self.seed, self.n_frames, self.size = int(seed), int(n_frames), int(size)
        self.num_digits, self.step_length = int(num_digits), float(step_length)
        # a distinct stream per split so the test set never equals training sequences at the same seed
        self._salt = {"train": 0, "test": 1}.get(split, 2)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def sequence_uint8(self, index):
        rng = np.random.default_rng([self.seed, self._salt, self.epoch, int(index)])
        return moving_mnist_sequence(rng, self.digits, self.n_frames, self.size, self.num_digits,
                                     self.step_length)

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        seq = self.sequence_uint8(index)
        # numpy, not torch, for the conversion: tiny torch ops pay thread start-up costs per call
        return torch.from_numpy(seq[:, None].astype(np.float32) / np.float32(255.0))


class ArraySequences(Dataset):
    """Sequences from an array `[N, T, C, H, W]` (uint8 0..255 or float in [0, 1])."""

    def __init__(self, array, note=None):
        # note: how a file's array was read when its layout had to be guessed (4-D files), for the commands to
        # tell the user; None when the array was [N, T, C, H, W] as given
        self.note = note
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.ndim != 5:
            raise ValueError(f"sequences must have shape [N, T, C, H, W], got {array.ndim} dims {tuple(array.shape)}")
        self.array = array

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        x = np.asarray(self.array[index])
        if x.dtype == np.uint8:
            return torch.from_numpy(x.astype(np.float32) / np.float32(255.0))
        return torch.from_numpy(np.array(x, dtype=np.float32))


def load_sequences(path):
    """Load sequences from a file as an `ArraySequences`.

    Accepts the standard `mnist_test_seq.npy` ([T, N, 64, 64] uint8, T = 20), any `.npy`/`.npz` (first array)
    or `.pt` holding `[N, T, C, H, W]`, and `[N, T, H, W]` (one channel is added).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".pt") or path.endswith(".pth"):
        arr = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(arr, dict):
            arr = next(iter(arr.values()))
        arr = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    else:
        arr = np.load(path, mmap_mode="r" if path.endswith(".npy") else None)
        if isinstance(arr, np.lib.npyio.NpzFile):
            with arr:
                arr = arr[arr.files[0]]
    name = os.path.basename(path)
    note = None
    if arr.ndim == 4 and (name.startswith("mnist_test_seq") or (arr.shape[0] == 20 and arr.shape[1] != 20)):
        note = (f"{path}: 4-D array {tuple(arr.shape)} read as mnist_test_seq's [T, N, H, W] (T = 20): "
                f"{arr.shape[1]} sequences of {arr.shape[0]} one-channel frames")
        arr = np.swapaxes(arr, 0, 1)[:, :, None]  # [T, N, H, W] -> [N, T, 1, H, W]
    elif arr.ndim == 4:
        note = (f"{path}: 4-D array {tuple(arr.shape)} read as [N, T, H, W]: {arr.shape[0]} sequences of "
                f"{arr.shape[1]} one-channel frames (save [N, T, C, H, W] to say so explicitly)")
        arr = arr[:, :, None]
    if arr.ndim != 5:
        raise ValueError(f"{path}: expected [N, T, C, H, W] (or mnist_test_seq's [T, N, H, W]), got shape "
                         f"{tuple(arr.shape)}")
    return ArraySequences(arr, note)


def layout_note(ds):
    """The layout note of a dataset read from a 4-D file (through subsets), or None."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return getattr(ds, "note", None)


def make_dataset(source, split="train", length=None, seed=0):
    """A dataset from a source spec: 'mmnist' (generated), a file path, or an array/tensor."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        ds = ArraySequences(source)
    elif source in (None, "mmnist", "moving_mnist"):
        default = 10000 if split == "train" else 1000
        return MovingMNIST(length=length or default, split=split, seed=seed)
    else:
        ds = load_sequences(source)
    if length is not None and length < len(ds):
        ds = _Subset(ds, range(length))
    return ds


class _Subset(torch.utils.data.Subset):
    def set_epoch(self, epoch):  # fixed arrays do not change with the epoch (the sampler shuffles them)
        pass


class ShardedBatchSampler(Sampler):
    """Batches of indices for one rank, so that step k's batches over all ranks together form step k's
    batch of a single-process run with batch `global_batch` (contiguous slice per rank).

    shuffle: permute indices per epoch with (seed, epoch); generated datasets need no shuffle (fresh
    sequences per epoch). Incomplete final batches are dropped when drop_last (training).
    start_batch: skip this many batches of the epoch (exact mid-epoch resume).
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, shuffle=False, seed=0, drop_last=True):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} must be divisible by the number of processes {world_size}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def num_batches(self):
        return self.n // self.global_batch if self.drop_last else -(-self.n // self.global_batch)

    def __len__(self):
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, self.num_batches()):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            # split the (possibly short) last chunk as evenly as possible across ranks
            per = -(-len(chunk) // self.world)
            mine = chunk[self.rank * per:(self.rank + 1) * per]
            if mine:
                yield mine
