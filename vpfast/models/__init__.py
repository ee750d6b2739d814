"""Video prediction models, weight-compatible with OpenSTL (ConvLSTM, PredRNN, PredRNN-v2, SimVP+IncepU,
SimVP+gSTA, TAU, and the baselines PredRNN++, MIM, E3D-LSTM, PhyDNet) and thuml's MotionRNN.

    model = vpfast.models.create("tau", preset="mmnist")      # the published Moving-MNIST configuration
    model = vpfast.models.create("predrnn", preset="small")   # trains at a useful speed on a 2-core CPU
    vpfast.models.load_checkpoint(model, "epoch=199.ckpt")
    y = model(x)                       # x: Tensor[B, pre, C, H, W] -> Tensor[B, aft, C, H, W]
    loss, logs = model.training_loss(frames, itr)   # frames: Tensor[B, pre + aft, C, H, W]
"""
from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from .._dispatch import require_backend
from ._base import VideoPredictionModel, patch, reverse_sampling_probs, scheduled_sampling_eta, unpatch  # noqa: F401
from .checkpoint import CheckpointError, LoadReport, load_checkpoint  # noqa: F401
from .e3dlstm import E3DLSTM  # noqa: F401
from .mim import MIM  # noqa: F401
from .phydnet import PhyDNet  # noqa: F401
from .predrnnpp import PredRNNpp  # noqa: F401
from .recurrent import ConvLSTM, MotionRNN, PredRNN, PredRNNv2  # noqa: F401
from .simvp import TAU, SimVP, SimVP_gSTA, SimVP_IncepU  # noqa: F401

NAMES = ("convlstm", "predrnn", "predrnnv2", "motionrnn", "simvp_incepu", "simvp_gsta", "tau",
         "predrnnpp", "mim", "phydnet", "e3dlstm")

CLASSES = {
    "convlstm": ConvLSTM,
    "predrnn": PredRNN,
    "predrnnv2": PredRNNv2,
    "motionrnn": MotionRNN,
    "simvp_incepu": SimVP_IncepU,
    "simvp_gsta": SimVP_gSTA,
    "tau": TAU,
    "predrnnpp": PredRNNpp,
    "mim": MIM,
    "phydnet": PhyDNet,
    "e3dlstm": E3DLSTM,
}

_MMNIST = dict(in_shape=(10, 1, 64, 64), pre_seq_length=10, aft_seq_length=10)
_RNN_MMNIST = dict(_MMNIST, num_hidden="128,128,128,128", filter_size=5, stride=1, patch_size=4, layer_norm=False,
                   scheduled_sampling=True, sampling_stop_iter=50000, sampling_start_value=1.0,
                   sampling_changing_rate=2e-5)
_SIMVP_MMNIST = dict(_MMNIST, hid_S=64, hid_T=512, N_S=4, N_T=8, mlp_ratio=8.0, drop=0.0, drop_path=0.0,
                     spatio_kernel_enc=3, spatio_kernel_dec=3)

# "small": the published structure, narrower, so that a training step at batch 16 on 64x64 Moving MNIST is
# about 35-75 GFLOP (3x the forward count; the Moving-MNIST presets are 1.3-3.4 TFLOP at batch 4 for the
# ST-LSTM and gSTA/TAU models), i.e. a fraction of a second to a few seconds on a 2-core AVX-512 CPU.
_RNN_SMALL = dict(_RNN_MMNIST, num_hidden="16,16", filter_size=3)
_SIMVP_SMALL = dict(_SIMVP_MMNIST, hid_S=16, hid_T=128, N_S=4, N_T=4, mlp_ratio=4.0)

PRESETS = {
    "convlstm": {"mmnist": dict(_RNN_MMNIST), "small": dict(_RNN_SMALL)},
    "predrnn": {"mmnist": dict(_RNN_MMNIST), "small": dict(_RNN_SMALL)},
    "predrnnv2": {
        "mmnist": dict(_RNN_MMNIST, reverse_scheduled_sampling=True, r_sampling_step_1=25000,
                       r_sampling_step_2=50000, r_exp_alpha=5000, decouple_beta=0.1),
        "small": dict(_RNN_SMALL, reverse_scheduled_sampling=True, r_sampling_step_1=25000,
                      r_sampling_step_2=50000, r_exp_alpha=5000, decouple_beta=0.1),
    },
    # thuml's MotionRNN (Human3.6M script: 64x4, filter 5, patch 4) at Moving-MNIST frame sizes
    "motionrnn": {"mmnist": dict(_RNN_MMNIST, num_hidden="64,64,64,64"),
                  "small": dict(_RNN_SMALL)},
    "simvp_incepu": {"mmnist": dict(_SIMVP_MMNIST, model_type="IncepU"),
                     "small": dict(_SIMVP_SMALL, model_type="IncepU")},
    "simvp_gsta": {"mmnist": dict(_SIMVP_MMNIST, model_type="gSTA"),
                   "small": dict(_SIMVP_SMALL, model_type="gSTA")},
    "tau": {"mmnist": dict(_SIMVP_MMNIST, model_type="tau", alpha=0.1),
            "small": dict(_SIMVP_SMALL, model_type="tau", alpha=0.1)},
    # MODELS.md §14: OpenSTL's configs/mmnist/PredRNNpp.py and MIM.py (lr 1e-4 and 5e-4 are the trainer's)
    "predrnnpp": {"mmnist": dict(_RNN_MMNIST), "small": dict(_RNN_SMALL)},
    "mim": {"mmnist": dict(_RNN_MMNIST), "small": dict(_RNN_SMALL)},
    # PhyDNet's sizes are fixed in code (3.1M parameters, about 15 GFLOP per sequence): both presets are OpenSTL's
    "phydnet": {"mmnist": dict(_MMNIST, patch_size=4), "small": dict(_MMNIST, patch_size=4)},
    # configs/mmnist/E3DLSTM.py (filter_size is unused: the cell kernel (2, 5, 5) is fixed in code)
    "e3dlstm": {"mmnist": dict(_RNN_MMNIST), "small": dict(_RNN_SMALL)},
}


def create(name: str, preset: Optional[str] = None, backend: Optional[str] = None, **config) -> nn.Module:
    """Build a model by name: one of `NAMES`.

    preset: None (the class defaults), "mmnist" (the published Moving-MNIST configuration) or "small"
      (fast on a 2-core CPU); `config` entries override the preset (the reference projects' vocabulary:
      in_shape=(T, C, H, W), pre_seq_length, aft_seq_length, num_hidden, filter_size, stride, patch_size,
      layer_norm, reverse_scheduled_sampling, decouple_beta, hid_S, hid_T, N_S, N_T, model_type, mlp_ratio,
      drop, drop_path, spatio_kernel_enc, spatio_kernel_dec, ...; vpfast's options for the reference defects:
      MIM s_bptt, E3D-LSTM update_memory, PhyDNet openstl_objective / teacher_forcing_decay / iters_per_epoch).
    backend: for the model's fused layers: "torch" (reference arithmetic), "cpp", "cuda", "triton", or None
      ($VPFAST_BACKEND or auto).
    `create(model.name, **model.config)` rebuilds the same architecture.
    """
    key = str(name).lower()
    if backend is not None:  # one that cannot run here fails now, not at the model's first forward pass
        require_backend(backend)
    if key not in CLASSES:
        raise ValueError(f"unknown model {name!r}; choose one of {NAMES + STOCHASTIC_NAMES}")
    cfg = {}
    if preset is not None:
        if preset not in PRESETS[key]:
            raise ValueError(f"unknown preset {preset!r} for {key}; choose one of {tuple(PRESETS[key])} or None")
        cfg.update(copy.deepcopy(PRESETS[key][preset]))
    cfg.update(config)
    if "backend" in cfg:
        raise TypeError("pass backend as create(..., backend=...), not inside the config")
    try:
        return CLASSES[key](backend=backend, **cfg)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"create({key!r}): {e}") from None
        raise


__all__ = ["NAMES", "PRESETS", "CLASSES", "create", "load_checkpoint", "LoadReport", "CheckpointError",
           "ConvLSTM", "PredRNN", "PredRNNv2", "MotionRNN", "PredRNNpp", "MIM", "PhyDNet", "E3DLSTM", "SimVP", "SimVP_IncepU", "SimVP_gSTA", "TAU",
           "patch", "unpatch", "scheduled_sampling_eta", "reverse_sampling_probs"]


# stochastic and generative predictors (issue 24): vpfast's own layouts (no reference key files), so they are
# registered beside NAMES, with their presets kept in their modules
from . import diffusion as _diffusion, gan as _gan, vae as _vae, vptr as _vptr  # noqa: E402 (after the rest)
from .diffusion import ConditionalDiffusion  # noqa: E402
from .gan import TwoStreamGAN  # noqa: E402
from .vae import VAEPredictor  # noqa: E402
from .vptr import VPTR, VPTR_FAR, VPTR_NAR  # noqa: E402

STOCHASTIC_NAMES = ("diffusion", "vae", "gan", "vptr_far", "vptr_nar")
CLASSES.update(diffusion=ConditionalDiffusion, vae=VAEPredictor, gan=TwoStreamGAN, vptr_far=VPTR_FAR,
               vptr_nar=VPTR_NAR)
PRESETS.update(diffusion=_diffusion.PRESETS, vae=_vae.PRESETS, gan=_gan.PRESETS, vptr_far=_vptr.PRESETS,
               vptr_nar=_vptr.PRESETS)
__all__ += ["STOCHASTIC_NAMES", "ConditionalDiffusion", "VAEPredictor", "TwoStreamGAN", "VPTR", "VPTR_FAR",
            "VPTR_NAR"]
