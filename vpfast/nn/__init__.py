"""Drop-in layers with the reference projects' constructor arguments and state_dict keys."""
from .convlstm import ConvLSTMCell  # noqa: F401
from .ddr_loss import DDRLoss  # noqa: F401
from .stlstm import SpatioTemporalLSTMCell  # noqa: F401
from .depthwise import DepthwiseConv2d  # noqa: F401
from .attention import AttentionModule, SpatialAttention, TemporalAttention, TemporalAttentionModule  # noqa: F401
from .motion import MotionGRU, Warp  # noqa: F401
from .causal_lstm import GHU, CausalLSTMCell  # noqa: F401
from .mim import MIMN, MIMBlock  # noqa: F401
from .phydnet import K2M, PhyCell, PhyCellCell, PhyDConvLSTM, PhyDConvLSTMCell, PhyDEncoderRNN  # noqa: F401
from .e3dlstm import Eidetic3DLSTMCell, TFConv3d  # noqa: F401
