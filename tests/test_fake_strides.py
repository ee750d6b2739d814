"""Every registered op's fake (meta) kernel against its real kernel: sizes, strides, dtype and device.

torch.compile traces a graph with the fake kernels and Inductor then plans buffers, and the code that reads a
custom op's outputs, from the strides the fake reported; at run time it asserts them (assert_size_stride). A
fake that reports other strides than the kernel returns fails there ("expected size 4==4, stride 64==1"), or,
where the assertion is compiled out, reads the wrong elements. `torch.library.opcheck` does not protect against
this: its test_aot_dispatch_dynamic compares outputs by value, and its fake-tensor test compares strides only
for the inputs it is given (contiguous ones in our opcheck tests), while inside a compiled graph an op sees
whatever layouts Inductor picked for the convolutions around it (channels_last on the CPU), slices of merged
convolution outputs, and transposed gradients.

So this module records the op calls the models actually make (a training step of each model that uses fused
ops, backward included, plus the public ops no model reaches) and reruns every recorded call with its tensors
in several layouts, comparing the metadata of every output of the real kernel with that of the fake one. The
Triton custom ops share their fakes with the compiled ops and are run the same way (under TRITON_INTERPRET on
the CPU).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import vpfast.models as M
import vpfast.ops as ops
from vpfast import _ext
from vpfast._dispatch import REGISTRY
from vpfast.testing import device_for, non_contiguous

pytestmark = pytest.mark.usefixtures("one_thread")


def _registered_ops():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("vpfast::"))


# with the compiled compositions (one implementation for every backend, e.g. causal_lstm_step): under
# FakeTensorMode they run on the fakes of the ops they call, which must add up to the real strides too
COMPILED = [n for n in _registered_ops() if not n.endswith("_triton") and
            (_ext.has_kernel(n, "CPU") or _ext.has_kernel(n, "CompositeExplicitAutograd"))]
TRITON = [n for n in _registered_ops() if n.endswith("_triton")]


class _Recorder(TorchDispatchMode):
    """Keeps the first few calls of each vpfast op, with their arguments cloned."""

    def __init__(self, calls, per_op=3):
        super().__init__()
        self.calls, self.per_op = calls, per_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vpfast":
            seen = self.calls.setdefault(func._opname, [])
            if len(seen) < self.per_op:
                seen.append(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, args))
        return func(*args, **(kwargs or {}))


# tiny models: every fused op the models use, forward and backward, with the arguments the models pass
MODELS = {
    "predrnn": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "predrnnv2": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "motionrnn": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "convlstm": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "predrnnpp": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "mim": dict(num_hidden="4,4", filter_size=3, patch_size=2),
    "tau": dict(hid_S=8, hid_T=16, N_S=2, N_T=2, in_shape=(2, 1, 16, 16), aft_seq_length=2),
    "simvp_gsta": dict(hid_S=8, hid_T=16, N_S=2, N_T=2, in_shape=(2, 1, 16, 16), aft_seq_length=2),
}


def _public_calls():
    """The public ops with options no tiny model takes (each forward + backward through the cpp backend)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    x, flow = r(2, 3, 5, 6), r(2, 2, 5, 6)
    for mode in ("zeros", "border"):
        ops.flow_warp(x, flow, padding_mode=mode, backend="cpp").sum().backward()
    ops.flow_warp(x, flow.detach(), backend="cpp").sum().backward()  # x's gradient only
    pred, target = r(2, 3, 2, 4, 4), r(2, 3, 2, 4, 4)
    ops.ddr_loss(pred, target, backend="cpp").backward()
    ops.ddr_loss(pred, target.detach(), backend="cpp").backward()
    # the forward/backward pair (what CUDA runs; the CPU takes it without autograd)
    torch.ops.vpfast.ddr_loss_forward(pred, target, 0.1, 1e-12)[0].backward()
    xs = r(2, 4, 5, 6)
    ops.group_norm_silu(xs, 2, r(4), r(4), backend="cpp").sum().backward()
    ops.group_norm_silu(xs, 2, None, None, backend="cpp").sum().backward()
    # layouts that are both contiguous and channels_last: one channel, 1x1 maps
    ops.group_norm_silu(r(2, 1, 3, 4), 1, r(1), r(1), backend="cpp").sum().backward()
    ops.group_norm_silu(r(2, 4, 1, 1), 2, r(4), r(4), backend="cpp").sum().backward()
    ops.depthwise_conv2d(xs, r(4, 1, 3, 3), r(4), stride=2, padding=1, backend="cpp").sum().backward()
    # the Causal LSTM stage ops: the model's steps call them from inside causal_lstm_step (not seen here);
    # LayerNorm cells run them per stage with separate gates, merged cells without x_g and c_g
    from vpfast.nn import CausalLSTMCell
    for kw in (dict(layer_norm=True), dict(layer_norm=False, merge_convs=True)):
        cell = CausalLSTMCell(4, 4, 5, 6, 3, 1, backend="cpp", **kw)
        sum(t.sum() for t in cell(r(2, 4, 5, 6), r(2, 4, 5, 6), r(2, 4, 5, 6), r(2, 4, 5, 6))).backward()
    ops.large_kernel_attention(xs, r(4, 1, 5, 5), r(4), r(4, 1, 7, 7), r(4), dilation=3,
                               backend="cpp").sum().backward()


@pytest.fixture(scope="module")
def recorded():
    calls = {}
    with _Recorder(calls):
        for name, kw in MODELS.items():
            torch.manual_seed(0)
            kw = dict(dict(in_shape=(3, 1, 16, 16), pre_seq_length=2, aft_seq_length=1), **kw)
            model = M.create(name, backend="cpp", **kw)
            T = kw["pre_seq_length"] + kw["aft_seq_length"]
            frames = torch.rand(2, T, 1, 16, 16, generator=torch.Generator().manual_seed(1))
            if "num_hidden" in kw:  # the recurrent models: a fixed scheduled-sampling draw
                loss, _ = model.training_loss(frames, 10, generator=torch.Generator().manual_seed(3))
            else:
                loss, _ = model.training_loss(frames, 10)
            loss.backward()
        _public_calls()
    return calls


# ---- layouts ------------------------------------------------------------------------------------------------
def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _transposed(t):
    # dense but neither contiguous nor channels_last (what a transposed gradient looks like)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


def _sliced(t):
    # a channel slice of a wider buffer (torch.split of a merged convolution's output)
    if t.dim() != 4:
        return t
    wide = torch.zeros(t.shape[0], t.shape[1] + 3, *t.shape[2:], dtype=t.dtype, device=t.device)
    wide[:, 1:1 + t.shape[1]] = t
    return wide[:, 1:1 + t.shape[1]]


LAYOUTS = {
    "as_called": lambda ts: ts,
    "contiguous": lambda ts: [t.contiguous() for t in ts],
    "channels_last": lambda ts: [_channels_last(t) for t in ts],
    "non_contiguous": lambda ts: [non_contiguous(t) if t.dim() else t for t in ts],
    "transposed": lambda ts: [_transposed(t) for t in ts],
    "sliced": lambda ts: [_sliced(t) for t in ts],
    # Inductor lays out each buffer on its own: some operands channels_last, others not
    "mixed_cl_first": lambda ts: [_channels_last(t) if i % 2 == 0 else t.contiguous() for i, t in enumerate(ts)],
    "mixed_cl_second": lambda ts: [_channels_last(t) if i % 2 == 1 else t.contiguous() for i, t in enumerate(ts)],
}


def _with_layout(args, layout):
    flat, spec = tree_flatten(args)
    idx = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
    new = LAYOUTS[layout]([flat[i] for i in idx])
    for i, t in zip(idx, new):
        flat[i] = t
    return spec.unflatten(flat)


def _meta(out):
    return [(tuple(t.shape), t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t
            for t in tree_flatten(out)[0]]


def _compare(op, args, layouts=tuple(LAYOUTS)):
    """Real vs fake output metadata of op(*args), for each layout; returns the mismatches as text."""
    bad = []
    for layout in layouts:
        a = _with_layout(args, layout)
        real = _meta(op(*a))
        with FakeTensorMode() as mode:
            fa = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, a)
            fake = _meta(op(*fa))
        if real != fake:
            ins = [(tuple(t.shape), t.stride()) for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor)]
            bad.append(f"{layout}: inputs {ins}\n    real {real}\n    fake {fake}")
    return bad


def test_every_op_is_covered(recorded):
    # a new op (or a model that stops reaching one) must be added to the recorded calls above
    missing = [n for n in COMPILED if n not in recorded]
    assert not missing, f"no recorded call of {missing}: add one to MODELS or _public_calls"


@pytest.mark.parametrize("name", COMPILED)
def test_fake_matches_cpp(recorded, name):
    op = getattr(torch.ops.vpfast, name).default
    bad = [m for args in recorded.get(name, []) for m in _compare(op, args)]
    assert not bad, (f"vpfast::{name}: the fake kernel's outputs differ from the cpp kernel's:\n"
                     + "\n".join(bad[:3]))


# The interpreter runs a Triton kernel program by program (seconds per call for the large-kernel depthwise
# convolutions, ~10 s per call): the Triton ops take their smallest recorded call in the two layouts a fake
# written with empty_like gets wrong, channels_last and dense-but-transposed (their opcheck tests cover
# contiguous inputs).
TRITON_LAYOUTS = ("channels_last", "transposed")


@pytest.mark.triton
@pytest.mark.parametrize("name", TRITON)
def test_fake_matches_triton(recorded, name):
    why = REGISTRY["stlstm_gates"].static_reasons("triton")
    if why:
        pytest.skip("; ".join(why))
    base = name[: -len("_triton")]
    if base not in recorded:
        pytest.skip(f"no recorded call of vpfast::{base} (test_every_op_is_covered names it)")
    op = getattr(torch.ops.vpfast, name).default
    # the Triton custom ops take the compiled ops' leading arguments; deform_warp's and flow_warp's backward
    # have no trailing which-gradients flags (they always compute every gradient)
    numel = lambda a: sum(t.numel() for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor))  # noqa: E731
    args = min(recorded[base], key=numel)[: len(op._schema.arguments)]
    dev = device_for("triton")  # the GPU when one runs Triton, else the CPU (the interpreter)
    args = tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, args)
    bad = _compare(op, args, TRITON_LAYOUTS)
    assert not bad, (f"vpfast::{name}: the fake kernel's outputs differ from the Triton kernel's:\n"
                     + "\n".join(bad[:3]))
