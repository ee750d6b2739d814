"""Helpers shared by the recurrent cells (SpatioTemporalLSTMCell, ConvLSTMCell and the baselines' cells)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import resolve


def conv_block(cin: int, cout: int, k: int, stride: int, layer_norm: bool, height: int, width: int) -> nn.Sequential:
    """The reference's `Sequential(Conv2d(no bias)[, LayerNorm([cout, H, W])])` (keys `.0.weight`, `.1.*`)."""
    layers = [nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)]
    if layer_norm:
        layers.append(nn.LayerNorm([cout, height, width]))
    return nn.Sequential(*layers)


def autocast_dtype(t: torch.Tensor):
    """The dtype torch.autocast gives convolutions of tensors on t's device, or None outside autocast."""
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def check_state(name: str, t, ref_name: str, ref: torch.Tensor, shape: tuple) -> None:
    """A state (h, c, m, highway) for a step with input `ref`: a floating-point tensor of `shape` on ref's device;
    outside autocast also of ref's dtype. Under autocast the states may be of any floating dtype, as PyTorch's
    own layers take them there (a bf16 convolution output next to a float32 cell state)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [B, C, H, W], got shape {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype != ref.dtype and autocast_dtype(ref) is None:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_input(x, in_channel: int, weight: torch.Tensor) -> None:
    """x for a cell whose first convolution has `weight`: outside autocast x's dtype must be the weight's (as
    F.conv2d requires); under autocast any floating dtype (autocast casts both, as for nn.Conv2d)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, {in_channel}, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions [B, {in_channel}, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channel:
        raise ValueError(f"x must have in_channel={in_channel} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the cell's parameters are on {weight.device}")
    if x.dtype != weight.dtype and autocast_dtype(x) is None:
        raise TypeError(f"x has dtype {x.dtype} but the cell's parameters have {weight.dtype}")


def out_size(n: int, k: int, stride: int) -> int:
    return (n + 2 * (k // 2) - k) // stride + 1


def keep_cell_args(cell: nn.Module, in_channel: int, num_hidden: int, backend, **more) -> None:
    """Store the constructor arguments a cell's forward and repr read (in_channel, num_hidden, backend and
    `more`, e.g. filter_size=, stride=) and the reference's forget-gate bias of 1. Plain attributes only, so the
    cell's parameters, their registration order and its state_dict keys do not depend on this call."""
    cell.in_channel = in_channel
    cell.num_hidden = num_hidden
    cell.backend = backend
    cell._forget_bias = 1.0
    for name, value in more.items():
        setattr(cell, name, value)


def state_shape(cell: nn.Module, x: torch.Tensor) -> tuple:
    """(B, C, H', W') of the states a 2-D cell (num_hidden C, k x k convolutions of `stride` with k // 2
    padding) takes and returns for a step with input x: Tensor[B, in_channel, H, W]."""
    B, _, H, W = x.shape
    k, s = cell.filter_size, cell.stride
    return (B, cell.num_hidden, out_size(H, k, s), out_size(W, k, s))


# merge_convs=None merges up to this many elements of assembled weight (4 MiB in float32). Measured here with
# the `small` presets (C=16, k=3; interleaved training steps, merged vs separate): ConvLSTM 1.20x vs 1.12x,
# PredRNN 1.10-1.12x vs 1.06-1.11x, PredRNN-v2 1.21-1.31x vs 1.09-1.13x, MotionRNN 1.21-1.29x vs 1.15-1.18x
# over the reference, peak memory within 0.2 MiB. With large weights (C=128, k=5: 5.7M elements) the assembled
# weights and their gradients cost more memory than the merge saves (a 10-step unroll peaked 9% higher) and
# the speed difference was within this machine's noise.
MERGE_AUTO_MAX_ELEMENTS = 2**20


def choose_merge(merge_convs, layer_norm: bool, merged_elements: int) -> bool:
    """The merge_convs setting a cell runs with: True/False as given, None = merge when layer_norm is off and
    the assembled weights have at most MERGE_AUTO_MAX_ELEMENTS elements."""
    if merge_convs is None:
        return not layer_norm and merged_elements <= MERGE_AUTO_MAX_ELEMENTS
    if merge_convs and layer_norm:
        raise ValueError("merge_convs=True is not exact with layer_norm=True (LayerNorm acts on each "
                         "convolution's output separately)")
    return bool(merge_convs)


class MergedWeightsMixin:
    """Merged-convolution weights derived from the reference parameters on every use (never stored as
    parameters, so they cannot go stale after an optimizer step). Inside `with cell.unroll():` they are
    derived once and reused by every step of the loop, so a T-step unroll keeps one copy (and autograd
    splits the accumulated gradient back into the reference parameters once)."""

    _unroll_depth = 0
    _merged_cache = None
    _unroll_params = None

    @contextlib.contextmanager
    def unroll(self):
        """Context for a time loop: derive the merged weights once for all steps inside it.

        Not under torch.compile: the cache (tensors with a grad_fn kept on the module, checked against the
        parameters' _version counters) makes Dynamo break the graph at every step, and inside one graph
        AOTAutograd's common-subexpression pass merges the steps' identical weight derivations anyway."""
        if torch.compiler.is_compiling():
            yield self
            return
        if self._unroll_depth == 0:  # listed once per loop: walking the modules every step cost ~2% of a MIM step
            self._unroll_params = tuple(self.parameters())
        self._unroll_depth += 1
        try:
            yield self
        finally:
            self._unroll_depth -= 1
            if self._unroll_depth == 0:
                self._merged_cache = self._unroll_params = None

    def merged_weights(self):
        """The merged weights; under autocast already in autocast's dtype (cast once per unrolled loop, not once
        per step: autocast's own weight cache only covers leaf parameters, and these are derived tensors)."""
        params = self._unroll_params if self._unroll_depth > 0 else tuple(self.parameters())
        dt = autocast_dtype(params[0])
        if self._unroll_depth > 0:
            key = (torch.is_grad_enabled(), dt) + tuple(p._version for p in params)
            if self._merged_cache is not None and self._merged_cache[0] == key:
                return self._merged_cache[1]
            w = self._cast_merged(self._derive_merged_weights(), dt)
            self._merged_cache = (key, w)
            return w
        return self._cast_merged(self._derive_merged_weights(), dt)

    @staticmethod
    def _cast_merged(w, dt):
        if dt is None:
            return w
        return tuple(t if t is None else t.to(dt) for t in w) if isinstance(w, tuple) else w.to(dt)


def _policy_dtype(op, device: str, dtypes) -> torch.dtype:
    """The dtype `op`'s autocast policy casts floating inputs of these dtypes to (under autocast on device)."""
    policy = op.autocast.get(device, "promote")
    if policy == "lower":
        return torch.get_autocast_dtype(device)
    if policy == "float32":
        return torch.float32
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def fused_backend(op, backend, ref: torch.Tensor, conv_shapes, states) -> str:
    """The backend `op` would run a cell's pointwise step with; "torch" means: run the reference arithmetic
    verbatim.

    ref: the step's input x; conv_shapes: shapes of the gate convolutions' outputs the op takes; states: the
    state tensors it takes. The op is asked about what it will be handed: the convolutions' outputs are in x's
    dtype, or in autocast's dtype under autocast, and then the op's own autocast policy casts everything (its
    public function does so before dispatching). Stand-ins (one element, expanded) carry those shapes, dtypes and
    the device, so the choice is auto's own for the real call, without computing anything. Outside autocast x
    and the states themselves carry the dtypes and the device.
    """
    name = resolve(backend)
    if name == "torch":
        return name
    dev = ref.device.type
    conv_dt = autocast_dtype(ref)
    if conv_dt is None:  # the convolutions' outputs have x's dtype and device: x and the states tell it all
        return op.select(name, ref, *states)[0]
    # every policy gives all floating inputs one dtype
    one = torch.empty((), dtype=_policy_dtype(op, dev, [conv_dt] + [s.dtype for s in states]), device=ref.device)
    shapes = list(conv_shapes) + [tuple(s.shape) for s in states]
    return op.select(name, *(one.expand(shape) for shape in shapes))[0]


class _CatConv(torch.autograd.Function):
    """conv2d(cat(inputs, 1), weight, bias) that does not keep the concatenation for backward.

    Autograd would save the [B, sum C_i, H, W] concatenation of every step; the inputs (the step's input and
    states) are alive anyway, so backward rebuilds the concatenation instead (one copy, no extra saved memory).
    The input gradient is computed only over the channels from the first to the last input that needs one
    (the weight sliced to them): a cell's first input is often a data frame, which needs none.
    The inputs, weight (and bias) have one dtype (`cat_conv_many` casts them under autocast); stride and
    padding are pairs.
    """

    @staticmethod
    def forward(ctx, weight, bias, stride, padding, *inputs):
        ctx.save_for_backward(weight, *inputs)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        with torch.autocast(weight.device.type, enabled=False) if weight.device.type in ("cpu", "cuda") \
                else contextlib.nullcontext():
            return F.conv2d(torch.cat(inputs, 1), weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        weight, *inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[4:]
        need_bias = ctx.has_bias and ctx.needs_input_grad[1]
        grad = grad.to(weight.dtype)
        cat = torch.cat(inputs, 1)
        conv_args = (list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1)
        grads = [None] * len(inputs)
        lo = need.index(True) if any(need) else len(need)
        hi = len(need) - need[::-1].index(True) if any(need) else len(need)
        full = (lo, hi) == (0, len(inputs))
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad, cat, weight, [weight.shape[0]] if ctx.has_bias else None, *conv_args,
            [full, ctx.needs_input_grad[0], need_bias])
        if lo < hi and not full:  # a separate call over the channels that need a gradient
            sizes = [t.shape[1] for t in inputs]
            start, width = sum(sizes[:lo]), sum(sizes[lo:hi])
            gi = torch.ops.aten.convolution_backward(grad, cat.narrow(1, start, width),
                                                     weight.narrow(1, start, width).contiguous(), None,
                                                     *conv_args, [True, False, False])[0]
        if lo < hi:
            for j, g in zip(range(lo, hi), gi.split([t.shape[1] for t in inputs[lo:hi]], 1)):
                grads[j] = g if need[j] else None
        return (gw, gb if need_bias else None, None, None, *grads)


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def cat_conv_many(inputs, weight: torch.Tensor, stride, padding, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d over the channel concatenation of `inputs` (+ bias), saving the inputs, not the concatenation.

    inputs: a sequence of Tensor[B, C_i, H, W], weight: Tensor[Cout, sum C_i, kh, kw], bias: Tensor[Cout] or None;
    stride, padding: int or pair -> Tensor[B, Cout, Ho, Wo].
    Under autocast, as F.conv2d: inputs, weight and bias are cast to autocast's dtype (the casts are
    differentiable, so gradients reach float32 parameters and states in float32), and so is the result.
    """
    dt = autocast_dtype(weight)
    if dt is not None:
        inputs, weight = [t.to(dt) for t in inputs], weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return _CatConv.apply(weight, bias, _pair(stride), _pair(padding), *inputs)


def cat_conv(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, stride, padding,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d over the channel concatenation [a, b] (+ bias): `cat_conv_many((a, b), ...)`.

    a: Tensor[B, Ca, H, W], b: Tensor[B, Cb, H, W], weight: Tensor[Cout, Ca + Cb, kh, kw], bias: Tensor[Cout] or
    None; stride, padding: int or pair -> Tensor[B, Cout, Ho, Wo].
    """
    return cat_conv_many((a, b), weight, stride, padding, bias)


class _PermuteBlocks(torch.autograd.Function):
    """cat([t[j*size:(j+1)*size] for j in order]) along dim 0, whose backward is the inverse permutation (one
    cat). Autograd's own slice-then-cat would back-propagate each block through a zero-filled gradient of t's
    full size and add them up: for a ConvLSTM's weight (4.7 MB at 128 hidden channels) that was ~3% of a
    PhyDNet training step here."""

    @staticmethod
    def forward(ctx, t, order, size):
        ctx.order, ctx.size = order, size
        return torch.cat([t.narrow(0, j * size, size) for j in order], 0)

    @staticmethod
    def backward(ctx, grad):
        pieces = grad.split(ctx.size, 0)
        inverse = sorted(range(len(ctx.order)), key=ctx.order.__getitem__)
        return torch.cat([pieces[i] for i in inverse], 0), None, None


def permute_blocks(t: torch.Tensor, order, size: int) -> torch.Tensor:
    """t: Tensor[len(order) * size, ...] with its blocks of `size` rows reordered: block i of the result is block
    order[i] of t (order a permutation of range(len(order)))."""
    if sorted(order) != list(range(len(order))) or t.shape[0] != len(order) * size:
        raise ValueError(f"permute_blocks: order {order!r} must permute the {t.shape[0]} // {size} blocks of t")
    return _PermuteBlocks.apply(t, tuple(order), size)
