import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any kernels module is
# imported; without a GPU the interpreter is the only way the Triton backend runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vpfast.testing import private_compile_cache  # noqa: E402  (after TRITON_INTERPRET)

private_compile_cache()
