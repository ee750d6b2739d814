"""SimVP (translators IncepU and gSTA) and TAU, weight-compatible with OpenSTL (MODELS.md §5, §6).

state_dict layout: `enc.enc.{i}.conv.{conv,norm}.*` (ConvSC encoder), `dec.dec.{i}.conv.*` and `dec.readout.*`
(decoder), `hid.*` (translator: `hid.enc.{i}` / `hid.dec.{i}` Inception blocks for IncepU,
`hid.enc.{i}.block.*` (+ `.reduction.*` on the first and last) MetaBlocks for gSTA and TAU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _base
from ._layers import DepthwiseConv2d, SpatialAttention, TemporalAttention
from ..ops.ddr_loss import ddr_loss
from ..ops.group_norm_silu import group_norm_silu


def _sampling_pattern(N: int, reverse: bool = False) -> list[bool]:
    """Which ConvSC layers resample: [no, down, no, down, ...] (encoder), reversed for the decoder."""
    s = ([False, True] * (N // 2 + 1))[:N]
    return list(reversed(s)) if reverse else s


# ---- spatial encoder / decoder --------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """conv (or conv to 4C + PixelShuffle(2) when upsampling) -> GroupNorm(2) -> SiLU. Keys `conv.*`, `norm.*`.

    backend: "torch" runs nn.GroupNorm then nn.SiLU; any other (None = auto) runs GroupNorm + SiLU as one
      fused vpfast.ops.group_norm_silu with the same parameters.
    channels_last: with a fast backend, run the convolution so that its result is channels_last whatever the
      input's layout (`conv_channels_last`; SimVP sets it for its encoder and decoder). Off, the output keeps
      the input's layout (what `vpfast.accelerate` needs inside models that `.view()` the maps).
    """

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=0, upsampling=False, act_norm=True,
                 backend=None, channels_last=False):
        super().__init__()
        self.act_norm = act_norm
        self.backend = backend
        self.channels_last = bool(channels_last)
        if upsampling:
            self.conv = nn.Sequential(nn.Conv2d(cin, cout * 4, kernel_size, 1, padding), nn.PixelShuffle(2))
        else:
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding)
        self.norm = nn.GroupNorm(2, cout)
        self.act = nn.SiLU()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if self.backend == "torch":
            y = self.conv(x)
            return self.act(self.norm(y)) if self.act_norm else y
        y = self.conv_channels_last(x) if self.channels_last else self.conv(x)
        if not self.act_norm:
            return y
        n = self.norm
        return group_norm_silu(y, n.num_groups, n.weight, n.bias, n.eps, backend=self.backend)

    def conv_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """self.conv(x) with the result in channels_last whatever x's layout (the fast path's convolution).

        A one-channel input (the first layer's) has NCHW strides that PyTorch reads as NCHW, so it is viewed
        with channels_last strides (same memory). An upsampling layer's output channels are reordered from
        (c, i, j) to (i, j, c) in the weight, so that the pixel shuffle moves whole C-channel pixels instead of
        gathering every fourth channel (F.pixel_shuffle); the result equals conv -> PixelShuffle(2) exactly.
        """
        cl = torch.channels_last
        if x.shape[1] == 1 and x.is_contiguous() and not x.requires_grad:
            x = x.as_strided(x.shape, (x.shape[2] * x.shape[3], 1, x.shape[3], 1))
        conv = self.conv[0] if isinstance(self.conv, nn.Sequential) else self.conv
        w, b = conv.weight, conv.bias
        if conv is self.conv:
            return F.conv2d(x, w.contiguous(memory_format=cl), b, conv.stride, conv.padding)
        C = w.shape[0] // 4
        w = w.view(C, 4, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
        b = b.view(C, 4).t().reshape(-1)
        y = F.conv2d(x, w.contiguous(memory_format=cl), b, conv.stride, conv.padding)
        N, _, H, W = y.shape
        # [N, H, W, (i, j, c)] -> [N, H, i, W, j, c] = [N, 2H, 2W, C] in memory: channels_last [N, C, 2H, 2W]
        y = y.permute(0, 2, 3, 1).reshape(N, H, W, 2, 2, C).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)


class ConvSC(nn.Module):
    def __init__(self, cin, cout, kernel_size=3, downsampling=False, upsampling=False, act_norm=True,
                 backend=None):
        super().__init__()
        stride = 2 if downsampling else 1
        padding = (kernel_size - stride + 1) // 2
        self.conv = BasicConv2d(cin, cout, kernel_size, stride, padding, upsampling, act_norm, backend)

    def forward(self, x):
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, C_in, C_hid, N_S, kernel_size, backend=None):
        super().__init__()
        s = _sampling_pattern(N_S)
        self.enc = nn.Sequential(ConvSC(C_in, C_hid, kernel_size, downsampling=s[0], backend=backend),
                                 *[ConvSC(C_hid, C_hid, kernel_size, downsampling=d, backend=backend)
                                   for d in s[1:]])

    def forward(self, x):
        enc1 = self.enc[0](x)
        z = enc1
        for layer in self.enc[1:]:
            z = layer(z)
        return z, enc1


class Decoder(nn.Module):
    def __init__(self, C_hid, C_out, N_S, kernel_size, backend=None):
        super().__init__()
        s = _sampling_pattern(N_S, reverse=True)
        self.dec = nn.Sequential(*[ConvSC(C_hid, C_hid, kernel_size, upsampling=u, backend=backend) for u in s])
        self.readout = nn.Conv2d(C_hid, C_out, 1)

    def forward(self, hid, enc1):
        for layer in self.dec[:-1]:
            hid = layer(hid)
        return self.readout(self.dec[-1](hid + enc1))


# ---- IncepU translator ---------------------------------------------------------------------------------
class GroupConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, padding, groups, act_norm=True):
        super().__init__()
        self.act_norm = act_norm
        if cin % groups != 0:
            groups = 1
        self.conv = nn.Conv2d(cin, cout, kernel_size, 1, padding, groups=groups)
        self.norm = nn.GroupNorm(groups, cout)
        self.activate = nn.LeakyReLU(0.2)

    def forward(self, x):
        y = self.conv(x)
        return self.activate(self.norm(y)) if self.act_norm else y


class gInception_ST(nn.Module):  # noqa: N801 (the reference's name)
    def __init__(self, C_in, C_hid, C_out, incep_ker=(3, 5, 7, 11), groups=8):
        super().__init__()
        self.conv1 = nn.Conv2d(C_in, C_hid, 1)
        self.layers = nn.Sequential(*[GroupConv2d(C_hid, C_out, k, k // 2, groups) for k in incep_ker])

    def forward(self, x):
        x = self.conv1(x)
        y = self.layers[0](x)
        for layer in self.layers[1:]:
            y = y + layer(x)
        return y


class MidIncepNet(nn.Module):
    """U-Net of Inception blocks over [B, T*C, H, W]; decoder blocks take [z, skip] concatenated."""

    def __init__(self, channel_in, channel_hid, N2, incep_ker=(3, 5, 7, 11), groups=8):
        super().__init__()
        if N2 < 2:
            raise ValueError(f"N_T must be >= 2 for the IncepU translator, got {N2}")
        self.N2 = N2
        h = channel_hid
        self.enc = nn.Sequential(gInception_ST(channel_in, h // 2, h, incep_ker, groups),
                                 *[gInception_ST(h, h // 2, h, incep_ker, groups) for _ in range(1, N2)])
        self.dec = nn.Sequential(gInception_ST(h, h // 2, h, incep_ker, groups),
                                 *[gInception_ST(2 * h, h // 2, h, incep_ker, groups) for _ in range(1, N2 - 1)],
                                 gInception_ST(2 * h, h // 2, channel_in, incep_ker, groups))

    def forward(self, x):
        skips = []
        z = x
        for i in range(self.N2):
            z = self.enc[i](z)
            if i < self.N2 - 1:
                skips.append(z)
        z = self.dec[0](z)
        for i in range(1, self.N2):
            z = self.dec[i](torch.cat([z, skips[-i]], dim=1))
        return z


# ---- gSTA / TAU translator -----------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DWConv(nn.Module):
    def __init__(self, dim, backend=None):
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=True, backend=backend)

    def forward(self, x):
        return self.dwconv(x)


class MixMlp(nn.Module):
    """1x1 -> depthwise 3x3 -> GELU -> 1x1 (keys fc1, dwconv.dwconv, fc2)."""

    def __init__(self, in_features, hidden_features, drop=0.0, backend=None):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features, backend=backend)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


def _init_openstl(m: nn.Module) -> None:
    """OpenSTL's GASubBlock._init_weights: convolutions ~ N(0, sqrt(2 / fan_out)), zero bias."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        with torch.no_grad():
            m.weight.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.zero_()


class GASubBlock(nn.Module):
    """x += ls1 * attn(BN(x)); x += ls2 * mlp(BN(x)), with DropPath on both branches (gSTA)."""

    def __init__(self, dim, kernel_size=21, mlp_ratio=4.0, drop=0.0, drop_path=0.1, init_value=1e-2,
                 backend=None):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim, kernel_size, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = MixMlp(dim, int(dim * mlp_ratio), drop=drop, backend=backend)
        self.layer_scale_1 = nn.Parameter(init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(init_value * torch.ones(dim))
        self.apply(_init_openstl)

    def forward(self, x):
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class TAUSubBlock(GASubBlock):
    """gSTA's block with TAU's temporal attention (which keeps PyTorch's default initialisation)."""

    def __init__(self, dim, kernel_size=21, mlp_ratio=4.0, drop=0.0, drop_path=0.1, init_value=1e-2,
                 backend=None):
        super().__init__(dim, kernel_size, mlp_ratio, drop, drop_path, init_value, backend)
        self.attn = TemporalAttention(dim, kernel_size, backend=backend)


class MetaBlock(nn.Module):
    def __init__(self, cin, cout, model_type="gsta", mlp_ratio=8.0, drop=0.0, drop_path=0.0, backend=None):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        block = {"gsta": GASubBlock, "tau": TAUSubBlock}[model_type]
        self.block = block(cin, kernel_size=21, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path,
                           backend=backend)
        if cin != cout:
            self.reduction = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        z = self.block(x)
        return z if self.in_channels == self.out_channels else self.reduction(z)


class MidMetaNet(nn.Module):
    """N_T MetaBlocks: T*hid_S -> hid_T, hid_T blocks, hid_T -> T*hid_S. DropPath rates follow
    linspace(1e-2, drop_path, N_T) for all but the last block (which gets drop_path), as in OpenSTL."""

    def __init__(self, channel_in, channel_hid, N2, model_type="gsta", mlp_ratio=8.0, drop=0.0, drop_path=0.0,
                 backend=None):
        super().__init__()
        if N2 < 2:
            raise ValueError(f"N_T must be >= 2, got {N2}")
        self.N2 = N2
        dpr = [v.item() for v in torch.linspace(1e-2, drop_path, N2, device="cpu")]
        kw = dict(model_type=model_type, mlp_ratio=mlp_ratio, drop=drop, backend=backend)
        layers = [MetaBlock(channel_in, channel_hid, drop_path=dpr[0], **kw)]
        layers += [MetaBlock(channel_hid, channel_hid, drop_path=dpr[i], **kw) for i in range(1, N2 - 1)]
        layers.append(MetaBlock(channel_hid, channel_in, drop_path=drop_path, **kw))
        self.enc = nn.Sequential(*layers)

    def forward(self, x):
        return self.enc(x)


# ---- the model -----------------------------------------------------------------------------------------
MODEL_TYPES = ("incepu", "gsta", "tau")


class SimVP(_base.VideoPredictionModel):
    """SimVP (OpenSTL): ConvSC encoder -> translator over [B, T*hid_S, H/4, W/4] -> ConvSC decoder.

    SimVP(in_shape=(10, 1, 64, 64), hid_S=16, hid_T=256, N_S=4, N_T=4, model_type="gSTA", mlp_ratio=8.0,
          drop=0.0, drop_path=0.0, spatio_kernel_enc=3, spatio_kernel_dec=3, pre_seq_length=None,
          aft_seq_length=None, alpha=0.1, backend=None)

    model_type: "IncepU", "gSTA" or "tau" (TAU; its training loss adds alpha * DDR).
    in_shape: (T, C, H, W) with T = pre_seq_length (the translator's width is T * hid_S).
    forward(x: Tensor[B, pre_seq_length, C, H, W]) -> Tensor[B, aft_seq_length, C, H, W]; when
      aft != pre it runs the network autoregressively on its own output chunks, as the reference does.
    training_loss(frames: Tensor[B, pre + aft, C, H, W], itr) -> (loss, logs): MSE of the prediction
      (+ alpha * DDR for TAU).
    backend: for the depthwise convolutions and the attention units (vpfast.nn); "torch" = reference.
      Any other backend also runs the encoder and decoder in channels_last (same arithmetic, faster oneDNN
      convolutions for their narrow channels) and their GroupNorm + SiLU as one fused op
      (vpfast.ops.group_norm_silu).
    """

    def __init__(self, in_shape=(10, 1, 64, 64), hid_S=16, hid_T=256, N_S=4, N_T=4, model_type="gSTA",
                 mlp_ratio=8.0, drop=0.0, drop_path=0.0, spatio_kernel_enc=3, spatio_kernel_dec=3,
                 pre_seq_length=None, aft_seq_length=None, alpha=0.1, backend: Optional[str] = None):
        super().__init__()
        T, C, H, W = _base.as_shape(in_shape)
        pre = T if pre_seq_length is None else _base.positive_int("pre_seq_length", pre_seq_length)
        if pre != T:
            raise ValueError(f"pre_seq_length ({pre}) must equal in_shape[0] ({T}) for SimVP: the translator "
                             f"is built for T*hid_S channels")
        aft = pre if aft_seq_length is None else _base.positive_int("aft_seq_length", aft_seq_length)
        mt = "gsta" if model_type is None else str(model_type).lower()
        if mt not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of 'IncepU', 'gSTA', 'tau', got {model_type!r}")
        for k, v in dict(hid_S=hid_S, hid_T=hid_T, N_S=N_S, N_T=N_T, spatio_kernel_enc=spatio_kernel_enc,
                         spatio_kernel_dec=spatio_kernel_dec).items():
            _base.positive_int(k, v)
        if N_S % 2:
            raise ValueError(f"N_S must be even (pairs of [no, down] ConvSC layers), got {N_S}")
        if hid_S % 2:
            raise ValueError(f"hid_S must be even (GroupNorm with 2 groups), got {hid_S}")
        self._init_config(dict(in_shape=[T, C, H, W], hid_S=hid_S, hid_T=hid_T, N_S=N_S, N_T=N_T,
                               model_type=model_type, mlp_ratio=float(mlp_ratio), drop=float(drop),
                               drop_path=float(drop_path), spatio_kernel_enc=spatio_kernel_enc,
                               spatio_kernel_dec=spatio_kernel_dec, pre_seq_length=pre, aft_seq_length=aft,
                               alpha=float(alpha)), backend)
        self.model_type = mt
        self.name = {"incepu": "simvp_incepu", "gsta": "simvp_gsta", "tau": "tau"}[mt]
        self.enc = Encoder(C, hid_S, N_S, spatio_kernel_enc, backend=self.backend)
        self.dec = Decoder(hid_S, C, N_S, spatio_kernel_dec, backend=self.backend)
        for m in (*self.enc.modules(), *self.dec.modules()):
            if isinstance(m, BasicConv2d):
                m.channels_last = True  # used by the fast backends only (step() keeps the layouts apart)
        if mt == "incepu" and (hid_T // 2) % 8 == 0 and (hid_T % 8 or (T * hid_S) % 8):
            raise ValueError(f"the IncepU translator's grouped convolutions (8 groups) need hid_T and "
                             f"T*hid_S divisible by 8, got hid_T={hid_T}, T*hid_S={T * hid_S}")
        if mt == "incepu":
            self.hid = MidIncepNet(T * hid_S, hid_T, N_T)
        else:
            self.hid = MidMetaNet(T * hid_S, hid_T, N_T, model_type=mt, mlp_ratio=mlp_ratio, drop=drop,
                                  drop_path=drop_path, backend=self.backend)

    def _spatial_divisor(self):
        return 2 ** (self.config["N_S"] // 2), f"the encoder downsamples by 2 {self.config['N_S'] // 2} times"

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network: Tensor[B, T, C, H, W] -> Tensor[B, T, C, H, W] (T = in_shape[0])."""
        B, T, C, H, W = x.shape
        frames = x.reshape(B * T, C, H, W)
        # Fast path: the encoder and decoder (narrow 3x3 convolutions over every full-size frame) run in
        # channels_last, oneDNN's native layout: their convolutions measured 2-3x faster here than in NCHW.
        # The translator stays NCHW (vpfast's depthwise kernels read whole planes). Same arithmetic either way.
        fmt = torch.contiguous_format if self.backend == "torch" else torch.channels_last
        embed, skip = self.enc(frames.contiguous(memory_format=fmt))
        _, C_, H_, W_ = embed.shape
        z = self.hid(embed.reshape(B, T * C_, H_, W_).contiguous())
        y = self.dec(z.reshape(B * T, C_, H_, W_).contiguous(memory_format=fmt), skip)
        return y.contiguous().reshape(B, T, C, H, W)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        pre, aft = self.pre_seq_length, self.aft_seq_length
        if aft == pre:
            return self.step(x)
        if aft < pre:
            return self.step(x)[:, :aft]
        out, cur = [], x
        for _ in range(aft // pre):
            cur = self.step(cur)
            out.append(cur)
        if aft % pre:
            out.append(self.step(cur)[:, :aft % pre])
        return torch.cat(out, dim=1)

    def training_loss(self, frames: torch.Tensor, itr: int = 0):
        """frames: Tensor[B, pre + aft, C, H, W] -> (loss: Tensor[], logs: dict of floats)."""
        pre, aft = self.pre_seq_length, self.aft_seq_length
        self.check_frames(frames, pre + aft, "frames")
        pred = self._predict(frames[:, :pre])
        target = frames[:, pre:]
        mse = F.mse_loss(pred, target)
        logs = {"mse": mse.item()}
        loss = mse
        if self.model_type == "tau" and self.config["alpha"] != 0.0:
            ddr = ddr_loss(pred, target, backend=self.backend)
            loss = mse + self.config["alpha"] * ddr
            logs["ddr"] = ddr.item()
        logs["loss"] = loss.item()
        return loss, logs


class SimVP_IncepU(SimVP):  # noqa: N801
    """SimVP with the IncepU translator (model_type="IncepU")."""

    def __init__(self, **config):
        config.setdefault("model_type", "IncepU")
        if str(config["model_type"]).lower() != "incepu":
            raise ValueError(f"SimVP_IncepU has model_type 'IncepU', got {config['model_type']!r}")
        super().__init__(**config)


class SimVP_gSTA(SimVP):  # noqa: N801
    """SimVP with the gSTA translator (model_type="gSTA")."""

    def __init__(self, **config):
        config.setdefault("model_type", "gSTA")
        if str(config["model_type"]).lower() != "gsta":
            raise ValueError(f"SimVP_gSTA has model_type 'gSTA', got {config['model_type']!r}")
        super().__init__(**config)


class TAU(SimVP):
    """TAU: SimVP with temporal attention (model_type="tau"); training loss MSE + alpha * DDR (alpha 0.1)."""

    def __init__(self, **config):
        config.setdefault("model_type", "tau")
        if str(config["model_type"]).lower() != "tau":
            raise ValueError(f"TAU has model_type 'tau', got {config['model_type']!r}")
        super().__init__(**config)
