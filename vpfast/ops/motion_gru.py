"""MotionGRU's state update (thuml MotionRNN, MODELS.md §4), with the pointwise work fused.

    u = σ(update([x, F_prev]))      r = σ(reset([x, F_prev]))
    F' = F_prev ⊙ (1 − u) + tanh(output([x, r ⊙ F_prev])) ⊙ u
    D  = D_prev + 0.5 ⊙ (F_prev − D_prev)
    F  = F' + D

The fast path runs update and reset as one convolution (their weights stacked along the output axis, which
changes no sum), then two fused pointwise kernels around the `output` convolution that the data dependency
forces in between: `motion_gru_reset` (σ of the reset half, times F_prev) and `motion_gru_update` (σ of the
update half, tanh, F', D and F in one pass). Backends: torch (reference below), cpp and cuda
(csrc/*/motion_gru.*), triton (kernels/motion_gru.py); the convolutions are PyTorch's in every backend.

Under autocast every backend does what autocast does to the reference: the three convolutions run in
autocast's dtype and the pointwise work is promoted to the widest input (the states' float32), so F and D come
back in the states' dtype. The fused path gets there by running its convolutions under the caller's autocast
and widening their outputs before the pointwise kernels.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import Op
from . import _checks


def motion_gru_reference(x: torch.Tensor, f_prev: torch.Tensor, d_prev: torch.Tensor,
                         update_weight: torch.Tensor, update_bias: torch.Tensor | None,
                         reset_weight: torch.Tensor, reset_bias: torch.Tensor | None,
                         output_weight: torch.Tensor, output_bias: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    x: Tensor[B, Cin, H, W], f_prev, d_prev: Tensor[B, M, H, W], *_weight: Tensor[M, Cin + M, k, k],
    *_bias: Tensor[M] or None -> (F: Tensor[B, M, H, W], D: Tensor[B, M, H, W])
    """
    pad = update_weight.shape[-1] // 2
    stacked = torch.cat([x, f_prev], dim=1)
    u = torch.sigmoid(F.conv2d(stacked, update_weight, update_bias, padding=pad))
    r = torch.sigmoid(F.conv2d(stacked, reset_weight, reset_bias, padding=pad))
    o = torch.tanh(F.conv2d(torch.cat([x, f_prev * r], dim=1), output_weight, output_bias, padding=pad))
    f_new = f_prev * (1 - u) + o * u
    d = d_prev + 0.5 * (f_prev - d_prev)
    return f_new + d, d


def _check(x, f_prev, d_prev, uw, ub, rw, rb, ow, ob):
    _checks.tensor("x", x, 4, "[B, Cin, H, W]")
    _checks.tensor("f_prev", f_prev, 4, "[B, M, H, W]")
    _checks.tensor("d_prev", d_prev, 4, "[B, M, H, W]")
    _checks.same(("f_prev", "d_prev"), f_prev, d_prev)
    _checks.same(("x", "f_prev"), x, f_prev, shape=False)
    B, Cin, H, W = x.shape
    M = f_prev.shape[1]
    if (f_prev.shape[0], f_prev.shape[2], f_prev.shape[3]) != (B, H, W):
        raise ValueError(f"f_prev must be [B, M, H, W] with B, H, W of x {tuple(x.shape)}, got {tuple(f_prev.shape)}")
    for name, w in (("update_weight", uw), ("reset_weight", rw), ("output_weight", ow)):
        _checks.tensor(name, w, 4, "[M, Cin + M, k, k]")
        _checks.same(("x", name), x, w, shape=False)
        if w.shape[0] != M or w.shape[1] != Cin + M or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            raise ValueError(f"{name} must be [M, Cin + M, k, k] = [{M}, {Cin + M}, k, k] with k odd, got "
                             f"{tuple(w.shape)}")
        if w.shape != uw.shape:
            raise ValueError(f"{name} must have the shape of update_weight {tuple(uw.shape)}, got {tuple(w.shape)}")
    for name, b in (("update_bias", ub), ("reset_bias", rb), ("output_bias", ob)):
        if b is not None:
            _checks.tensor(name, b, 1, "[M]")
            _checks.same(("x", name), x, b, shape=False)
            if b.shape[0] != M:
                raise ValueError(f"{name} must be [M] = [{M}], got {tuple(b.shape)}")


def _fused_path(reset_fn, update_fn):
    """The fast path around two fused pointwise ops (compiled or Triton).

    conv_autocast: the autocast dtype of the caller (None outside autocast). Op.__call__ turns autocast off
    around a fused backend, which is right for the pointwise kernels but would run the convolutions in float32,
    unlike the reference under autocast; so they run under autocast again here, in the caller's dtype.
    """

    def run(x, f_prev, d_prev, uw, ub, rw, rb, ow, ob, conv_autocast=None):
        pad = uw.shape[-1] // 2
        dev = x.device.type
        convs = (torch.autocast(dev, dtype=conv_autocast) if conv_autocast is not None
                 else contextlib.nullcontext())
        stacked = torch.cat([x, f_prev], dim=1)
        if ub is None and rb is None:
            bias = None
        else:
            zeros = uw.new_zeros(uw.shape[0])
            bias = torch.cat([ub if ub is not None else zeros, rb if rb is not None else zeros])
        with convs:
            gates = F.conv2d(stacked, torch.cat([uw, rw]), bias, padding=pad)  # [B, 2M, H, W]: u then r
        # the reference's σ(conv) ⊙ F_prev promotes a low-precision convolution output to F_prev's dtype
        rf = reset_fn(gates.to(f_prev.dtype), f_prev)
        with convs:
            o = F.conv2d(torch.cat([x, rf], dim=1), ow, ob, padding=pad)
        return update_fn(gates.to(f_prev.dtype), o.to(f_prev.dtype), f_prev, d_prev)

    return run


# ---- fake kernels and autograd, shared by the compiled ops and the Triton custom ops ----------------------
# The kernels read contiguous copies of their operands and return new NCHW-contiguous outputs, so the fakes
# are new_empty by size, not empty_like (which keeps a channels_last operand's strides; tests/test_fake_strides.py).
def _mg_reset_fake(gates, f_prev):
    return f_prev.new_empty(f_prev.shape)


def _mg_reset_bwd_fake(grad, gates, f_prev):
    return gates.new_empty(gates.shape), f_prev.new_empty(f_prev.shape)


def _mg_update_fake(gates, o, f_prev, d_prev):
    return f_prev.new_empty(f_prev.shape), f_prev.new_empty(f_prev.shape)


def _mg_update_bwd_fake(grad_f, grad_d, gates, o, f_prev):
    return (gates.new_empty(gates.shape), o.new_empty(o.shape), f_prev.new_empty(f_prev.shape),
            f_prev.new_empty(f_prev.shape))


def _mg_reset_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mg_reset_backward_using(backward_op):
    """The reset step's autograd backward, with `backward_op` computing the gradients (compiled or Triton)."""
    def backward(ctx, grad):
        gates, f_prev = ctx.saved_tensors
        return backward_op(grad, gates, f_prev)
    return backward


def _mg_update_setup(ctx, inputs, output):
    gates, o, f_prev, _ = inputs
    ctx.save_for_backward(gates, o, f_prev)


def _mg_update_backward_using(backward_op):
    """The update step's autograd backward, with `backward_op` computing the gradients (compiled or Triton)."""
    def backward(ctx, grad_f, grad_d):
        gates, o, f_prev = ctx.saved_tensors
        grad_f = torch.zeros_like(f_prev) if grad_f is None else grad_f
        grad_d = torch.zeros_like(f_prev) if grad_d is None else grad_d
        return backward_op(grad_f, grad_d, gates, o, f_prev)
    return backward


# ---- cpp / cuda: compiled pointwise ops ---------------------------------------------------------------
if _ext.has_kernel("motion_gru_reset", "CPU") or _ext.has_kernel("motion_gru_reset", "CUDA"):
    torch.library.register_fake("vpfast::motion_gru_reset")(_mg_reset_fake)
    torch.library.register_fake("vpfast::motion_gru_reset_backward")(_mg_reset_bwd_fake)
    torch.library.register_fake("vpfast::motion_gru_update")(_mg_update_fake)
    torch.library.register_fake("vpfast::motion_gru_update_backward")(_mg_update_bwd_fake)
    torch.library.register_autograd("vpfast::motion_gru_reset",
                                    _mg_reset_backward_using(torch.ops.vpfast.motion_gru_reset_backward),
                                    setup_context=_mg_reset_setup)
    torch.library.register_autograd("vpfast::motion_gru_update",
                                    _mg_update_backward_using(torch.ops.vpfast.motion_gru_update_backward),
                                    setup_context=_mg_update_setup)


def _mg_compiled_reset(gates, f_prev):
    return torch.ops.vpfast.motion_gru_reset(gates, f_prev)


def _mg_compiled_update(gates, o, f_prev, d_prev):
    return torch.ops.vpfast.motion_gru_update(gates, o, f_prev, d_prev)


_mg_compiled = _fused_path(_mg_compiled_reset, _mg_compiled_update)


# ---- triton: Python custom ops around the launchers in kernels/motion_gru.py --------------------------
@torch.library.custom_op("vpfast::motion_gru_reset_triton", mutates_args=())
def _mg_triton_reset(gates: torch.Tensor, f_prev: torch.Tensor) -> torch.Tensor:
    from ..kernels import motion_gru as k
    return k.reset(gates.contiguous(), f_prev.contiguous())


@torch.library.custom_op("vpfast::motion_gru_reset_backward_triton", mutates_args=())
def _mg_triton_reset_bwd(grad: torch.Tensor, gates: torch.Tensor,
                         f_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import motion_gru as k
    return k.reset_backward(grad.contiguous(), gates.contiguous(), f_prev.contiguous())


@torch.library.custom_op("vpfast::motion_gru_update_triton", mutates_args=())
def _mg_triton_update(gates: torch.Tensor, o: torch.Tensor, f_prev: torch.Tensor,
                      d_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import motion_gru as k
    return k.update(gates.contiguous(), o.contiguous(), f_prev.contiguous(), d_prev.contiguous())


@torch.library.custom_op("vpfast::motion_gru_update_backward_triton", mutates_args=())
def _mg_triton_update_bwd(grad_f: torch.Tensor, grad_d: torch.Tensor, gates: torch.Tensor, o: torch.Tensor,
                          f_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import motion_gru as k
    return k.update_backward(grad_f.contiguous(), grad_d.contiguous(), gates.contiguous(), o.contiguous(),
                             f_prev.contiguous())


_mg_triton_reset.register_fake(_mg_reset_fake)
_mg_triton_reset_bwd.register_fake(_mg_reset_bwd_fake)
_mg_triton_update.register_fake(_mg_update_fake)
_mg_triton_update_bwd.register_fake(_mg_update_bwd_fake)
_mg_triton_reset.register_autograd(_mg_reset_backward_using(_mg_triton_reset_bwd), setup_context=_mg_reset_setup)
_mg_triton_update.register_autograd(_mg_update_backward_using(_mg_triton_update_bwd),
                                   setup_context=_mg_update_setup)
_mg_triton = _fused_path(_mg_triton_reset, _mg_triton_update)

# ---- dispatch and the public function -----------------------------------------------------------------
def _check_backend(backend, x, f_prev, *rest, conv_autocast=None):
    """The Triton kernels index the [B, 2M, H, W] gates with int32."""
    if backend == "triton" and 2 * f_prev.numel() >= 2**31:
        return [f"triton kernels index with int32; the gates of f_prev {tuple(f_prev.shape)} have 2**31 elements "
                f"or more"]
    return []


def _reference_backend(*args, conv_autocast=None):
    # the torch backend runs under the caller's autocast itself (Op.__call__ leaves it on for torch)
    return motion_gru_reference(*args)


# Auto's order on CUDA, from forward+backward ratios over eager PyTorch measured on one NVIDIA H200 (torch 2.11,
# Triton 3.6, float32, B=16, 64 -> 18 channels, 16x16, k=3): cuda 1.08x, triton 0.90x, so Triton is never
# auto's choice there. bfloat16/float16 were not measured yet: they follow the float32 order.
OP = Op("motion_gru", kernel="motion_gru_reset", check=_check_backend, prefer={"cuda": ("cuda", "torch")})
OP.register("torch", _reference_backend)
OP.register("cpp", _mg_compiled)
OP.register("cuda", _mg_compiled)
OP.register("triton", _mg_triton)


def motion_gru(x: torch.Tensor, f_prev: torch.Tensor, d_prev: torch.Tensor,
               update_weight: torch.Tensor, update_bias: torch.Tensor | None,
               reset_weight: torch.Tensor, reset_bias: torch.Tensor | None,
               output_weight: torch.Tensor, output_bias: torch.Tensor | None,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MotionGRU's state update (without the warp): the new motion F and trend D.

    x: Tensor[B, Cin, H, W], f_prev, d_prev: Tensor[B, M, H, W], update/reset/output_weight:
    Tensor[M, Cin + M, k, k] (convolutions with padding k//2), *_bias: Tensor[M] or None
    -> (F: Tensor[B, M, H, W], D: Tensor[B, M, H, W])

    u = σ(update([x, F_prev])), r = σ(reset([x, F_prev])),
    F' = F_prev (1 − u) + tanh(output([x, r F_prev])) u, D = D_prev + 0.5 (F_prev − D_prev), F = F' + D.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    (x, f_prev, d_prev, update_weight, update_bias, reset_weight, reset_bias, output_weight,
     output_bias) = OP.cast_inputs(x, f_prev, d_prev, update_weight, update_bias, reset_weight, reset_bias,
                                   output_weight, output_bias)
    _check(x, f_prev, d_prev, update_weight, update_bias, reset_weight, reset_bias, output_weight, output_bias)
    dev = x.device.type
    conv_autocast = torch.get_autocast_dtype(dev) if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) \
        else None
    return OP(x, f_prev, d_prev, update_weight, update_bias, reset_weight, reset_bias, output_weight,
              output_bias, conv_autocast=conv_autocast, backend=backend)
