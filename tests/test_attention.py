"""gSTA / TAU attention units: OpenSTL state_dict keys, reference arithmetic, backends agree."""
import pytest
import torch
from torch import nn

from reference_keys import entries

from vpfast.nn import AttentionModule, DepthwiseConv2d, SpatialAttention, TemporalAttention, TemporalAttentionModule


@pytest.mark.parametrize("cls,fname", [
    (SpatialAttention, "simvp_gsta_mmnist.txt"),
    (TemporalAttention, "tau_mmnist.txt"),
])
def test_state_dict_keys(cls, fname):
    want = entries(fname, "hid.enc.0.block.attn.")
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


@pytest.mark.parametrize("block", ["gsta", "tau"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_block_at_mmnist_shape(block, backend):
    """One translator block of simvp_gsta / tau at the Moving-MNIST preset's shape (B=16, hid_T=512, 16x16,
    mlp_ratio 8: the MixMlp's depthwise 3x3 runs on 16 x 4096 = 65536 planes, which crashed the CUDA launch
    once), forward and backward: float32 against backend="torch" (TF32 off), and under bf16 autocast bounded
    against the float64 reference by the torch backend's own autocast error."""
    from vpfast.models.simvp import MetaBlock
    from vpfast.ops.large_kernel_attention import OP
    from vpfast.testing import assert_close_bounded, device_for, exact_float32
    why = OP.static_reasons(backend)
    if why or device_for(backend) != "cuda":
        pytest.skip("; ".join(why) or f"{backend} runs on CPU tensors here (no GPU)")
    torch.manual_seed(0)
    m = MetaBlock(512, 512, model_type=block, mlp_ratio=8.0, backend=backend).cuda()
    x = torch.randn(16, 512, 16, 16, device="cuda", requires_grad=True)

    def step(model, inp, autocast=False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(inp)
        return (out, *torch.autograd.grad(out.float().square().mean(), [inp, *model.parameters()]))

    with exact_float32():
        got = step(m, x)
        _set_backend(m, "torch")
        ref = step(m, x)
    for a, r in zip(got, ref):
        s = max(1e-3, r.abs().max().item())
        torch.testing.assert_close(a / s, r / s, rtol=1e-4, atol=1e-4)

    _set_backend(m, backend)
    got = step(m, x, autocast=True)
    _set_backend(m, "torch")
    same = step(m, x, autocast=True)
    ref = step(m.double(), x.detach().double().requires_grad_())
    for name, a, r_same, r in zip(("out", "grad_x"), got, same, ref):
        assert_close_bounded(a, r_same, r, factor=8, name=name)
