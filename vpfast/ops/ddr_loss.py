"""DDR loss: TAU's differential divergence regularisation (MODELS.md §6).

Backends: torch (reference below), cpp and cuda (csrc/*/ddr_loss.*, one compiled op pair
vpfast::ddr_loss_forward / ddr_loss_backward; on CPU under autograd vpfast::ddr_loss_forward_grad),
triton (kernels/ddr_loss.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import Op
from . import _checks


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved per-row statistics (and of the kernels' arithmetic) for inputs of `dtype`:
    float32 for the half types (a bf16 row max would shift every p), else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _stats_fake(pred):
    B, T = pred.shape[:2]
    return pred.new_empty((B, T - 1, 6), dtype=stat_dtype(pred.dtype))


def ddr_loss_reference(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1,
                       eps: float = 1e-12) -> torch.Tensor:
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    pred, target: Tensor[B, T, C, H, W] -> Tensor[] (0 when T <= 2, as in the reference)
    """
    B, T = pred.shape[:2]
    if T <= 2:
        return pred[:, :0].sum()  # an exact 0 that still connects to pred's graph
    d_pred = (pred[:, 1:] - pred[:, :-1]).reshape(B, T - 1, -1)
    d_true = (target[:, 1:] - target[:, :-1]).reshape(B, T - 1, -1)
    p = F.softmax(d_pred / tau, dim=-1)
    q = F.softmax(d_true / tau, dim=-1)
    return (p * torch.log(p / (q + eps) + eps)).mean()


# ---- fake kernels and autograd, shared by the compiled op pair and the Triton custom ops -------------------
def _ddr_forward_fake(pred, target, tau, eps):
    return pred.new_empty(()), _stats_fake(pred)


def _ddr_backward_fake(grad, pred, target, stats, tau, eps, need_target):
    # the kernels read contiguous copies and return contiguous gradients (new_empty, not empty_like, which would
    # keep a non-contiguous pred's strides; tests/test_fake_strides.py)
    return pred.new_empty(pred.shape), (target.new_empty(target.shape) if need_target else pred.new_empty((0,)))


def _ddr_setup(ctx, inputs, output):
    pred, target, tau, eps = inputs
    ctx.save_for_backward(pred, target, output[1])
    ctx.tau, ctx.eps = tau, eps
    ctx.mark_non_differentiable(output[1])


def _ddr_backward_using(backward_op):
    """The autograd backward of a forward op whose gradients `backward_op` computes (compiled or Triton)."""
    def backward(ctx, grad_loss, _grad_stats):
        pred, target, stats = ctx.saved_tensors
        gp, gy = backward_op(grad_loss, pred, target, stats, ctx.tau, ctx.eps, ctx.needs_input_grad[1])
        return gp, (gy if ctx.needs_input_grad[1] else None), None, None
    return backward


# ---- cpp / cuda: one compiled op pair ---------------------------------------------------------------------
if _ext.has_kernel("ddr_loss_forward", "CPU") or _ext.has_kernel("ddr_loss_forward", "CUDA"):
    torch.library.register_fake("vpfast::ddr_loss_forward")(_ddr_forward_fake)
    torch.library.register_fake("vpfast::ddr_loss_backward")(_ddr_backward_fake)
    torch.library.register_autograd("vpfast::ddr_loss_forward",
                                    _ddr_backward_using(torch.ops.vpfast.ddr_loss_backward),
                                    setup_context=_ddr_setup)


def _ddr_compiled(pred, target, tau, eps):
    return torch.ops.vpfast.ddr_loss_forward(pred, target, tau, eps)[0]


# ---- cpp under autograd: forward and gradient in one pass ---------------------------------------------
# The CPU kernel computes the gradients while each row is in cache (csrc/cpu/ddr_loss.cpp,
# ddr_loss_forward_grad): backward is then a scaling by the incoming gradient instead of a second sweep that
# recomputes every exponential and log. What the graph keeps between the passes is those gradients
# (pred-sized; target-sized too when target requires grad) rather than pred, target and the row statistics.
if _ext.has_kernel("ddr_loss_forward_grad", "CPU"):

    @torch.library.register_fake("vpfast::ddr_loss_forward_grad")
    def _ddr_forward_grad_fake(pred, target, tau, eps, need_target):
        return (pred.new_empty(()),) + _ddr_backward_fake(None, pred, target, None, tau, eps, need_target)

    def _ddr_grad_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.need_target = inputs[4]
        ctx.set_materialize_grads(False)  # the gradient outputs take no gradient: no zero tensors for them

    def _ddr_grad_backward(ctx, grad_loss, _gp, _gy):
        if grad_loss is None:  # grads are not materialized: an undefined incoming gradient is a zero one
            return None, None, None, None, None
        gp, gy = ctx.saved_tensors
        # without need_target the kernel computed no target gradient (gy is empty): none is returned
        return grad_loss * gp, (grad_loss * gy if ctx.need_target else None), None, None, None

    torch.library.register_autograd("vpfast::ddr_loss_forward_grad", _ddr_grad_backward,
                                    setup_context=_ddr_grad_setup)


def _ddr_cpp(pred, target, tau, eps):
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
        return torch.ops.vpfast.ddr_loss_forward_grad(pred, target, tau, eps, target.requires_grad)[0]
    return torch.ops.vpfast.ddr_loss_forward(pred, target, tau, eps)[0]


# ---- triton: a Python custom op around the launchers in kernels/ddr_loss.py ---------------------------
@torch.library.custom_op("vpfast::ddr_loss_forward_triton", mutates_args=())
def _ddr_triton_forward(pred: torch.Tensor, target: torch.Tensor, tau: float,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import ddr_loss as k
    return k.forward(pred.contiguous(), target.contiguous(), tau, eps)


@torch.library.custom_op("vpfast::ddr_loss_backward_triton", mutates_args=())
def _ddr_triton_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                         tau: float, eps: float, need_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import ddr_loss as k
    return k.backward(grad, pred.contiguous(), target.contiguous(), stats, tau, eps, need_target)


_ddr_triton_forward.register_fake(_ddr_forward_fake)
_ddr_triton_backward.register_fake(_ddr_backward_fake)
_ddr_triton_forward.register_autograd(_ddr_backward_using(_ddr_triton_backward), setup_context=_ddr_setup)


def _ddr_triton(pred, target, tau, eps):
    return _ddr_triton_forward(pred, target, tau, eps)[0]


# ---- dispatch and the public function -----------------------------------------------------------------
def _check(backend, pred, target, tau, eps):
    B, T = pred.shape[:2]
    if backend == "triton" and B * T * -(-pred[0, 0].numel() // 1024) >= 2**31:
        return ["the Triton backward's grid (B * T * D / 1024 programs) exceeds 2^31 - 1"]
    return []


# autocast: softmax-based, so float32 under CUDA autocast and bf16 kept under CPU autocast, as for softmax.
# auto on CUDA: measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward at (16, 10, 3, 128, 128),
# eager time / backend time: cuda 1.44x, triton 0.95x, so cuda, else eager PyTorch. Triton is not picked (that
# number predates splitting its forward over chunks; re-measure before adding it); bf16/fp16 have no numbers
# yet and follow the float32 order.
OP = Op("ddr_loss", kernel="ddr_loss_forward", check=_check, autocast={"cuda": "float32", "cpu": "promote"},
        prefer={"cuda": ("cuda", "torch")})
OP.register("torch", ddr_loss_reference)
OP.register("cpp", _ddr_cpp)
OP.register("cuda", _ddr_compiled)
OP.register("triton", _ddr_triton)


def ddr_loss(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1, eps: float = 1e-12,
             backend: str | None = None) -> torch.Tensor:
    """TAU's differential divergence regularisation between predicted and true frame differences.

    pred, target: Tensor[B, T, C, H, W] -> Tensor[] (scalar)

    With dP_t = P_{t+1} - P_t and dY_t likewise, flattened over D = C*H*W: p = softmax(dP/tau),
    q = softmax(dY/tau), loss = mean over all B*(T-1)*D elements of p*log(p/(q+eps)+eps); 0 if T <= 2.
    Differentiable in pred, and in target when it requires grad. bf16/fp16 inputs (cuda, triton) are computed
    in float32 and the loss and gradients returned in the input's dtype; under CUDA autocast the inputs are
    cast to float32 first, as for softmax.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    pred, target = OP.cast_inputs(pred, target)
    _checks.tensor("pred", pred, 5, "[B, T, C, H, W]")
    _checks.tensor("target", target, 5, "[B, T, C, H, W]")
    _checks.same(("pred", "target"), pred, target)
    tau = _checks.positive("tau", tau)
    eps = _checks.positive("eps", eps)
    if pred.shape[1] <= 2:
        return ddr_loss_reference(pred, target, tau, eps)
    if pred.numel() == 0:  # a mean over no elements: every backend would answer differently (nan, an error)
        raise ValueError(f"pred and target must not be empty (the loss is a mean over their B*(T-1)*C*H*W frame "
                         f"differences), got shape {tuple(pred.shape)}")
    return OP(pred, target, tau, eps, backend=backend)
