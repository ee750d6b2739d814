"""Weight gradients of a recurrent convolution computed once per unrolled loop instead of once per step.

A convolution applied at every step of a T-step loop gets T weight-gradient GEMMs of depth B*H*W each in
backward. At small batches that depth is short and the GEMMs run far below the machine's rate (PhyDNet at batch
1: 256); one GEMM over all steps (depth T*B*H*W) is the same sum, computed faster. Measured here (2-core
AVX-512 CPU, 1 thread, 19 steps of PhyDNet's 256->512 3x3 ConvLSTM convolution at 16x16, batch 1): per-step
backward 282 ms, per-step input gradients + one batched weight gradient 231 ms.

How: `defer_weight_grad(weight, bias)` (once per loop) returns aliases of the parameters whose backward node
owns a stash. `stash_conv(a, b, w, bias, ...)` (every step) computes conv2d(cat([a, b])) and, in backward, only
the input gradient, stashing (a, b, grad_output) instead of computing the weight gradient. The alias's node runs
after every step that uses it (autograd runs a node once all its consumers are done) and computes the weight
and bias gradients of all stashed steps with one convolution_backward. Memory: each step's a and b are kept
until then (instead of being freed after that step's backward) and the output gradients are stashed. That
happens during backward, while the forward's saved tensors are being freed, so whether it raises a step's
peak depends on the sizes: in PhyDNet (small preset, batch 1) deferring two of the three ConvLSTM layers left
the peak where it was, deferring all three moved it late into backward and raised it 81.5 -> 86.9 MiB; in MIM
(batch 8, C=16, 16x16) it does not pay: the backward of 19 steps of a 32->64 3x3 convolution took 29.2 ms step
by step and 40.9 ms as per-step input gradients plus one batched weight gradient (16->64: 16.4 vs 29.4 ms; 6 Dec
2026, 2-core CPU, 1 thread; the concatenations included, as here), and the stash would cost ~50 MB, so MIM does
not use it. Measure before using it elsewhere.

Not used under autocast (the casts sit between the alias and the convolution: `stash_conv` then runs the
plain `cat_conv`) nor without grad. Backward is not differentiable twice (create_graph=True raises).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._recurrent import _pair, autocast_dtype, cat_conv


class _Collect(torch.autograd.Function):
    """weight (, bias) -> aliases; backward: the incoming gradients plus the stashed steps' weight gradients."""

    @staticmethod
    def forward(ctx, weight, *bias):
        ctx.set_materialize_grads(False)
        ctx.stash = []
        ctx.conv = None  # (stride, padding), set by the first stash_conv
        ctx.save_for_backward(weight)
        return (weight.view_as(weight),) + tuple(t.view_as(t) for t in bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        entries, ctx.stash = ctx.stash, []  # cleared: a retained graph's next backward stashes afresh
        if not entries:
            return grads
        (weight,) = ctx.saved_tensors
        stride, padding = ctx.conv
        inp = torch.cat([torch.cat(parts, 1) if len(parts) > 1 else parts[0] for parts, _ in entries], 0)
        grad = torch.cat([g for _, g in entries], 0)
        has_bias = len(grads) > 1
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad, inp, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding), [1, 1], False,
            [0, 0], 1, [False, ctx.needs_input_grad[0], has_bias and ctx.needs_input_grad[1]])
        out = [gw, gb][: len(grads)]
        return tuple(o if g is None else (g if o is None else o + g) for o, g in zip(out, grads))


class _StashConv(torch.autograd.Function):
    """conv2d(cat(parts), weight, bias) whose backward computes the input gradients and stashes the rest."""

    @staticmethod
    def forward(ctx, collect, weight, bias, stride, padding, *parts):
        ctx.save_for_backward(weight, *parts)
        ctx.collect, ctx.stride, ctx.padding = collect, stride, padding
        x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, *parts = ctx.saved_tensors
        need_in = any(ctx.needs_input_grad[5:])
        grads = [None] * len(parts)
        if need_in:
            x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            gi = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
            grads = list(gi.split([p.shape[1] for p in parts], 1))
        if torch._C._will_engine_execute_node(ctx.collect):  # someone wants the weight gradient
            ctx.collect.stash.append((tuple(parts), grad))
        return (None, None, None, None, None, *grads)


def defer_weight_grad(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(weight, bias) aliases for a loop's `stash_conv` calls (see the module docstring); the parameters
    themselves when no gradient is being recorded."""
    if not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))):
        return weight, bias
    out = _Collect.apply(weight, *(() if bias is None else (bias,)))
    return (out[0], out[1] if bias is not None else None)


def stash_conv(a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, stride,
               padding) -> torch.Tensor:
    """conv2d(cat([a, b], 1) (or a when b is None), weight, bias) -> Tensor[B, Cout, Ho, Wo]; with weight (and
    bias) from `defer_weight_grad`, their gradient is left to the loop's one batched computation. Otherwise (and
    under autocast) the plain convolution (`cat_conv` for two inputs: the concatenation is not saved)."""
    node = weight.grad_fn
    stride, padding = _pair(stride), _pair(padding)
    if getattr(node, "stash", None) is None or autocast_dtype(a) is not None or \
            (bias is not None and bias.grad_fn is not node):
        if b is None:
            return torch.nn.functional.conv2d(a, weight, bias, stride, padding)
        return cat_conv(a, b, weight, stride, padding, bias)
    if node.conv is None:
        node.conv = (stride, padding)
    elif node.conv != (stride, padding):
        raise ValueError("stash_conv: one deferred weight used with two different strides/paddings")
    return _StashConv.apply(node, weight, bias, stride, padding, *((a,) if b is None else (a, b)))
