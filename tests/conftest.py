import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any kernels module is
# imported; without a GPU the interpreter is the only way the Triton backend runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (under the interpreter on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
