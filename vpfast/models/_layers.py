"""The vpfast.nn layers the models are built from (one place, so a model file never re-implements a layer)."""
from __future__ import annotations

from ..nn import (GHU, CausalLSTMCell, ConvLSTMCell, DepthwiseConv2d, MIMBlock, MIMN, MotionGRU,  # noqa: F401
                  SpatialAttention, SpatioTemporalLSTMCell, TemporalAttention)
