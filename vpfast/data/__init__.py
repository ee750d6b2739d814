"""Datasets for video prediction: Moving MNIST from real digits shipped with vpfast, and user arrays.

Every dataset yields float32 tensors `Tensor[T, C, H, W]` with values in [0, 1]; the first `pre` frames are
the model's input and the next `aft` its target.
"""
from .moving_mnist import (  # noqa: F401
    MovingMNIST,
    ArraySequences,
    load_digits,
    layout_note,
    load_sequences,
    moving_mnist_sequence,
    make_dataset,
    ShardedBatchSampler,
)
