"""Depthwise 2-D convolution (one filter per channel), the building block of gSTA's and TAU's large-kernel
attention (MODELS.md §5).

Backends: torch (reference below, F.conv2d with groups=C), cpp and cuda (csrc/*/depthwise_conv2d.*, compiled
ops vpfast::depthwise_conv2d_forward / depthwise_conv2d_backward), triton (kernels/depthwise_conv2d.py).
The weight and bias gradients of the compiled backends are deterministic: per-(sample, channel) partial sums
reduced over the batch in a fixed order, never float atomics.

Dtypes: cpp takes float32/float64 (bfloat16 on the CPU runs the reference); cuda and triton also take
float16/bfloat16, computed and accumulated in float32 and returned in the input's dtype. Under autocast the
inputs are cast to autocast's dtype first, as for F.conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import ALL_FLOAT, DEFAULT_DTYPES, Op
from . import _checks


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool)
                                                                for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _check_weight(name: str, weight, C: int, x: torch.Tensor, odd: bool = True) -> tuple[int, int]:
    _checks.tensor(name, weight, 4, "[C, 1, kh, kw]")
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"{name} must have shape [C, 1, kh, kw] with C = {C} (the input's channels), got "
                         f"{tuple(weight.shape)}")
    kh, kw = weight.shape[2], weight.shape[3]
    if odd and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"{name}: kernel sizes must be odd, got {kh}x{kw}")
    _checks.same(("x", name), x, weight, shape=False)
    return kh, kw


def _check_bias(name: str, bias, C: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    _checks.tensor(name, bias, 1, "[C]")
    if bias.shape[0] != C:
        raise ValueError(f"{name} must have shape [C] with C = {C}, got {tuple(bias.shape)}")
    _checks.same(("x", name), x, bias, shape=False)


def normalize_args(x, weight, bias=None, stride=1, padding=None, dilation=1):
    """Check the arguments; returns (stride, padding, dilation) as pairs. padding=None: dilation*(k//2),
    which keeps H, W at stride 1 ("same")."""
    _checks.tensor("x", x, 4, "[B, C, H, W]")
    C = x.shape[1]
    kh, kw = _check_weight("weight", weight, C, x)
    _check_bias("bias", bias, C, x)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if padding is None:
        padding = (dilation[0] * (kh // 2), dilation[1] * (kw // 2))
    elif isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            padding = (dilation[0] * (kh // 2), dilation[1] * (kw // 2))
        else:
            raise ValueError(f"padding must be an int, a pair, 'same', 'valid' or None, got {padding!r}")
    padding = _pair("padding", padding, 0)
    H, W = x.shape[2], x.shape[3]
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"the output would be empty: input {H}x{W}, kernel {kh}x{kw}, padding {padding}, "
                         f"dilation {dilation}, stride {stride}")
    return stride, padding, dilation


def output_size(H: int, W: int, k: tuple[int, int], stride, padding, dilation) -> tuple[int, int]:
    return ((H + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1,
            (W + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1)


def depthwise_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               stride=1, padding=None, dilation=1) -> torch.Tensor:
    """The reference in plain PyTorch (the oracle and the fallback): F.conv2d with groups = C.

    x: Tensor[B, C, H, W], weight: Tensor[C, 1, kh, kw], bias: Tensor[C] | None -> Tensor[B, C, Ho, Wo]
    """
    if padding is None:
        padding = (_pair("dilation", dilation, 1)[0] * (weight.shape[2] // 2),
                   _pair("dilation", dilation, 1)[1] * (weight.shape[3] // 2))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


# ---- fake kernels and autograd, shared by the compiled op pair and the Triton custom ops -------------------
def _dw_forward_fake(x, weight, bias, stride, padding, dilation):
    Ho, Wo = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], x.shape[1], Ho, Wo))


def _dw_backward_fake(grad, x, weight, stride, padding, dilation, output_mask):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else x.new_empty((0,))
    gb = x.new_empty((x.shape[1],)) if output_mask[2] else x.new_empty((0,))
    return gx, gw, gb


def _dw_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _dw_backward_using(backward_op):
    """The autograd backward of a forward op whose gradients `backward_op` computes (compiled or Triton)."""
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
        gx, gw, gb = backward_op(grad, x, weight, *ctx.args, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None)
    return backward


# ---- cpp / cuda: one compiled op pair -----------------------------------------------------------------
if _ext.has_kernel("depthwise_conv2d_forward", "CPU") or _ext.has_kernel("depthwise_conv2d_forward", "CUDA"):
    torch.library.register_fake("vpfast::depthwise_conv2d_forward")(_dw_forward_fake)
    torch.library.register_fake("vpfast::depthwise_conv2d_backward")(_dw_backward_fake)
    torch.library.register_autograd("vpfast::depthwise_conv2d_forward",
                                    _dw_backward_using(torch.ops.vpfast.depthwise_conv2d_backward),
                                    setup_context=_dw_setup)


def _dw_compiled(x, weight, bias, stride, padding, dilation):
    return torch.ops.vpfast.depthwise_conv2d_forward(x, weight, bias, list(stride), list(padding), list(dilation))


# ---- triton: a Python custom op around the launchers in kernels/depthwise_conv2d.py -------------------
@torch.library.custom_op("vpfast::depthwise_conv2d_forward_triton", mutates_args=())
def _dw_triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                       padding: list[int], dilation: list[int]) -> torch.Tensor:
    from ..kernels import depthwise_conv2d as k
    return k.forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                     stride, padding, dilation)


@torch.library.custom_op("vpfast::depthwise_conv2d_backward_triton", mutates_args=())
def _dw_triton_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                        padding: list[int], dilation: list[int],
                        output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import depthwise_conv2d as k
    return k.backward(grad.contiguous(), x.contiguous(), weight.contiguous(), stride, padding, dilation,
                      output_mask)


_dw_triton_forward.register_fake(_dw_forward_fake)
_dw_triton_backward.register_fake(_dw_backward_fake)
_dw_triton_forward.register_autograd(_dw_backward_using(_dw_triton_backward), setup_context=_dw_setup)


def _dw_triton(x, weight, bias, stride, padding, dilation):
    return _dw_triton_forward(x, weight, bias, list(stride), list(padding), list(dilation))


def _dw_torch(x, weight, bias, stride, padding, dilation):
    return depthwise_conv2d_reference(x, weight, bias, stride, padding, dilation)


# ---- dispatch and the public function -----------------------------------------------------------------
_INT32 = 2**31
_TRITON_BLOCK = 128  # kernels/depthwise_conv2d.py's BLOCK (not imported: that would define its kernels)


def gpu_limits(backend: str, B: int, C: int, H: int, W: int, Ho: int, Wo: int, kh: int, kw: int,
               ints=()) -> list[str]:
    """Why the cuda/triton kernels cannot take a problem of this size (empty: they can). Their grids count
    work on x alone, so B*C planes are unlimited; what remains are 32-bit quantities."""
    if backend not in ("cuda", "triton"):
        return []
    why = []
    if any(v >= _INT32 for v in ints):
        why.append(f"{backend} takes stride, padding and dilation below 2^31")
    if backend == "triton":
        plane = max(H * W, Ho * Wo)
        if plane >= _INT32:
            why.append(f"triton indexes within a plane in 32 bits, got planes of {plane} elements")
        if B * C * -(-plane // _TRITON_BLOCK) >= _INT32 or C * (kh * kw + 1) >= _INT32:
            why.append("the Triton grid would exceed 2^31 - 1 programs")
    return why


def _check(backend, x, weight, bias, stride, padding, dilation):
    B, C, H, W = x.shape
    kh, kw = weight.shape[2:]
    Ho, Wo = output_size(H, W, (kh, kw), stride, padding, dilation)
    return gpu_limits(backend, B, C, H, W, Ho, Wo, kh, kw, (*stride, *padding, *dilation))


# auto on CUDA: eager PyTorch (cuDNN). Measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward,
# eager time / backend time at (16, 512, 16, 16): cuda 0.62x (5x5), 0.55x (7x7 dilation 3), 0.37x (21x21);
# triton 0.41x / 0.48x / 0.55x. Neither wins, so auto never picks them on a GPU (they stay available by name).
# No bf16/fp16 numbers exist yet; the float32 order is used for them too.
OP = Op("depthwise_conv2d", kernel="depthwise_conv2d_forward", check=_check, autocast="lower",
        dtypes={"cpp": DEFAULT_DTYPES, "cuda": ALL_FLOAT, "triton": ALL_FLOAT},
        prefer={"cuda": ("torch",)})
OP.register("torch", _dw_torch)
OP.register("cpp", _dw_compiled)
OP.register("cuda", _dw_compiled)
OP.register("triton", _dw_triton)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=None, dilation=1, backend: str | None = None) -> torch.Tensor:
    """Depthwise convolution: channel c of x convolved (cross-correlated, as nn.Conv2d) with weight[c, 0].

    x: Tensor[B, C, H, W], weight: Tensor[C, 1, kh, kw] (kh, kw odd), bias: Tensor[C] | None
    -> Tensor[B, C, Ho, Wo], Ho = (H + 2*padding - dilation*(kh-1) - 1) // stride + 1 (likewise Wo)

    stride, dilation: int or (h, w) pair, >= 1. padding: int or pair >= 0 (zeros), "same", "valid", or None
    for dilation*(k//2) on each side (keeps H, W at stride 1). Same result as
    `F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`; differentiable in x, weight and bias.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x, weight, bias = OP.cast_inputs(x, weight, bias)
    stride, padding, dilation = normalize_args(x, weight, bias, stride, padding, dilation)
    return OP(x, weight, bias, stride, padding, dilation, backend=backend)
