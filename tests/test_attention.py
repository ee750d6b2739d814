"""gSTA / TAU attention units: OpenSTL state_dict keys, reference arithmetic, backends agree."""
import pytest
import torch
from torch import nn

from vpfast.nn import AttentionModule, DepthwiseConv2d, SpatialAttention, TemporalAttention, TemporalAttentionModule


def _keys(path, prefix):
    out = {}
    for line in open(path):
        if line.startswith(prefix):
            name, shape = line[len(prefix):].split(" ", 1)
            out[name] = tuple(int(s) for s in shape.strip("()\n").split(",") if s.strip())
    return out


@pytest.mark.parametrize("cls,path", [
    (SpatialAttention, "/work/shared/reference/keys/simvp_gsta_mmnist.txt"),
    (TemporalAttention, "/work/shared/reference/keys/tau_mmnist.txt"),
])
def test_state_dict_keys(cls, path):
    import os
    if not os.path.exists(path):
        pytest.skip("reference key lists not available")
    want = _keys(path, "hid.enc.0.block.attn.")
    got = {k: tuple(v.shape) for k, v in cls(640).state_dict().items()}
    assert got == want


def _openstl_lka(m, x):
    # the reference's module calls spelled out with plain nn.Conv2d arithmetic
    C = x.shape[1]
    a = nn.functional.conv2d(x, m.conv0.weight, m.conv0.bias, 1, m.conv0.padding, 1, C)
    a = nn.functional.conv2d(a, m.conv_spatial.weight, m.conv_spatial.bias, 1, m.conv_spatial.padding,
                             m.conv_spatial.dilation, C)
    return m.conv1(a)


def test_units_match_openstl_arithmetic():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64)
    m = AttentionModule(32, 21).double()
    fg = _openstl_lka(m, x)
    f, g = fg.chunk(2, 1)
    torch.testing.assert_close(m(x), torch.sigmoid(g) * f)
    t = TemporalAttentionModule(32, 21).double()
    se = t.fc(x.mean((2, 3))).view(2, 32, 1, 1)
    torch.testing.assert_close(t(x), se * _openstl_lka(t, x) * x)
    assert t.fc[0].weight.shape == (8, 32)  # dim // max(dim // 16, 4)


def test_depthwise_module_is_conv2d_drop_in():
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    m = DepthwiseConv2d(6, 6, 5, padding=2, groups=6)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 10, 7)
    torch.testing.assert_close(m(x), ref(x))
    with pytest.raises(ValueError):
        DepthwiseConv2d(6, 6, 4, groups=6)
    with pytest.raises(ValueError):
        DepthwiseConv2d(6, 12, 3, groups=6)


def _set_backend(m, backend):
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = backend


@pytest.mark.parametrize("cls", [SpatialAttention, TemporalAttention])
@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_backend_matches_torch(cls, backend):
    from vpfast.ops.large_kernel_attention import OP
    from vpfast.testing import device_for
    why = OP.static_reasons(backend)
    if why:
        pytest.skip("; ".join(why))
    dev = device_for(backend)
    if backend != "cpp" and dev != "cuda":
        pytest.skip(f"{backend} without a GPU: the op's own tests cover it at small shapes")
    torch.manual_seed(0)
    m = cls(32, backend=backend).double().to(dev)
    x = torch.randn(2, 32, 13, 10, dtype=torch.float64).to(dev).requires_grad_()
    out = m(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *m.parameters()])
    _set_backend(m, "torch")
    ref = m(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
