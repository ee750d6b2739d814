"""Functional ops. Each takes `backend=None` ("torch", "cpp", "cuda", "triton"; None = $VPFAST_BACKEND or auto)."""
from .._dispatch import REGISTRY, BackendUnavailable  # noqa: F401
from .convlstm import convlstm, convlstm_reference  # noqa: F401
from .ddr_loss import ddr_loss, ddr_loss_reference  # noqa: F401
from .stlstm import stlstm_gates, stlstm_gates_reference, stlstm_output, stlstm_output_reference  # noqa: F401
from .causal_lstm import (causal_lstm_cell, causal_lstm_cell_reference, causal_lstm_memory,  # noqa: F401
                          causal_lstm_memory_reference, causal_lstm_output, causal_lstm_output_reference)
from .depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference  # noqa: F401
from .large_kernel_attention import large_kernel_attention, large_kernel_attention_reference  # noqa: F401
from .deform_warp import deform_warp, deform_warp_reference  # noqa: F401
from .flow_warp import flow_warp, flow_warp_reference  # noqa: F401
from .motion_gru import motion_gru, motion_gru_reference  # noqa: F401
from .group_norm_silu import group_norm_silu, group_norm_silu_reference  # noqa: F401

# settle what is built and installed now, so that dispatch under torch.compile only reads constants
for _op in REGISTRY.values():
    _op.static_reasons("torch")
