"""Drop-in layers with the reference projects' constructor arguments and state_dict keys."""
from .ddr_loss import DDRLoss  # noqa: F401
from .motion import MotionGRU, Warp  # noqa: F401
