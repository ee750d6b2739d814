"""`vpfast.accelerate(module)`: swap the reference projects' layers inside any model for vpfast's fast ones.

For people who keep their own training code (OpenSTL, thuml's MotionRNN, or their own models): the module
tree is walked and every submodule that is recognised is replaced, in place, by the vpfast layer with the same
state_dict, sharing the *same Parameter and buffer objects* (so an optimizer built before the call keeps
working and checkpoints keep their keys). Recognised:

- any depthwise `nn.Conv2d` (groups == in_channels == out_channels, odd kernel, zero padding)
  -> `vpfast.nn.DepthwiseConv2d`;
- by class name and structure, the reference projects' modules: `SpatioTemporalLSTMCell` (OpenSTL PredRNN;
  thuml's Motion-Highway variant, recognised by its 5-argument forward; also layer 0 of OpenSTL's MIM),
  `SpatioTemporalLSTMCellv2` (PredRNN-v2), `ConvLSTMCell` (OpenSTL), `PhyD_ConvLSTM_Cell` (OpenSTL's
  PhyDNet), `Eidetic3DLSTMCell` (OpenSTL's E3D-LSTM, layer_norm off: the recall attention then runs blockwise
  with scaled_dot_product_attention), `CausalLSTMCell` (OpenSTL's PredRNN++, with or without its gate
  LayerNorms; run with the three fused `causal_lstm` stages), `GHU` (OpenSTL's PredRNN++) and `MIMN` (OpenSTL's
  MIM; its `MIMBlock` keeps state on the module and is left alone), both run with the fused `stlstm_output`,
  `MotionGRU` and `Warp` (thuml), `SpatialAttention`, `AttentionModule`, `TemporalAttention`,
  `TemporalAttentionModule` (OpenSTL gSTA / TAU), and SimVP's
  `BasicConv2d` (conv -> GroupNorm(2) -> SiLU, run with the fused `group_norm_silu`; layouts unchanged).

Everything else is left alone; the returned report lists what was swapped and which candidates were left
alone and why.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from . import nn as vnn
from ._dispatch import require_backend
from .models.simvp import BasicConv2d


@dataclass
class AccelerateReport:
    swapped: list = field(default_factory=list)  # (path, reference class, vpfast class)
    left: list = field(default_factory=list)  # (path, class, reason)

    def __str__(self) -> str:
        lines = [f"vpfast.accelerate: swapped {len(self.swapped)} module(s), left {len(self.left)} candidate(s)"]
        counts: dict = {}
        for _, old, new in self.swapped:
            counts[(old, new)] = counts.get((old, new), 0) + 1
        for (old, new), n in counts.items():
            lines.append(f"  {n} x {old} -> vpfast.nn.{new}")
        for path, cls, why in self.left:
            lines.append(f"  left {path or '<root>'} ({cls}): {why}")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.swapped)


class _Skip(Exception):
    pass


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise _Skip(why)


def _conv(m, name) -> nn.Conv2d:
    sub = getattr(m, name, None)
    if isinstance(sub, nn.Sequential):
        sub = sub[0] if len(sub) else None
    _need(isinstance(sub, nn.Conv2d), f"no convolution {name!r}")
    return sub


def _hw(m):
    seq = getattr(m, "conv_x", None)
    if isinstance(seq, nn.Sequential) and len(seq) > 1 and isinstance(seq[1], nn.LayerNorm):
        _, H, W = seq[1].normalized_shape
        return True, H, W
    return False, 1, 1


def _forward_arity(m) -> int:
    return len(inspect.signature(type(m).forward).parameters) - 1


def _stlstm(m, backend, variant=None):
    cx = _conv(m, "conv_x")
    for n in ("conv_h", "conv_m", "conv_o", "conv_last"):
        _conv(m, n)
    _need(getattr(m, "_forget_bias", 1.0) == 1.0, "forget bias is not the reference's constant 1.0")
    C = m.conv_last.out_channels
    _need(cx.out_channels == 7 * C, "conv_x does not produce the 7 ST-LSTM gates")
    if variant is None:
        variant = "highway" if _forward_arity(m) == 5 else "predrnn"
    ln, H, W = _hw(m)
    return vnn.SpatioTemporalLSTMCell(cx.in_channels, C, H, W, cx.kernel_size[0], cx.stride[0], ln,
                                      variant=variant, backend=backend)


def _stlstm_v2(m, backend):
    return _stlstm(m, backend, "predrnnv2")


def _convlstm(m, backend):
    cx = _conv(m, "conv_x")
    _conv(m, "conv_h")
    C = cx.out_channels // 4
    _need(cx.out_channels == 4 * C, "conv_x does not produce the 4 LSTM gates")
    ln, H, W = _hw(m)
    # OpenSTL's current ConvLSTM cell (h = o * tanh(c)); releases <= v0.3.0 used h = o * g and cannot be
    # told apart by structure: pass the model through vpfast.models.ConvLSTM(tanh_c=False) for those.
    return vnn.ConvLSTMCell(cx.in_channels, C, H, W, cx.kernel_size[0], cx.stride[0], ln, backend=backend)


def _phyd_convlstm(m, backend):
    conv = _conv(m, "conv")
    C = getattr(m, "hidden_dim", conv.out_channels // 4)
    _need(conv.out_channels == 4 * C and conv.in_channels > C, "conv does not produce the 4 LSTM gates over [x, h]")
    k = conv.kernel_size
    _need(conv.padding == (k[0] // 2, k[1] // 2) and conv.stride == (1, 1) and conv.dilation == (1, 1)
          and conv.groups == 1 and conv.padding_mode == "zeros", "convolution options other than the reference's")
    shape = (getattr(m, "height", 1), getattr(m, "width", 1))
    return vnn.PhyDConvLSTMCell(shape, conv.in_channels - C, C, k, bias=conv.bias is not None, backend=backend)


def _plain_convs(*convs):
    """(k, stride) of k x k convolutions without bias, zero 'same' padding, one square stride (the reference's
    conv_block); anything else is left alone."""
    k, stride = convs[0].kernel_size[0], convs[0].stride
    for conv in convs:
        _need(conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and conv.stride == stride
              and stride[0] == stride[1] and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
              and conv.padding_mode == "zeros", "convolution options other than the reference's")
    return k, stride[0]


def _ghu(m, backend):
    # OpenSTL's PredRNN++ GHU: vpfast's runs the pointwise step with the fused stlstm_output
    cz, cx = _conv(m, "z_concat"), _conv(m, "x_concat")
    _need(isinstance(m.z_concat, nn.Sequential), "z_concat is not the reference's nn.Sequential")
    C = cz.in_channels
    _need(cz.out_channels == cx.out_channels == 2 * C, "z_concat/x_concat do not produce [p, u] (2C channels)")
    k, stride = _plain_convs(cz, cx)
    norm = m.z_concat[1] if len(m.z_concat) > 1 else None
    _need(norm is None or isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 3,
          "z_concat is not conv -> LayerNorm")
    H, W = norm.normalized_shape[1:] if norm is not None else (1, 1)
    # OpenSTL's layer_norm GHU declares LayerNorm([C, H, W]) on 2C channels: _share then reports the shapes
    return vnn.GHU(cx.in_channels, C, H, W, k, stride, norm is not None, initializer=0, backend=backend)


def _causal_lstm(m, backend):
    # OpenSTL's PredRNN++ CausalLSTMCell (MODELS.md §10): same keys; vpfast's runs the pointwise work with the
    # three fused causal_lstm stages
    names = ("conv_x", "conv_h", "conv_c", "conv_m", "conv_o", "conv_c2m", "conv_om")
    seqs = [getattr(m, n, None) for n in names]
    _need(all(isinstance(s, nn.Sequential) and len(s) in (1, 2) for s in seqs),
          "conv_x/h/c/m/o/c2m/om are not the reference's nn.Sequential(conv[, LayerNorm])")
    convs = [_conv(m, n) for n in names]
    last = getattr(m, "conv_last", None)
    _need(isinstance(last, nn.Conv2d), "no 1x1 convolution 'conv_last'")
    cx, ch, cc, cm, co, ck, com = convs
    C = last.out_channels
    _need(_forward_arity(m) == 4, "forward does not take (x, h, c, m)")
    _need(getattr(m, "_forget_bias", 1.0) == 1.0, "forget bias is not the reference's constant 1.0")
    chans = [(cx, cx.in_channels, 7 * C), (ch, C, 4 * C), (cc, C, 3 * C), (cm, C, 3 * C), (co, 2 * C, C),
             (ck, C, 4 * C), (com, C, C)]
    _need(all(conv.in_channels == i and conv.out_channels == o for conv, i, o in chans),
          "channels are not the reference's (conv_x 7C, conv_h 4C, conv_c 3C, conv_m 3C, conv_o 2C->C, "
          "conv_c2m 4C, conv_om C)")
    k, stride = _plain_convs(*convs)
    _need(last.in_channels == 2 * C and last.kernel_size == (1, 1) and last.stride == (1, 1)
          and last.padding == (0, 0) and last.dilation == (1, 1) and last.groups == 1 and last.bias is None,
          "conv_last is not the reference's 1x1 convolution without bias over [c, m]")
    norms = [s[1] if len(s) > 1 else None for s in seqs]
    _need(all(n is None for n in norms) or all(isinstance(n, nn.LayerNorm) for n in norms),
          "some gate convolutions are followed by a LayerNorm and some not")
    ln, H, W = norms[0] is not None, 1, 1
    if ln:
        _need(len(norms[0].normalized_shape) == 3, "conv_x's LayerNorm is not over [7C, H, W]")
        H, W = norms[0].normalized_shape[1:]
        _need(all(tuple(n.normalized_shape) == (conv.out_channels, H, W) and n.elementwise_affine
                  for n, conv in zip(norms, convs)), "the LayerNorms are not the reference's over [channels, H, W]")
        _need(all(n.eps == 1e-5 for n in norms), "LayerNorm eps other than the reference's")
    return vnn.CausalLSTMCell(cx.in_channels, C, H, W, k, stride, ln, backend=backend)


def _mimn(m, backend):
    # OpenSTL's MIM-N (peephole LSTM): vpfast's runs its output gate with the fused stlstm_output
    ch, cx = _conv(m, "conv_h_concat"), _conv(m, "conv_x_concat")
    _need(all(isinstance(s, nn.Sequential) and len(s) == 1 for s in (m.conv_h_concat, m.conv_x_concat)),
          "not a single convolution per gate block (layer_norm=True adds LayerNorms)")
    C = ch.in_channels
    _need(ch.out_channels == cx.out_channels == 4 * C, "conv_h_concat/conv_x_concat do not produce the 4 gates")
    k, stride = _plain_convs(ch, cx)
    _need(getattr(m, "_forget_bias", 1.0) == 1.0, "forget bias is not the reference's constant 1.0")
    oc = getattr(m, "oc_weight", None)
    _need(isinstance(oc, nn.Parameter) and oc.dim() == 3, "no oc_weight peephole [C, H, W]")
    return vnn.MIMN(cx.in_channels, C, oc.shape[1], oc.shape[2], k, stride, False, backend=backend)


def _e3d_cell(m, backend):
    # OpenSTL's Eidetic3DLSTMCell: same keys; vpfast's runs the recall with scaled_dot_product_attention
    seq = getattr(m, "conv_x", None)
    _need(isinstance(seq, nn.Sequential) and len(seq) == 1, "conv_x has gate LayerNorms (layer_norm=True)")
    conv = getattr(seq[0], "conv3d", None)
    norm = getattr(m, "_norm_c_t", None)
    _need(isinstance(conv, nn.Conv3d) and isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 4,
          "not the reference's tf_Conv3d / _norm_c_t structure")
    _need(getattr(m, "_forget_bias", 1.0) == 1.0, "forget bias is not the reference's constant 1.0")
    k = conv.kernel_size
    _need(conv.padding == (0, k[1] // 2, k[2] // 2) and conv.dilation == (1, 1, 1) and conv.groups == 1
          and conv.padding_mode == "zeros" and len(set(conv.stride)) == 1, "convolution options other than the "
          "reference's")
    C, win, H, W = norm.normalized_shape
    return vnn.Eidetic3DLSTMCell(conv.in_channels, C, win, H, W, k, conv.stride[0], False, backend=backend)


def _warp(m, backend):
    conv = _conv(m, "conv")
    _conv(m, "warp_gate")
    k = getattr(m, "neighbour", conv.kernel_size[0])
    return vnn.Warp(conv.in_channels, conv.out_channels, k, backend=backend)


def _motion_gru(m, backend):
    up = _conv(m, "update")
    _conv(m, "reset")
    _conv(m, "output")
    _need(isinstance(getattr(m, "warp", None), nn.Module), "no warp submodule")
    mh = up.out_channels
    k = getattr(m.warp, "neighbour", 3)
    return vnn.MotionGRU(up.in_channels - mh, mh, k, backend=backend)


def _lka_kernel(unit):
    c0, cs = _conv(unit, "conv0"), _conv(unit, "conv_spatial")
    d = cs.dilation[0]
    _need(c0.kernel_size[0] == 2 * d - 1, "conv0/conv_spatial do not follow the large-kernel decomposition")
    return cs.kernel_size[0] * d, d


def _attention_unit(m, backend, temporal):
    ks, d = _lka_kernel(m)
    dim = m.conv0.in_channels
    if temporal:
        return vnn.TemporalAttentionModule(dim, ks, d, backend=backend)
    return vnn.AttentionModule(dim, ks, d, backend=backend)


def _attention(m, backend, temporal):
    p1 = _conv(m, "proj_1")
    unit = getattr(m, "spatial_gating_unit", None)
    _need(isinstance(unit, nn.Module), "no spatial_gating_unit")
    ks, d = _lka_kernel(unit)
    _need(d == 3, f"dilation {d} (the vpfast wrappers build the reference's dilation 3)")
    cls = vnn.TemporalAttention if temporal else vnn.SpatialAttention
    return cls(p1.in_channels, ks, getattr(m, "attn_shortcut", True), backend=backend)


def _basic_conv2d(m, backend):
    # OpenSTL's SimVP/TAU ConvSC body: conv (or conv to 4C + PixelShuffle(2)) -> GroupNorm -> SiLU
    seq = getattr(m, "conv", None)
    up = isinstance(seq, nn.Sequential)
    if up:
        _need(len(seq) == 2 and isinstance(seq[1], nn.PixelShuffle) and seq[1].upscale_factor == 2,
              "conv is not conv -> PixelShuffle(2)")
    conv = _conv(m, "conv")
    norm, act = getattr(m, "norm", None), getattr(m, "act", None)
    _need(isinstance(norm, nn.GroupNorm) and norm.num_groups == 2 and norm.affine, "norm is not GroupNorm(2, C)")
    _need(isinstance(act, nn.SiLU), "act is not SiLU")
    _need(conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" and conv.bias is not None
          and not isinstance(conv.padding, str), "convolution options other than the reference's")
    _need(conv.kernel_size[0] == conv.kernel_size[1] and conv.padding[0] == conv.padding[1]
          and conv.stride[0] == conv.stride[1], "non-square convolution")
    cout = conv.out_channels // 4 if up else conv.out_channels
    _need(norm.num_channels == cout, "GroupNorm's channels do not match the convolution")
    return BasicConv2d(conv.in_channels, cout, conv.kernel_size[0], conv.stride[0], conv.padding[0], up,
                       bool(getattr(m, "act_norm", True)), backend=backend)


def _depthwise(m: nn.Conv2d, backend):
    _need(m.padding_mode == "zeros", f"padding_mode {m.padding_mode!r}")
    _need(all(k % 2 == 1 for k in m.kernel_size), f"even kernel {m.kernel_size}")
    _need(not isinstance(m.padding, str), "string padding")
    return vnn.DepthwiseConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                               m.groups, m.bias is not None, backend=backend)


_BY_NAME: dict[str, Callable] = {
    "SpatioTemporalLSTMCell": _stlstm,
    "SpatioTemporalLSTMCellv2": _stlstm_v2,
    "SpatioTemporalLSTMCell_v2": _stlstm_v2,
    "ConvLSTMCell": _convlstm,
    "PhyD_ConvLSTM_Cell": _phyd_convlstm,
    "Eidetic3DLSTMCell": _e3d_cell,
    "CausalLSTMCell": _causal_lstm,
    "GHU": _ghu,
    "MIMN": _mimn,
    # OpenSTL's block keeps its MIM-S state S on the module between calls; vpfast's takes and returns S
    "MIMBlock": lambda m, b: _need(False, "stateful (S kept on the module): not a drop-in for vpfast.nn.MIMBlock; "
                                          "use vpfast.models.MIM"),
    "MotionGRU": _motion_gru,
    "Warp": _warp,
    "SpatialAttention": lambda m, b: _attention(m, b, False),
    "TemporalAttention": lambda m, b: _attention(m, b, True),
    "AttentionModule": lambda m, b: _attention_unit(m, b, False),
    "TemporalAttentionModule": lambda m, b: _attention_unit(m, b, True),
    "BasicConv2d": _basic_conv2d,
}

_VPFAST_TYPES = (vnn.SpatioTemporalLSTMCell, vnn.ConvLSTMCell, vnn.PhyDConvLSTMCell, vnn.Eidetic3DLSTMCell,
                 vnn.CausalLSTMCell, vnn.GHU,
                 vnn.MIMN, vnn.MIMBlock,
                 vnn.MotionGRU, vnn.Warp, vnn.SpatialAttention, vnn.TemporalAttention, vnn.AttentionModule,
                 vnn.TemporalAttentionModule, vnn.DepthwiseConv2d,
                 BasicConv2d)  # SimVP's conv -> GroupNorm -> SiLU (fused group_norm_silu unless "torch")


def _share(old: nn.Module, new: nn.Module) -> None:
    """Make `new` use exactly old's Parameter and buffer objects (same keys and shapes required)."""
    o_params, o_bufs = dict(old.named_parameters()), dict(old.named_buffers())
    n_params, n_bufs = dict(new.named_parameters()), dict(new.named_buffers())
    _need(o_params.keys() == n_params.keys(),
          f"parameter keys differ: {sorted(set(o_params) ^ set(n_params))[:6]}")
    _need(set(n_bufs) <= set(o_bufs), f"buffer keys differ: {sorted(set(n_bufs) - set(o_bufs))[:6]}")
    for k, p in o_params.items():
        _need(tuple(p.shape) == tuple(n_params[k].shape),
              f"{k}: shape {tuple(p.shape)} vs {tuple(n_params[k].shape)}")
    for k, p in o_params.items():
        owner, leaf = _owner(new, k)
        owner._parameters[leaf] = p
    for k in n_bufs:
        owner, leaf = _owner(new, k)
        owner._buffers[leaf] = o_bufs[k]
    new.train(old.training)


def _owner(root: nn.Module, key: str):
    *path, leaf = key.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def _candidate(m: nn.Module) -> Optional[Callable]:
    if isinstance(m, _VPFAST_TYPES):
        return None
    f = _BY_NAME.get(type(m).__name__)
    if f is not None:
        return f
    if type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
        return _depthwise
    return None


def accelerate(module: nn.Module, backend: Optional[str] = None) -> AccelerateReport:
    """Swap, in place, every recognised submodule of `module` for its vpfast layer (see the module docstring).

    backend: the backend the new layers use ("cpp", "cuda", "triton", "torch" or None = $VPFAST_BACKEND /
      auto). Layers that already are vpfast layers get this backend set.
    Returns an AccelerateReport (swapped: [(path, old class, new class)], left: [(path, class, reason)]).
    The module itself is replaced only through its parent, so pass the model, not a bare layer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if backend is not None:
        require_backend(backend)  # a valid name that can run here, or the reasons now rather than at forward
    report = AccelerateReport()

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, _VPFAST_TYPES):
                if backend is not None:
                    for sub in child.modules():
                        if hasattr(sub, "backend"):
                            sub.backend = backend
                continue
            make = _candidate(child)
            if make is not None:
                try:
                    new = make(child, backend)
                    _share(child, new)
                except _Skip as e:
                    report.left.append((path, type(child).__name__, str(e)))
                else:
                    setattr(parent, name, new)
                    report.swapped.append((path, type(child).__name__, type(new).__name__))
                    continue
            walk(child, path + ".")

    walk(module, "")
    return report
