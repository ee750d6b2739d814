"""Drop-in PhyDNet layers (OpenSTL's phydnet_modules), MODELS.md §13: PhyCell, PhyDNet's ConvLSTM, the
DCGAN-style encoder/decoder blocks, the encoder-predictor and K2M.

Unlike OpenSTL, the recurrent modules keep no state: `PhyCell.forward(x, H)` and `PhyDConvLSTM.forward(x, H, C)`
take and return their states (OpenSTL stores them as attributes and zeroes them when `first_timestep` is set).
PhyDNet's ConvLSTM cell runs the fused `vpfast.ops.convlstm` step on the fast backends (same arithmetic: its
gates i, f, o, g are the op's i, f, g, o after a permutation of the convolution's output channels).

The other fast-backend changes are about what backward keeps and how convolutions are batched, never about
the arithmetic (backend="torch" runs the reference verbatim):
- the gate convolutions over [x, h] (ConvLSTM, PhyCell) save x and h, not their concatenation (`cat_conv`);
- GroupNorm -> LeakyReLU (-> convolution) in the encoder and decoder saves only its input and recomputes the
  activation in backward (`_NormActConv`, `dcgan_chain`);
- `PhyDEncoderRNN.encode / recur / decode` split the step so that the model can encode the frames it knows in
  advance, and decode the outputs it does not feed back, in one batch (vpfast.models.PhyDNet);
- the ConvLSTM's weight gradient can be computed once per unrolled loop (vpfast.nn._weight_grad).
Measurements: docs/performance.md, "Baselines: MIM and PhyDNet".
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .._dispatch import resolve
from ..ops.convlstm import OP as _CONVLSTM, convlstm
from ._recurrent import (MergedWeightsMixin, autocast_dtype, cat_conv, check_input, check_state, fused_backend,
                         permute_blocks)
from ._weight_grad import defer_weight_grad, stash_conv


def _pair(k):
    return (k, k) if isinstance(k, int) else tuple(k)


class PhyCellCell(nn.Module):
    """One PhyCell layer (OpenSTL `PhyCell_Cell`).

    PhyCellCell(input_dim, F_hidden_dim, kernel_size, bias=1, backend=None)

    Parameters: F.conv1 [F_hidden_dim, input_dim, k, k] (+bias), F.bn1 GroupNorm(7, F_hidden_dim),
    F.conv2 [input_dim, F_hidden_dim, 1, 1] (+bias), convgate [input_dim, 2 input_dim, 3, 3] (+bias if `bias`).

    forward(x: Tensor[B, input_dim, H, W], hidden: Tensor[B, input_dim, H, W]) -> Tensor[B, input_dim, H, W]:
      K = σ(convgate([x, hidden])), H̃ = hidden + F(hidden), next = H̃ + K ⊙ (x − H̃)
    backend: "torch" runs the reference verbatim; otherwise convgate runs as `cat_conv`, which saves x and
      hidden (alive anyway) for backward instead of their [B, 2 input_dim, H, W] concatenation, and F's
      GroupNorm -> conv2 as `_NormActConv` (slope 1: no activation; the normalised map is recomputed in backward,
      not saved). Deferring convgate's and F.conv1's weight gradients (vpfast.nn._weight_grad) was measured
      too: within this machine's noise in time, +1.9 MiB of peak memory in PhyDNet's step; not done.
    """

    def __init__(self, input_dim: int, F_hidden_dim: int, kernel_size, bias=1, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.input_dim = input_dim
        self.F_hidden_dim = F_hidden_dim
        self.kernel_size = _pair(kernel_size)
        pad = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        self.F = nn.Sequential()
        self.F.add_module("conv1", nn.Conv2d(input_dim, F_hidden_dim, self.kernel_size, padding=pad))
        self.F.add_module("bn1", nn.GroupNorm(7, F_hidden_dim))
        self.F.add_module("conv2", nn.Conv2d(F_hidden_dim, input_dim, 1))
        self.convgate = nn.Conv2d(2 * input_dim, input_dim, 3, padding=1, bias=bool(bias))

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_dim, self.convgate.weight)
        check_state("hidden", hidden, "x", x, tuple(x.shape))
        if resolve(self.backend) == "torch" or autocast_dtype(x) is not None:
            k = torch.sigmoid(self.convgate(torch.cat([x, hidden], dim=1)))
            tilde = hidden + self.F(hidden)
        else:
            g, gn, c2 = self.convgate, self.F.bn1, self.F.conv2
            k = torch.sigmoid(cat_conv(x, hidden, g.weight, g.stride, g.padding, g.bias))
            tilde = hidden + _NormActConv.apply(self.F.conv1(hidden), gn.weight, gn.bias, c2.weight, c2.bias,
                                                gn.num_groups, gn.eps, 1.0, _conv_args(c2))
        return tilde + k * (x - tilde)


class PhyCell(nn.Module):
    """Stack of PhyCell layers (OpenSTL `PhyCell`), stateless.

    PhyCell(input_shape, input_dim, F_hidden_dims, n_layers, kernel_size, device=None, backend=None)   (device
    is ignored: states are created where the input lives)

    forward(x: Tensor[B, input_dim, H, W], H: list of n_layers Tensor[B, input_dim, H, W]) -> new H (list)
    """

    def __init__(self, input_shape, input_dim: int, F_hidden_dims: Sequence[int], n_layers: int, kernel_size,
                 device=None, backend: Optional[str] = None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.input_dim = input_dim
        self.n_layers = n_layers
        self.cell_list = nn.ModuleList(PhyCellCell(input_dim, F_hidden_dims[i], kernel_size, backend=backend)
                                       for i in range(n_layers))

    def init_hidden(self, x: torch.Tensor) -> list:
        return [x.new_zeros(x.shape[0], self.input_dim, *x.shape[2:]) for _ in range(self.n_layers)]

    def forward(self, x: torch.Tensor, H: Optional[list] = None) -> list:
        H = self.init_hidden(x) if H is None else list(H)
        for j, cell in enumerate(self.cell_list):
            H[j] = cell(x if j == 0 else H[j - 1], H[j])
        return H


class PhyDConvLSTMCell(MergedWeightsMixin, nn.Module):
    """PhyDNet's ConvLSTM cell (OpenSTL `PhyD_ConvLSTM_Cell`).

    PhyDConvLSTMCell(input_shape, input_dim, hidden_dim, kernel_size, bias=1, backend=None)

    Parameters: conv [4 hidden_dim, input_dim + hidden_dim, k, k] (+bias) over [x, h], gates split i, f, o, g.

    forward(x: Tensor[B, input_dim, H, W], hidden=(h, c): Tensor[B, hidden_dim, H, W] each) -> (h, c):
      c = σ(f) ⊙ c + σ(i) ⊙ tanh(g), h = σ(o) ⊙ tanh(c)   (no forget bias)
    backend: "torch" runs the reference verbatim; the fast backends run the fused convlstm step on the
      convolution with its output channels reordered to i, f, g, o (derived once per `with cell.unroll():`),
      computed by `cat_conv` (backward keeps x and h, alive anyway, rather than their concatenation: at
      PhyDNet's sizes 640 channel maps per step over the three layers, ~11% of a training step's peak).
    defer_weight_grad (attribute, default True): inside `with cell.unroll():` the fast path computes the
      convolution's weight gradient once for all steps (vpfast.nn._weight_grad), not per step.
    """

    def __init__(self, input_shape, input_dim: int, hidden_dim: int, kernel_size, bias=1,
                 backend: Optional[str] = None):
        super().__init__()
        self.height, self.width = tuple(input_shape)
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.kernel_size = _pair(kernel_size)
        self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        self.backend = backend
        self.defer_weight_grad = True
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, self.kernel_size, padding=self.padding,
                              bias=bool(bias))

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def _derive_merged_weights(self):
        C, b = self.hidden_dim, self.conv.bias
        w = permute_blocks(self.conv.weight, (0, 1, 3, 2), C)  # i, f, o, g -> i, f, g, o
        b = permute_blocks(b, (0, 1, 3, 2), C) if b is not None else None
        return defer_weight_grad(w, b) if self.defer_weight_grad else (w, b)

    def forward(self, x: torch.Tensor, hidden):
        h, c = hidden
        check_input(x, self.input_dim, self.conv.weight)
        shape = (x.shape[0], self.hidden_dim) + tuple(x.shape[2:])
        check_state("h", h, "x", x, shape)
        check_state("c", c, "x", x, shape)
        C = self.hidden_dim
        backend = fused_backend(_CONVLSTM, self.backend, x, [(x.shape[0], 4 * C) + shape[2:]], (c,))
        if backend == "torch":
            cc_i, cc_f, cc_o, cc_g = torch.split(self.conv(torch.cat([x, h], dim=1)), C, dim=1)
            c_new = torch.sigmoid(cc_f) * c + torch.sigmoid(cc_i) * torch.tanh(cc_g)
            return torch.sigmoid(cc_o) * torch.tanh(c_new), c_new
        w, b = self.merged_weights()
        gates = stash_conv(x, h, w, b, 1, self.padding)
        return convlstm(None, gates, c, 0.0, True, backend=self.backend)


class PhyDConvLSTM(nn.Module):
    """Stack of PhyDNet ConvLSTM cells (OpenSTL `PhyD_ConvLSTM`), stateless.

    PhyDConvLSTM(input_shape, input_dim, hidden_dims, n_layers, kernel_size, device=None, backend=None)

    forward(x, H, C) -> (H, C): lists of n_layers Tensor[B, hidden_dims[j], H, W]; None starts at zeros.
    """

    def __init__(self, input_shape, input_dim: int, hidden_dims: Sequence[int], n_layers: int, kernel_size,
                 device=None, backend: Optional[str] = None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.hidden_dims = list(hidden_dims)
        self.n_layers = n_layers
        self.cell_list = nn.ModuleList(
            PhyDConvLSTMCell(input_shape, input_dim if i == 0 else hidden_dims[i - 1], hidden_dims[i], kernel_size,
                             backend=backend) for i in range(n_layers))

    def init_hidden(self, x: torch.Tensor):
        z = [x.new_zeros(x.shape[0], d, *x.shape[2:]) for d in self.hidden_dims]
        return z, [t.clone() for t in z]

    def forward(self, x: torch.Tensor, H: Optional[list] = None, C: Optional[list] = None):
        if H is None or C is None:
            H, C = self.init_hidden(x)
        H, C = list(H), list(C)
        for j, cell in enumerate(self.cell_list):
            H[j], C[j] = cell(x if j == 0 else H[j - 1], (H[j], C[j]))
        return H, C


class _NormActConv(torch.autograd.Function):
    """conv(leaky_relu(group_norm(x))), or leaky_relu(group_norm(x)) alone (weight None), keeping only x for
    backward: the normalised, activated map is recomputed in backward from x by the same kernels, so it is
    bitwise the forward's.

    In a chain of DCGAN blocks autograd keeps two maps per block (the convolution's output, which GroupNorm
    saves, and the activation, which the next convolution saves); this keeps one. In PhyDNet's encoder and
    decoder (11 blocks per step) that is ~15% of a training step's saved memory, for the price of one GroupNorm
    and LeakyReLU forward per block in backward.
    conv: (stride, padding, transposed, output_padding) of a Conv2d or ConvTranspose2d, or None.
    """

    @staticmethod
    def _norm_act(x, gn_weight, gn_bias, groups, eps, slope):
        """(leaky_relu(group_norm(x)), mean, rstd), by the kernels F.group_norm and F.leaky_relu run."""
        N, C = x.shape[:2]
        z, mean, rstd = torch.ops.aten.native_group_norm(x, gn_weight, gn_bias, N, C, x[0, 0].numel(), groups, eps)
        return F.leaky_relu(z, slope, inplace=True), mean, rstd

    @staticmethod
    def forward(ctx, x, gn_weight, gn_bias, weight, bias, groups, eps, slope, conv):
        y = _NormActConv._norm_act(x, gn_weight, gn_bias, groups, eps, slope)[0]
        ctx.save_for_backward(x, gn_weight, gn_bias, weight)
        ctx.norm, ctx.conv, ctx.has_bias = (groups, eps, slope), conv, bias is not None
        if conv is None:
            return y
        stride, padding, transposed, output_padding = conv
        return torch.ops.aten.convolution(y, weight, bias, stride, padding, [1, 1], transposed, output_padding, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, gn_weight, gn_bias, weight = ctx.saved_tensors
        groups, eps, slope = ctx.norm
        need = ctx.needs_input_grad
        y, mean, rstd = _NormActConv._norm_act(x, gn_weight, gn_bias, groups, eps, slope)
        gy, gw, gb = grad, None, None
        if ctx.conv is not None:
            stride, padding, transposed, output_padding = ctx.conv
            out_channels = weight.shape[1] if transposed else weight.shape[0]
            gy, gw, gb = torch.ops.aten.convolution_backward(
                grad, y, weight, [out_channels] if ctx.has_bias else None, stride, padding, [1, 1], transposed,
                output_padding, 1, [any(need[:3]), need[3], ctx.has_bias and need[4]])
        gx = gnw = gnb = None
        if any(need[:3]):  # the leaky ReLU's gradient from its output (slope > 0): one map fewer alive
            gz = torch.ops.aten.leaky_relu_backward(gy, y, slope, True)
            del gy, y
            N, C = x.shape[:2]
            gx, gnw, gnb = torch.ops.aten.native_group_norm_backward(
                gz, x, mean, rstd, gn_weight, N, C, x[0, 0].numel(), groups, list(need[:3]))
        return gx, gnw, gnb, gw, gb, None, None, None, None


def _conv_args(conv) -> tuple:
    transposed = isinstance(conv, nn.ConvTranspose2d)
    return conv.stride, conv.padding, transposed, conv.output_padding if transposed else (0, 0)


def dcgan_chain(blocks: Sequence[nn.Module], x: torch.Tensor, tail: Optional[nn.Module] = None,
                pre: Optional[nn.Module] = None, raw: bool = False) -> torch.Tensor:
    """x through the DCGAN blocks (DCGANConv / DCGANUpconv: conv -> GroupNorm -> LeakyReLU), then through the
    bare convolution `tail` if given: the same arithmetic as calling them in turn, with every GroupNorm ->
    LeakyReLU (-> next convolution) run by _NormActConv, which saves only its input.
    pre: a block whose GroupNorm -> LeakyReLU x has yet to go through (x is that block's convolution output);
    raw: stop before the last block's GroupNorm (return its convolution output), for a chain continued by
      several others with pre= (each recomputes the activation; it is saved by none).
    Under autocast, or with GroupNorms without affine parameters, the modules are called as they are."""
    steps = [("norm", pre)] if pre is not None else []
    for b in blocks:
        steps += [("conv", b.main[0]), ("norm", b)]
    steps += [("conv", tail)] if tail is not None else []
    if raw:
        steps.pop()
    if autocast_dtype(x) is not None or any(b.main[1].weight is None for kind, b in steps if kind == "norm"):
        for kind, m in steps:
            x = m(x) if kind == "conv" else m.main[2](m.main[1](x))
        return x
    i = 0
    while i < len(steps):
        kind, m = steps[i]
        if kind == "conv":
            x, i = m(x), i + 1
            continue
        gn, act = m.main[1], m.main[2]
        conv = steps[i + 1][1] if i + 1 < len(steps) else None  # a norm is followed by a conv or nothing
        x = _NormActConv.apply(x, gn.weight, gn.bias, None if conv is None else conv.weight,
                               None if conv is None else conv.bias, gn.num_groups, gn.eps, act.negative_slope,
                               None if conv is None else _conv_args(conv))
        i += 2
    return x


class DCGANConv(nn.Module):
    """3x3 conv (pad 1, bias) -> GroupNorm(16) -> LeakyReLU(0.2) (OpenSTL `dcgan_conv`, keys `main.0/1`)."""

    def __init__(self, nin: int, nout: int, stride: int):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(nin, nout, 3, stride, 1), nn.GroupNorm(16, nout),
                                  nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x):
        return self.main(x)


class DCGANUpconv(nn.Module):
    """3x3 transposed conv (pad 1, output_padding 1 when stride 2) -> GroupNorm(16) -> LeakyReLU(0.2)
    (OpenSTL `dcgan_upconv`)."""

    def __init__(self, nin: int, nout: int, stride: int):
        super().__init__()
        self.main = nn.Sequential(nn.ConvTranspose2d(nin, nout, 3, stride, 1, output_padding=1 if stride == 2 else 0),
                                  nn.GroupNorm(16, nout), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x):
        return self.main(x)


class EncoderE(nn.Module):
    """nc -> 32 (stride 2) -> 32 -> 64 (stride patch_size / 2) (OpenSTL `encoder_E`)."""

    def __init__(self, nc: int = 1, nf: int = 32, patch_size: int = 4):
        super().__init__()
        self.c1 = DCGANConv(nc, nf, 2)
        self.c2 = DCGANConv(nf, nf, 1)
        self.c3 = DCGANConv(nf, 2 * nf, patch_size // 2)

    def forward(self, x):
        return self.c3(self.c2(self.c1(x)))


class DecoderD(nn.Module):
    """64 -> 32 (stride 2) -> 32 -> nc (bare transposed conv, stride patch_size / 2) (OpenSTL `decoder_D`)."""

    def __init__(self, nc: int = 1, nf: int = 32, patch_size: int = 4):
        super().__init__()
        s = patch_size // 2
        self.upc1 = DCGANUpconv(2 * nf, nf, 2)
        self.upc2 = DCGANUpconv(nf, nf, 1)
        self.upc3 = nn.ConvTranspose2d(nf, nc, 3, s, 1, output_padding=1 if s == 2 else 0)

    def forward(self, x):
        return self.upc3(self.upc2(self.upc1(x)))


class EncoderSpecific(nn.Module):
    """Two 64 -> 64 conv blocks (OpenSTL `encoder_specific`)."""

    def __init__(self, nc: int = 64, nf: int = 64):
        super().__init__()
        self.c1 = DCGANConv(nc, nf, 1)
        self.c2 = DCGANConv(nf, nf, 1)

    def forward(self, x):
        return self.c2(self.c1(x))


class DecoderSpecific(nn.Module):
    """Two 64 -> 64 transposed conv blocks (OpenSTL `decoder_specific`)."""

    def __init__(self, nc: int = 64, nf: int = 64):
        super().__init__()
        self.upc1 = DCGANUpconv(nf, nf, 1)
        self.upc2 = DCGANUpconv(nf, nc, 1)

    def forward(self, x):
        return self.upc2(self.upc1(x))


class PhyDEncoderRNN(nn.Module):
    """PhyDNet's encoder-predictor-decoder (OpenSTL `PhyD_EncoderRNN`), stateless.

    PhyDEncoderRNN(phycell, convcell, in_channel=1, patch_size=4, backend=None); the two recurrent modules are
    registered here and (by the model) again at the top level, as in OpenSTL.

    forward(frame: Tensor[B, C, H, W], state=None) -> (next frame in (0, 1): Tensor[B, C, H, W], state),
      e = encoder_E(frame), H = phycell(encoder_Ep(e)), h = convcell(encoder_Er(e)),
      out = σ(decoder_D(decoder_Dp(H[-1]) + decoder_Dr(h[-1]))); state = (H, h list, c list), None = zeros.
    OpenSTL also decodes each branch alone for visualisation; those outputs feed nothing and are skipped.
    backend: "torch" calls the encoder and decoder blocks as they are; otherwise they run as `dcgan_chain`s
      (same arithmetic, one saved map per block instead of two).
    """

    def __init__(self, phycell: PhyCell, convcell: PhyDConvLSTM, in_channel: int = 1, patch_size: int = 4,
                 backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.encoder_E = EncoderE(nc=in_channel, patch_size=patch_size)
        self.encoder_Ep = EncoderSpecific()
        self.encoder_Er = EncoderSpecific()
        self.decoder_Dp = DecoderSpecific()
        self.decoder_Dr = DecoderSpecific()
        self.decoder_D = DecoderD(nc=in_channel, patch_size=patch_size)
        self.phycell = phycell
        self.convcell = convcell

    def forward(self, frame: torch.Tensor, state=None):
        return self.decode(*self.recur(*self.encode(frame), state))

    # The step in its three parts. Only `recur` carries state, so a caller that knows several steps' frames in
    # advance (the observed frames; the targets under teacher forcing) may encode them in one batch, and decode
    # the outputs that are not fed back in one batch (vpfast.models.PhyDNet does, on the fast backends).
    def encode(self, frame: torch.Tensor):
        """frame: Tensor[N, C, H, W] -> (PhyCell input, ConvLSTM input): Tensor[N, 64, H/p, W/p] each."""
        if resolve(self.backend) == "torch":
            e = self.encoder_E(frame)
            return self.encoder_Ep(e), self.encoder_Er(e)
        E = self.encoder_E
        e = dcgan_chain([E.c1, E.c2, E.c3], frame, raw=True)  # encoder_E's output, before its last norm
        return (dcgan_chain([self.encoder_Ep.c1, self.encoder_Ep.c2], e, pre=E.c3),
                dcgan_chain([self.encoder_Er.c1, self.encoder_Er.c2], e, pre=E.c3))

    def recur(self, e_p: torch.Tensor, e_r: torch.Tensor, state=None):
        """One recurrent step -> (PhyCell's last layer, ConvLSTM's last hidden, the new state)."""
        H_p, H_c, C_c = state if state is not None else (None, None, None)
        H_p = self.phycell(e_p, H_p)
        H_c, C_c = self.convcell(e_r, H_c, C_c)
        return H_p[-1], H_c[-1], (H_p, H_c, C_c)

    def decode(self, h_p: torch.Tensor, h_c: torch.Tensor, state=None):
        """-> (σ(decoder_D(decoder_Dp(h_p) + decoder_Dr(h_c))): Tensor[N, C, H, W], state passed through)."""
        if resolve(self.backend) == "torch":
            return torch.sigmoid(self.decoder_D(self.decoder_Dp(h_p) + self.decoder_Dr(h_c))), state
        Dp, Dr, D = self.decoder_Dp, self.decoder_Dr, self.decoder_D
        s = dcgan_chain([Dp.upc1, Dp.upc2], h_p) + dcgan_chain([Dr.upc1, Dr.upc2], h_c)
        return torch.sigmoid(dcgan_chain([D.upc1, D.upc2], s, tail=D.upc3)), state


def moment_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """M[i, j] = (j - (n-1)//2)^i / i!  (n x n): K2M(k) = M k Mᵀ gives the moments of a kernel."""
    j = torch.arange(n, dtype=torch.float64) - (n - 1) // 2
    rows = [j ** i / math.factorial(i) for i in range(n)]
    return torch.stack(rows).to(dtype)


class K2M(nn.Module):
    """Kernel to moment matrix (OpenSTL `K2M`): K2M(shape=[7, 7]).

    Buffers (float64, persistent, as OpenSTL saves them): _M0, _invM0, _M1, _invM1 (the inverses are unused).
    forward(k: Tensor[..., s0, s1]) -> Tensor[..., s0, s1] in float64: M0 k M1ᵀ. The matrices are rebuilt in
    float64 for every call rather than read from the buffers, which `model.to(torch.float32)` would round.
    """

    def __init__(self, shape=(7, 7)):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ValueError(f"K2M supports 2-D kernels, got shape {shape!r}")
        for j, s in enumerate(self.shape):
            M = moment_matrix(s)
            self.register_buffer(f"_M{j}", M)
            self.register_buffer(f"_invM{j}", torch.linalg.inv(M))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        if tuple(k.shape[-2:]) != self.shape:
            raise ValueError(f"k must end in {self.shape}, got shape {tuple(k.shape)}")
        k = k.double()
        m0 = moment_matrix(self.shape[0]).to(k.device)
        m1 = moment_matrix(self.shape[1]).to(k.device)
        return m0 @ k @ m1.transpose(0, 1)
