"""The vpfast.nn layers the models are built from (one place, so a model file never re-implements a layer)."""
from __future__ import annotations

from ..nn import (ConvLSTMCell, DepthwiseConv2d, MotionGRU, SpatialAttention,  # noqa: F401
                  SpatioTemporalLSTMCell, TemporalAttention)
