"""The vpfast.nn layers the models are built from (one place, so a model file never re-implements a layer)."""
from __future__ import annotations

from ..nn import ConvLSTMCell, SpatioTemporalLSTMCell  # noqa: F401  (issue 3)

try:  # issue 4 (branch issue-depthwise)
    from ..nn import DepthwiseConv2d, SpatialAttention, TemporalAttention  # noqa: F401
    STANDIN_DEPTHWISE = False
except ImportError:  # STAND-IN until issue-depthwise is merged: torch-only copies with the same keys
    from ._standin_depthwise import DepthwiseConv2d, SpatialAttention, TemporalAttention  # noqa: F401
    STANDIN_DEPTHWISE = True

try:  # issue 6 (branch issue-warp)
    from ..nn import MotionGRU  # noqa: F401
    STANDIN_WARP = False
except ImportError:  # STAND-IN until issue-warp is merged
    from ._standin_warp import MotionGRU  # noqa: F401
    STANDIN_WARP = True
