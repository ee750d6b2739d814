"""Bilinear warp of a feature map by a per-pixel flow in pixels (the k = 1 case of deform_warp, no mask).

Backends: torch (reference below: build the sampling grid and call grid_sample), cpp and cuda
(csrc/*/flow_warp.*: positions computed in registers, no grid tensor), triton (kernels/flow_warp.py).

Half precision (bf16/fp16, on the GPU backends and the torch reference): sample positions and corner
weights are computed in float32, never in the input dtype, because a 16-bit coordinate is coarse (bf16 holds
60.3 as 60.25, a quarter pixel off; grid_sample's normalised grid in bf16 is as coarse), and sums and
gradients accumulate in float32; outputs and gradients come back in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .._dispatch import Op
from . import _checks

PADDING_MODES = ("zeros", "border")


def flow_warp_reference(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros",
                        align_corners: bool = True) -> torch.Tensor:
    """The reference arithmetic in plain PyTorch (the oracle and the fallback).

    x: Tensor[B, C, H, W], flow: Tensor[B, 2, H, W] (channel 0 = dx along W, channel 1 = dy along H, in
    pixels) -> Tensor[B, C, H, W]: the usual grid construction followed by grid_sample (bilinear).
    bf16/fp16 inputs are warped in float32 and the result rounded once (see the module docstring).
    """
    if x.dtype in (torch.bfloat16, torch.float16) and flow.dtype == x.dtype:
        out = flow_warp_reference(x.float(), flow.float(), padding_mode, align_corners)
        # grid_sample's own result dtype: float32 under CPU autocast (its policy there), x's dtype otherwise
        return out if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else out.to(x.dtype)
    B, C, H, W = x.shape
    gy = torch.arange(H, device=x.device, dtype=x.dtype).view(1, H, 1)
    gx = torch.arange(W, device=x.device, dtype=x.dtype).view(1, 1, W)
    px = gx + flow[:, 0]
    py = gy + flow[:, 1]
    if align_corners:
        nx = 2 * px / max(W - 1, 1) - 1
        ny = 2 * py / max(H - 1, 1) - 1
    else:
        nx = (2 * px + 1) / W - 1
        ny = (2 * py + 1) / H - 1
    grid = torch.stack([nx, ny], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)


def _index_limits(backend, x, flow, padding_mode, align_corners):
    """Why a fused kernel cannot take these inputs: they index a plane with 32 bits, and Triton's one grid
    axis holds B * cdiv(H*W, 128) programs."""
    B, C, H, W = x.shape
    why = []
    if H * W >= 2**31 or H + 2 >= 2**30 or W + 2 >= 2**30:
        why.append(f"the map {H}x{W} is too large for 32-bit indices within a plane")
    elif backend == "triton" and (B * -(-H * W // 128) >= 2**31 or B * C >= 2**31):
        why.append(f"{B} images of {H}x{W} exceed Triton's 2^31 programs or 32-bit plane counts")
    return why


def _check(x, flow, padding_mode, align_corners):
    _checks.tensor("x", x, 4, "[B, C, H, W]")
    _checks.tensor("flow", flow, 4, "[B, 2, H, W]")
    _checks.same(("x", "flow"), x, flow, shape=False)
    B, C, H, W = x.shape
    if tuple(flow.shape) != (B, 2, H, W):
        raise ValueError(f"flow must be [B, 2, H, W] = {(B, 2, H, W)} for x {tuple(x.shape)}, got {tuple(flow.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")


# ---- the forward's fake kernel and autograd context, shared by the compiled op and the Triton custom op ---
# The kernels (cpp, cuda and the Triton launchers) read contiguous copies of x and flow and return new
# NCHW-contiguous tensors, so the fakes are new_empty by size: empty_like would keep a channels_last or
# transposed operand's strides, which the kernels do not (tests/test_fake_strides.py).
def _fw_forward_fake(x, flow, border, align_corners):
    return x.new_empty(x.shape)


def _fw_setup(ctx, inputs, output):
    x, flow, border, align_corners = inputs
    ctx.save_for_backward(x, flow)
    ctx.border, ctx.align_corners = border, align_corners


# ---- cpp / cuda: one compiled op pair -----------------------------------------------------------------
if _ext.has_kernel("flow_warp_forward", "CPU") or _ext.has_kernel("flow_warp_forward", "CUDA"):
    torch.library.register_fake("vpfast::flow_warp_forward")(_fw_forward_fake)

    @torch.library.register_fake("vpfast::flow_warp_backward")
    def _fw_backward_fake(grad, x, flow, border, align_corners, need_x, need_flow):
        return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
                flow.new_empty(flow.shape) if need_flow else x.new_empty((0,)))

    def _fw_backward(ctx, grad):
        x, flow = ctx.saved_tensors
        nx, nf = ctx.needs_input_grad[:2]
        gx, gf = torch.ops.vpfast.flow_warp_backward(grad, x, flow, ctx.border, ctx.align_corners, nx, nf)
        return (gx if nx else None), (gf if nf else None), None, None

    torch.library.register_autograd("vpfast::flow_warp_forward", _fw_backward, setup_context=_fw_setup)


def _fw_compiled(x, flow, padding_mode, align_corners):
    return torch.ops.vpfast.flow_warp_forward(x, flow, padding_mode == "border", align_corners)


# ---- triton: a Python custom op around the launchers in kernels/flow_warp.py --------------------------
@torch.library.custom_op("vpfast::flow_warp_forward_triton", mutates_args=())
def _fw_triton_forward(x: torch.Tensor, flow: torch.Tensor, border: bool, align_corners: bool) -> torch.Tensor:
    from ..kernels import flow_warp as k
    return k.forward(x.contiguous(), flow.contiguous(), border, align_corners)


@torch.library.custom_op("vpfast::flow_warp_backward_triton", mutates_args=())
def _fw_triton_backward(grad: torch.Tensor, x: torch.Tensor, flow: torch.Tensor, border: bool,
                        align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import flow_warp as k
    return k.backward(grad.contiguous(), x.contiguous(), flow.contiguous(), border, align_corners)


@_fw_triton_backward.register_fake
def _(grad, x, flow, border, align_corners):
    return x.new_empty(x.shape), flow.new_empty(flow.shape)


def _fw_triton_bwd(ctx, grad):
    x, flow = ctx.saved_tensors
    gx, gf = _fw_triton_backward(grad, x, flow, ctx.border, ctx.align_corners)
    return gx, gf, None, None


_fw_triton_forward.register_fake(_fw_forward_fake)
_fw_triton_forward.register_autograd(_fw_triton_bwd, setup_context=_fw_setup)


def _fw_triton(x, flow, padding_mode, align_corners):
    return _fw_triton_forward(x, flow, padding_mode == "border", align_corners)


# ---- dispatch and the public function -----------------------------------------------------------------
# autocast: as grid_sample, float32 under CPU autocast, the widest input dtype under CUDA autocast.
# auto on CUDA: measured on one H200 (torch 2.11, Triton 3.6), float32 forward+backward at (16, 64, 64, 64),
# eager time / backend time: cuda 2.08x (zeros) / 2.46x (border), triton 1.07x / 0.75x. Triton loses in
# border mode and barely wins in zeros mode, so auto never takes it (named, it runs). bf16/fp16 have not
# been measured yet: the float32 order stands for them.
OP = Op("flow_warp", kernel="flow_warp_forward", check=_index_limits, autocast={"cpu": "float32", "cuda": "promote"},
        prefer={"cuda": ("cuda", "torch")})
OP.register("torch", flow_warp_reference)
OP.register("cpp", _fw_compiled)
OP.register("cuda", _fw_compiled)
OP.register("triton", _fw_triton)


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros", align_corners: bool = True,
              backend: str | None = None) -> torch.Tensor:
    """Bilinear warp of x by a per-pixel flow in pixels.

    x: Tensor[B, C, H, W], flow: Tensor[B, 2, H, W] -> Tensor[B, C, H, W]

    out[b, c, h, w] = bilinear(x[b, c], h + flow[b, 1, h, w], w + flow[b, 0, h, w]): flow channel 0 is the
    horizontal displacement (along W), channel 1 the vertical one (along H), the optical-flow and
    grid_sample order (note: deform_warp's offsets put dy first). padding_mode "zeros" reads zeros outside
    the map, "border" clamps the position into it. Equal to building the normalised grid for
    `grid_sample(x, grid, "bilinear", padding_mode, align_corners)`; since the flow is in pixels the sample
    position does not depend on align_corners, except that with align_corners=True a map of width (height)
    1 is always sampled at column (row) 0, as grid_sample does. Differentiable in x and flow; the CPU
    backward is deterministic, the CUDA and Triton input gradients are scattered with atomic adds (the
    cuda backend reports itself to torch.use_deterministic_algorithms). bf16/fp16 inputs are sampled at
    float32 positions and return their own dtype.
    Denormals (cpp): flushed to zero inside the CPU kernels, see docs/performance.md#denormals.
    backend: "torch" | "cpp" | "cuda" | "triton" | None ($VPFAST_BACKEND or "auto").
    """
    x, flow = OP.cast_inputs(x, flow)
    _check(x, flow, padding_mode, align_corners)
    return OP(x, flow, padding_mode, align_corners, backend=backend)
