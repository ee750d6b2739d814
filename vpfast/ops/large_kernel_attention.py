"""Large-kernel attention's depthwise pair (MODELS.md §5): depthwise k0 x k0 (padding k0//2) followed by a
depthwise k1 x k1 with dilation d (padding d*(k1//2)), optionally followed by a 1x1 convolution.

The reference decomposition of a 21x21 kernel is 5x5 -> 7x7 dilation 3 -> 1x1. The compiled backends fuse
the two depthwise stages per (sample, channel) plane, so the intermediate map never leaves the core's cache;
their backward recomputes it per plane instead of storing it. The 1x1 convolution is a dense GEMM that
oneDNN already runs near peak, so every backend leaves it to F.conv2d.

Backends: torch (reference), cpp and cuda (csrc/*/large_kernel_attention.*, compiled ops
vpfast::large_kernel_attention_forward / _backward), triton (kernels/large_kernel_attention.py).
Dtypes as depthwise_conv2d: cpp float32/float64; cuda and triton also float16/bfloat16, computed in float32.
The fused CUDA forward keeps the intermediate map in float32; the reference, the Triton path and every
backward round it to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import ALL_FLOAT, DEFAULT_DTYPES, Op
from . import _checks
from .depthwise_conv2d import _check_bias, _check_weight, _pair, gpu_limits


def _pad(k, d):
    return (d[0] * (k[0] // 2), d[1] * (k[1] // 2))


def _pair_reference(x, w0, b0, w1, b1, d0, d1):
    C = x.shape[1]
    mid = F.conv2d(x, w0, b0, 1, _pad(w0.shape[2:], d0), d0, groups=C)
    return F.conv2d(mid, w1, b1, 1, _pad(w1.shape[2:], d1), d1, groups=C)


def large_kernel_attention_reference(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None,
                                     w1: torch.Tensor, b1: torch.Tensor | None, dilation=3,
                                     weight_pw: torch.Tensor | None = None,
                                     bias_pw: torch.Tensor | None = None) -> torch.Tensor:
    """The reference arithmetic in plain PyTorch (OpenSTL's conv0 -> conv_spatial -> conv1).

    x: Tensor[B, C, H, W], w0: Tensor[C, 1, k0, k0], w1: Tensor[C, 1, k1, k1], b0, b1: Tensor[C] | None,
    weight_pw: Tensor[C_out, C, 1, 1] | None, bias_pw: Tensor[C_out] | None -> Tensor[B, C or C_out, H, W]
    """
    out = _pair_reference(x, w0, b0, w1, b1, (1, 1), _pair("dilation", dilation, 1))
    if weight_pw is not None:
        out = F.conv2d(out, weight_pw, bias_pw)
    return out


# ---- fake kernels and autograd, shared by the compiled op pair and the Triton custom ops -------------------
def _lka_forward_fake(x, w0, b0, w1, b1, dilation0, dilation1):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lka_backward_fake(grad, x, w0, b0, w1, dilation0, dilation1, output_mask):
    def maybe(i, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if output_mask[i] else x.new_empty((0,))

    def bias_grad(i):
        return x.new_empty((x.shape[1],)) if output_mask[i] else x.new_empty((0,))
    return maybe(0, x), maybe(1, w0), bias_grad(2), maybe(3, w1), bias_grad(4)


def _lka_setup(ctx, inputs, output):
    x, w0, b0, w1, b1, d0, d1 = inputs
    ctx.save_for_backward(x, w0, b0, w1)
    ctx.args = (d0, d1)
    ctx.has_bias = (b0 is not None, b1 is not None)


def _lka_backward_using(backward_op):
    """The autograd backward of a forward op whose gradients `backward_op` computes (compiled or Triton)."""
    def backward(ctx, grad):
        x, w0, b0, w1 = ctx.saved_tensors
        n = ctx.needs_input_grad
        mask = [bool(n[0]), bool(n[1]), bool(ctx.has_bias[0] and n[2]), bool(n[3]), bool(ctx.has_bias[1] and n[4])]
        g = backward_op(grad, x, w0, b0, w1, *ctx.args, mask)
        return tuple(t if m else None for t, m in zip(g, mask)) + (None, None)
    return backward


# ---- cpp / cuda: one compiled op pair -----------------------------------------------------------------
if _ext.has_kernel("large_kernel_attention_forward", "CPU") or \
        _ext.has_kernel("large_kernel_attention_forward", "CUDA"):
    torch.library.register_fake("vpfast::large_kernel_attention_forward")(_lka_forward_fake)
    torch.library.register_fake("vpfast::large_kernel_attention_backward")(_lka_backward_fake)
    torch.library.register_autograd("vpfast::large_kernel_attention_forward",
                                    _lka_backward_using(torch.ops.vpfast.large_kernel_attention_backward),
                                    setup_context=_lka_setup)


def _lka_compiled(x, w0, b0, w1, b1, d0, d1):
    return torch.ops.vpfast.large_kernel_attention_forward(x, w0, b0, w1, b1, list(d0), list(d1))


# ---- triton: a Python custom op around the launchers in kernels/large_kernel_attention.py -------------
@torch.library.custom_op("vpfast::large_kernel_attention_forward_triton", mutates_args=())
def _lka_triton_forward(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, w1: torch.Tensor,
                        b1: torch.Tensor | None, dilation0: list[int], dilation1: list[int]) -> torch.Tensor:
    from ..kernels import large_kernel_attention as k
    return k.forward(x, w0, b0, w1, b1, dilation0, dilation1)


@torch.library.custom_op("vpfast::large_kernel_attention_backward_triton", mutates_args=())
def _lka_triton_backward(grad: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None,
                         w1: torch.Tensor, dilation0: list[int], dilation1: list[int], output_mask: list[bool]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import large_kernel_attention as k
    return k.backward(grad, x, w0, b0, w1, dilation0, dilation1, output_mask)


_lka_triton_forward.register_fake(_lka_forward_fake)
_lka_triton_backward.register_fake(_lka_backward_fake)
_lka_triton_forward.register_autograd(_lka_backward_using(_lka_triton_backward), setup_context=_lka_setup)


def _lka_triton(x, w0, b0, w1, b1, d0, d1):
    return _lka_triton_forward(x, w0, b0, w1, b1, list(d0), list(d1))


# ---- dispatch and the public function -----------------------------------------------------------------
def _check(backend, x, w0, b0, w1, b1, d0, d1):
    B, C, H, W = x.shape
    k = max(w0.shape[2] * w0.shape[3], w1.shape[2] * w1.shape[3])
    return gpu_limits(backend, B, C, H, W, H, W, k, 1, (*d0, *d1))


# auto on CUDA: eager PyTorch (cuDNN). Measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward at
# (16, 512, 16, 16), 5x5 then 7x7 dilation 3, eager time / backend time: cuda 0.43x, triton 0.39x; so auto never
# picks them on a GPU. No bf16/fp16 numbers exist yet; the float32 order is used for them too.
OP = Op("large_kernel_attention", kernel="large_kernel_attention_forward", check=_check, autocast="lower",
        dtypes={"cpp": DEFAULT_DTYPES, "cuda": ALL_FLOAT, "triton": ALL_FLOAT},
        prefer={"cuda": ("torch",)})
OP.register("torch", _pair_reference)
OP.register("cpp", _lka_compiled)
OP.register("cuda", _lka_compiled)
OP.register("triton", _lka_triton)


def large_kernel_attention(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, w1: torch.Tensor,
                           b1: torch.Tensor | None, dilation=3, weight_pw: torch.Tensor | None = None,
                           bias_pw: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Large-kernel attention's convolutions: depthwise w0 (padding k0//2), then depthwise w1 with dilation
    `dilation` (padding dilation*(k1//2)), then the optional 1x1 convolution weight_pw/bias_pw.

    x: Tensor[B, C, H, W], w0: Tensor[C, 1, k0, k0'], w1: Tensor[C, 1, k1, k1'] (odd sizes), b0, b1: Tensor[C]
    | None, weight_pw: Tensor[C_out, C, 1, 1] | None, bias_pw: Tensor[C_out] | None
    -> Tensor[B, C_out (C without weight_pw), H, W]

    The two depthwise stages are fused in the compiled backends. OpenSTL's AttentionModule is
    `large_kernel_attention(x, conv0.weight, conv0.bias, conv_spatial.weight, conv_spatial.bias, 3,
    conv1.weight, conv1.bias)` followed by its gating.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x, w0, b0, w1, b1 = OP.cast_inputs(x, w0, b0, w1, b1)
    _checks.tensor("x", x, 4, "[B, C, H, W]")
    C = x.shape[1]
    _check_weight("w0", w0, C, x)
    _check_weight("w1", w1, C, x)
    _check_bias("b0", b0, C, x)
    _check_bias("b1", b1, C, x)
    d1 = _pair("dilation", dilation, 1)
    if weight_pw is not None:
        _checks.tensor("weight_pw", weight_pw, 4, "[C_out, C, 1, 1]")
        if weight_pw.shape[1] != C or weight_pw.shape[2:] != (1, 1):
            raise ValueError(f"weight_pw must have shape [C_out, {C}, 1, 1], got {tuple(weight_pw.shape)}")
        if bias_pw is not None:
            _checks.tensor("bias_pw", bias_pw, 1, "[C_out]")
            if bias_pw.shape[0] != weight_pw.shape[0]:
                raise ValueError(f"bias_pw must have shape [{weight_pw.shape[0]}], got {tuple(bias_pw.shape)}")
    elif bias_pw is not None:
        raise ValueError("bias_pw was given without weight_pw")
    out = OP(x, w0, b0, w1, b1, (1, 1), d1, backend=backend)
    if weight_pw is not None:
        out = F.conv2d(out, weight_pw, bias_pw)
    return out
