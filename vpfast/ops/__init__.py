"""Functional ops. Each takes `backend=None` ("torch", "cpp", "cuda", "triton"; None = $VPFAST_BACKEND or auto)."""
from .._dispatch import REGISTRY, BackendUnavailable  # noqa: F401
from .convlstm import convlstm, convlstm_reference  # noqa: F401
from .ddr_loss import ddr_loss, ddr_loss_reference  # noqa: F401
from .stlstm import stlstm_gates, stlstm_gates_reference, stlstm_output, stlstm_output_reference  # noqa: F401
from .depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference  # noqa: F401
from .large_kernel_attention import large_kernel_attention, large_kernel_attention_reference  # noqa: F401
