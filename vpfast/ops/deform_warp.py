"""Modulated deformable k x k warp: MotionRNN's Warp (MODELS.md §4).

Every output pixel takes k*k bilinear samples of the zero-padded input at the neighbour positions moved by
per-pixel offsets, multiplies them by a per-pixel mask, and contracts the C*k*k samples with a k x k weight.

Backends: torch (reference below, thuml's gather arithmetic generalised to any odd k), cpp and cuda
(csrc/*/deform_warp.*: the samples go straight into a column buffer, the contraction is a GEMM), triton
(kernels/deform_warp.py).

Half precision (bf16/fp16, on the GPU backends and the torch reference): sample positions and corner
weights are computed in float32, never in the input dtype (bf16 holds a position of 60.3 as 60.25, a
quarter pixel off); the samples are rounded to the input dtype once and contracted with the weight in that
dtype (a GEMM that accumulates in float32, as a convolution under autocast); the offset, mask and input
gradients are reduced in float32 and the fused backends accumulate the weight gradient over images and
pixels in float32; every gradient comes back in its input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import Op
from . import _checks


def deform_warp_reference(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    x: Tensor[B, C, H, W], offset: Tensor[B, 2k², H, W] ([dy_0..dy_{k²-1}, dx_0..dx_{k²-1}]),
    mask: Tensor[B, k², H, W], weight: Tensor[O, C, k, k] -> Tensor[B, O, H, W]

    As thuml's Warp: positions live in the input padded by one zero row/column on each side; they are
    clamped into that padded frame before the four corners are gathered, so every position that leaves the
    map reads the zero border (zero padding, for any k). The masked samples are laid out as k x k tiles and
    contracted by a stride-k convolution with the weight. bf16/fp16 inputs: positions, corner weights and
    samples in float32, the samples rounded to x's dtype before the convolution (see the module docstring).
    """
    B, C, H, W = x.shape
    O, _, k, _ = weight.shape
    N = k * k
    half = k // 2
    Hp, Wp = H + 2, W + 2
    pdt = torch.promote_types(x.dtype, torch.float32)  # positions: float32 at least (x.dtype otherwise)
    ar = torch.arange(k, device=x.device, dtype=pdt) - half
    ny, nx = torch.meshgrid(ar, ar, indexing="ij")  # neighbour n = i*k + j -> (i - k//2, j - k//2)
    base_y = torch.arange(1, H + 1, device=x.device, dtype=pdt).view(1, 1, H, 1)
    base_x = torch.arange(1, W + 1, device=x.device, dtype=pdt).view(1, 1, 1, W)
    offset = offset.to(pdt)
    py = base_y + ny.reshape(1, N, 1, 1) + offset[:, :N]  # [B, N, H, W], padded-frame rows
    px = base_x + nx.reshape(1, N, 1, 1) + offset[:, N:]
    y0 = py.detach().floor()
    x0 = px.detach().floor()
    y0c, y1c = y0.clamp(0, Hp - 1), (y0 + 1).clamp(0, Hp - 1)
    x0c, x1c = x0.clamp(0, Wp - 1), (x0 + 1).clamp(0, Wp - 1)
    pyc, pxc = py.clamp(0, Hp - 1), px.clamp(0, Wp - 1)
    g_lt = (1 + (y0c - pyc)) * (1 + (x0c - pxc))
    g_rb = (1 - (y1c - pyc)) * (1 - (x1c - pxc))
    g_lb = (1 + (y0c - pyc)) * (1 - (x1c - pxc))
    g_rt = (1 - (y1c - pyc)) * (1 + (x0c - pxc))
    xp = F.pad(x, (1, 1, 1, 1)).reshape(B, C, Hp * Wp)

    def gather(yy, xx):
        idx = (yy * Wp + xx).long().reshape(B, 1, N * H * W).expand(B, C, N * H * W)
        return xp.gather(2, idx).reshape(B, C, N, H, W)

    s = (g_lt.unsqueeze(1) * gather(y0c, x0c) + g_rb.unsqueeze(1) * gather(y1c, x1c)
         + g_lb.unsqueeze(1) * gather(y0c, x1c) + g_rt.unsqueeze(1) * gather(y1c, x0c))
    s = (s * mask.to(pdt).unsqueeze(1)).to(x.dtype)
    # k x k tiles: pixel (h, w) owns rows h*k..h*k+k-1 and columns w*k..w*k+k-1; neighbour n at (n//k, n%k)
    tiles = s.reshape(B, C, k, k, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C, H * k, W * k)
    return F.conv2d(tiles, weight, stride=k)


def _check(x, offset, mask, weight):
    _checks.tensor("x", x, 4, "[B, C, H, W]")
    _checks.tensor("offset", offset, 4, "[B, 2k², H, W]")
    _checks.tensor("mask", mask, 4, "[B, k², H, W]")
    _checks.tensor("weight", weight, 4, "[O, C, k, k]")
    for name, t in (("offset", offset), ("mask", mask), ("weight", weight)):
        _checks.same(("x", name), x, t, shape=False)
    B, C, H, W = x.shape
    O, Cw, k, k2 = weight.shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"weight must be [O, C, k, k] with an odd k, got shape {tuple(weight.shape)}")
    if Cw != C:
        raise ValueError(f"weight must have C = {C} input channels (x is {tuple(x.shape)}), got {tuple(weight.shape)}")
    if tuple(offset.shape) != (B, 2 * k * k, H, W):
        raise ValueError(f"offset must be [B, 2k², H, W] = {(B, 2 * k * k, H, W)} for x {tuple(x.shape)} and k = {k}, "
                         f"got {tuple(offset.shape)}")
    if tuple(mask.shape) != (B, k * k, H, W):
        raise ValueError(f"mask must be [B, k², H, W] = {(B, k * k, H, W)} for x {tuple(x.shape)} and k = {k}, "
                         f"got {tuple(mask.shape)}")


def _index_limits(backend, x, offset, mask, weight):
    """Why a fused kernel cannot take these inputs: they index a plane with 32 bits, and Triton's one grid
    axis holds B * k² * cdiv(H*W, 128) programs."""
    B, C, H, W = x.shape
    N = weight.shape[2] ** 2
    why = []
    if H * W >= 2**31 or H + 2 >= 2**30 or W + 2 >= 2**30:
        why.append(f"the map {H}x{W} is too large for 32-bit indices within a plane")
    elif backend == "triton" and (B * N * -(-H * W // 128) >= 2**31 or B * C * N >= 2**31):
        why.append(f"{B} images of {H}x{W} with k² = {N} exceed Triton's 2^31 programs or 32-bit plane counts")
    return why


def _fake_out(x, offset, mask, weight):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _fake_grads(x, offset, mask, weight, needs):
    """The gradients as the kernels return them: new NCHW-contiguous tensors (the kernels read contiguous copies),
    whatever the operands' layouts, so new_empty by size rather than empty_like (tests/test_fake_strides.py)."""
    return (x.new_empty(x.shape) if needs[0] else x.new_empty((0,)),
            offset.new_empty(offset.shape) if needs[1] else x.new_empty((0,)),
            mask.new_empty(mask.shape) if needs[2] else x.new_empty((0,)),
            x.new_empty(weight.shape) if needs[3] else x.new_empty((0,)))


# ---- cpp / cuda: one compiled op pair, fake kernel and autograd here ----------------------------------
if _ext.has_kernel("deform_warp_forward", "CPU") or _ext.has_kernel("deform_warp_forward", "CUDA"):

    @torch.library.register_fake("vpfast::deform_warp_forward")
    def _dw_forward_fake(x, offset, mask, weight):
        return _fake_out(x, offset, mask, weight)

    @torch.library.register_fake("vpfast::deform_warp_backward")
    def _dw_backward_fake(grad, x, offset, mask, weight, needs):
        return _fake_grads(x, offset, mask, weight, needs)

    def _dw_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _dw_backward(ctx, grad):
        x, offset, mask, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = torch.ops.vpfast.deform_warp_backward(grad, x, offset, mask, weight, needs)
        return tuple(g if n else None for g, n in zip(grads, needs))

    torch.library.register_autograd("vpfast::deform_warp_forward", _dw_backward, setup_context=_dw_setup)


def _dw_compiled(x, offset, mask, weight):
    return torch.ops.vpfast.deform_warp_forward(x, offset, mask, weight)


# ---- triton: a Python custom op around the launchers in kernels/deform_warp.py ------------------------
@torch.library.custom_op("vpfast::deform_warp_forward_triton", mutates_args=())
def _dw_triton_forward(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    from ..kernels import deform_warp as k
    return k.forward(x.contiguous(), offset.contiguous(), mask.contiguous(), weight.contiguous())


@_dw_triton_forward.register_fake
def _(x, offset, mask, weight):
    return _fake_out(x, offset, mask, weight)


@torch.library.custom_op("vpfast::deform_warp_backward_triton", mutates_args=())
def _dw_triton_backward(grad: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                        weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import deform_warp as k
    return k.backward(grad.contiguous(), x.contiguous(), offset.contiguous(), mask.contiguous(),
                      weight.contiguous())


@_dw_triton_backward.register_fake
def _(grad, x, offset, mask, weight):
    return _fake_grads(x, offset, mask, weight, (True,) * 4)


def _dw_triton_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dw_triton_bwd(ctx, grad):
    x, offset, mask, weight = ctx.saved_tensors
    grads = _dw_triton_backward(grad, x, offset, mask, weight)
    return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad[:4]))


_dw_triton_forward.register_autograd(_dw_triton_bwd, setup_context=_dw_triton_setup)

# ---- dispatch and the public function -----------------------------------------------------------------
# autocast: a contraction with a weight, so autocast's dtype as for a convolution.
# auto on CUDA: measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward at (8, 64, 64, 64)
# k=3, eager time / backend time: cuda 2.30x, triton 2.11x. bf16/fp16 have not been measured yet: the
# float32 order stands for them.
OP = Op("deform_warp", kernel="deform_warp_forward", check=_index_limits, autocast="lower",
        prefer={"cuda": ("cuda", "triton", "torch")})
OP.register("torch", deform_warp_reference)
OP.register("cpp", _dw_compiled)
OP.register("cuda", _dw_compiled)
OP.register("triton", _dw_triton_forward)


def deform_warp(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """MotionRNN's Warp: modulated deformable k x k bilinear sampling contracted with a k x k weight.

    x: Tensor[B, C, H, W], offset: Tensor[B, 2k², H, W], mask: Tensor[B, k², H, W],
    weight: Tensor[O, C, k, k] (k odd) -> Tensor[B, O, H, W]

    out[b, o, h, w] = sum_{c, n} weight[o, c, n // k, n % k] * mask[b, n, h, w] *
                      bilinear(x[b, c], h + n // k - k//2 + offset[b, n, h, w], w + n % k - k//2 + offset[b, k² + n, h, w])
    Offsets are laid out [dy_0..dy_{k²-1}, dx_0..dx_{k²-1}] (all row offsets first), neighbours row-major;
    samples outside the map read zeros (zero padding k//2). Equal to torchvision's deform_conv2d with
    padding k//2 and the offsets interleaved per neighbour as (dy_n, dx_n). Differentiable in all four
    inputs. The CPU backward is deterministic; on a GPU the offset, mask and weight gradients are too, while
    the input gradient is scattered with atomic adds (the cuda backend reports itself to
    torch.use_deterministic_algorithms). bf16/fp16 inputs are sampled at float32 positions and return their
    own dtype.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x, offset, mask, weight = OP.cast_inputs(x, offset, mask, weight)
    _check(x, offset, mask, weight)
    return OP(x, offset, mask, weight, backend=backend)
