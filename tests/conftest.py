import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any kernels module is
# imported; without a GPU the interpreter is the only way the Triton backend runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vpfast.testing import exact_float32, private_compile_cache  # noqa: E402  (after TRITON_INTERPRET)

private_compile_cache()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`).

    The model and training tests run tiny shapes that are far too small for two threads; on a busy machine the
    threads only wait on each other (a tiny float64 Conv3d took 70 ms with two threads and 0.3 ms with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in float32 (PyTorch's CUDA default is TF32), so that float32
    comparisons are tight (merged and separate convolutions round differently under TF32); restored after."""
    with exact_float32():
        yield
