"""Functional ops. Each takes `backend=None` ("torch", "cpp", "cuda", "triton"; None = $VPFAST_BACKEND or auto)."""
from .._dispatch import REGISTRY, BackendUnavailable  # noqa: F401
from .ddr_loss import ddr_loss, ddr_loss_reference  # noqa: F401

# settle what is built and installed now, so that dispatch under torch.compile only reads constants
for _op in REGISTRY.values():
    _op.static_reasons("torch")
