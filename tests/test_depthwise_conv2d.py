"""depthwise_conv2d: every available backend vs F.conv2d(groups=C) (the reference), each on its own device
(cuda, and triton where a GPU runs it, on CUDA tensors against the reference on the GPU)."""

import pytest
import torch
import torch.nn.functional as F

from vpfast.ops import depthwise_conv2d, depthwise_conv2d_reference
from vpfast.ops.depthwise_conv2d import OP
from vpfast.nn import DepthwiseConv2d
from vpfast.testing import assert_close_bounded, assert_keeps_fp_state, device_for, exact_float32, low_precision_params

BACKENDS = ["torch", "cpp", "cuda", "triton"]


def _skip_unless(backend, *args):
    why = OP.static_reasons(backend)
    if not why and backend == "cuda" and not torch.cuda.is_available():
        why = ["no CUDA device"]
    if why:
        pytest.skip("; ".join(why))


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _interpreted(backend):
    """The Triton interpreter runs taps one by one: its tests keep to a few small shapes."""
    return backend == "triton" and device_for("triton") != "cuda"


def _gpu_only(backend):
    _skip_unless(backend)
    if device_for(backend) != "cuda":
        pytest.skip(f"{backend} runs on CPU tensors here (no GPU); this test is for the GPU")




def _inputs(B, C, H, W, kh, kw, dtype=torch.float64, bias=True, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    w = torch.randn(C, 1, kh, kw, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_() if bias else None
    return x, w, b


def _run(fn, x, w, b, seed=1):
    out = fn(x, w, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    return (out, *torch.autograd.grad(out, leaves, g.to(out.device, out.dtype)))


def _compare(backend, x, w, b, stride=1, padding=None, dilation=1):
    """backend's output and gradients vs F.conv2d's, on the inputs' device (see _inputs(dev=...))."""
    got = _run(lambda *a: depthwise_conv2d(*a, stride=stride, padding=padding, dilation=dilation,
                                           backend=backend), x, w, b)
    with exact_float32():
        ref = _run(lambda *a: F.conv2d(a[0], a[1], a[2], stride,
                                       padding if padding is not None else
                                       (dilation * (w.shape[2] // 2), dilation * (w.shape[3] // 2)),
                                       dilation, groups=x.shape[1]), x, w, b)
    for name, a, r in zip(("out", "grad_x", "grad_w", "grad_b"), got, ref):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a / scale, r / scale, **_tol(x.dtype), msg=lambda m: f"{name}: {m}")


CASES = [  # (B, C, H, W, k, dilation, stride)
    (2, 3, 16, 16, 3, 1, 1),
    (1, 4, 13, 9, 5, 1, 1),
    (2, 3, 16, 16, 7, 3, 1),
    (1, 2, 17, 23, 11, 2, 1),
    (2, 2, 19, 33, 21, 1, 1),
    (1, 2, 12, 35, 31, 1, 1),
    (2, 3, 15, 16, 3, 1, 2),
    (1, 2, 17, 20, 5, 2, 2),
    (1, 2, 9, 11, 7, 3, 2),
    (1, 2, 4, 5, 7, 3, 1),  # map smaller than the kernel's reach
    (1, 2, 3, 2, 31, 1, 1),
    (2, 2, 6, 7, 21, 2, 2),
    # windows too large for the CUDA tiled forward's 48 KB of shared memory take its direct kernel: float64
    # only in the first (float32 stays tiled), both dtypes in the second (stride 3)
    (1, 2, 20, 23, 11, 9, 1),
    (1, 2, 30, 25, 11, 9, 3),
]
TRITON_CASES = [(1, 2, 9, 11, 7, 3, 2), (1, 2, 4, 5, 7, 3, 1)]  # the interpreter runs taps one by one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    _skip_unless(backend)
    B, C, H, W, k, d, s = case
    if _interpreted(backend) and (case not in TRITON_CASES or dtype == torch.float32):
        pytest.skip("the Triton interpreter is slow; a few small float64 shapes only")
    _compare(backend, *_inputs(B, C, H, W, k, k, dtype, dev=device_for(backend)), stride=s, dilation=d)


# The CPU backend has register-blocked kernels for 3/5/7 tap rows with row dilation 1-3 at vertical stride 1
# (blocks of 8 or 16 output rows, see csrc/cpu/depthwise_plane.h). Cover every combination with heights
# that give one short block, one full block and several blocks plus a tail, widths below, at and above a
# vector, rectangular filters, unequal dilations, horizontal stride 2 and non-"same" padding (the last case pads
# beyond the filter's reach, so the input gradient's stride-1 copy takes its clipping path).
ROW_KERNEL_CASES = [  # (H, W, (kh, kw), (dh, dw), (sh, sw), padding)
    (5, 7, (3, 3), (1, 1), (1, 1), None), (16, 16, (3, 5), (2, 1), (1, 1), None),
    (37, 41, (3, 3), (3, 2), (1, 1), (1, 0)), (8, 16, (5, 5), (1, 1), (1, 1), None),
    (16, 16, (5, 5), (1, 1), (1, 1), None), (23, 19, (5, 7), (2, 3), (1, 1), (0, 4)),
    (37, 17, (5, 3), (3, 1), (1, 2), None), (9, 33, (7, 7), (1, 1), (1, 1), None),
    (16, 16, (7, 7), (3, 3), (1, 1), None), (35, 18, (7, 5), (2, 2), (1, 1), (3, 6)),
    (6, 5, (7, 3), (3, 1), (1, 1), None), (12, 20, (3, 5), (1, 1), (1, 1), (3, 5)),
    # whole-vector rows (W = 16, 32): the backward correlates x in place with the output gradient's plane
    (12, 16, (3, 5), (1, 1), (1, 1), (3, 5)), (15, 32, (5, 3), (2, 3), (2, 2), (1, 2)),
    (4, 16, (7, 5), (1, 2), (1, 2), None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ROW_KERNEL_CASES, ids=str)
def test_row_kernels(dtype, case):
    _skip_unless("cpp")
    H, W, (kh, kw), dil, stride, padding = case
    if padding is None:
        padding = (dil[0] * (kh // 2), dil[1] * (kw // 2))
    _compare("cpp", *_inputs(2, 3, H, W, kh, kw, dtype), stride=stride, padding=padding, dilation=dil)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(40, 21, 9, 9), (45, 33, 21, 21), (33, 64, 11, 5), (70, 17, 31, 3)], ids=str)
def test_tall_filter_weight_grad(dtype, shape):
    """Maps of 32+ rows with tall filters take the CPU weight gradient's tap-row reuse path (row bands)."""
    _skip_unless("cpp")
    H, W, kh, kw = shape
    _compare("cpp", *_inputs(2, 3, H, W, kh, kw, dtype), padding=(kh // 2, kw // 2))


_PORTABLE_SCRIPT = """
import torch, torch.nn.functional as F
from vpfast.ops import depthwise_conv2d, large_kernel_attention, large_kernel_attention_reference
cases = [(2, 3, 16, 16, 5, 1, 1), (1, 2, 19, 33, 7, 3, 1), (2, 2, 17, 20, 21, 1, 1), (1, 2, 9, 11, 7, 3, 2),
         (2, 3, 37, 17, 3, 2, 1)]
for dtype in (torch.float32, torch.float64):
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for B, C, H, W, k, d, s in cases:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*sh, generator=g, dtype=dtype).requires_grad_() for sh in
                   ((B, C, H, W), (C, 1, k, k), (C,)))
        p = d * (k // 2)
        ref = F.conv2d(x, w, b, s, p, d, groups=C)
        out = depthwise_conv2d(x, w, b, stride=s, dilation=d, backend="cpp")
        go = torch.randn(ref.shape, generator=g, dtype=dtype)
        for a, r in zip((out, *torch.autograd.grad(out, (x, w, b), go)),
                        (ref, *torch.autograd.grad(ref, (x, w, b), go))):
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(a / scale, r / scale, rtol=tol, atol=tol)
    x = torch.randn(2, 3, 16, 16, dtype=dtype, requires_grad=True)
    ws = [torch.randn(3, 1, 5, 5, dtype=dtype), torch.randn(3, dtype=dtype), torch.randn(3, 1, 7, 7, dtype=dtype),
          torch.randn(3, dtype=dtype)]
    a = large_kernel_attention(x, *ws, dilation=3, backend="cpp")
    r = large_kernel_attention_reference(x, *ws, dilation=3)
    torch.testing.assert_close(a, r, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(r.sum(), x)[0],
                               rtol=tol, atol=tol)
print("ok")
"""


def test_portable_cpu_loops():
    """VPFAST_CPU_PORTABLE=1 switches off the AVX-512 row kernels and scalar tap tables; the portable loops
    (what CPUs without AVX-512 run) must agree with the reference too."""
    _skip_unless("cpp")
    import os
    import subprocess
    import sys
    env = dict(os.environ, VPFAST_CPU_PORTABLE="1", VPFAST_QUIET="1")
    res = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


@pytest.mark.parametrize("shape", [(5, 20, 9, 10, 5), (7, 9, 16, 16, 21), (3, 70, 4, 33, 3)], ids=str)
def test_weight_grad_batch_chunks(shape):
    """The CPU backward sums weight/bias gradients per (channel, chunk of samples) and then over chunks; these
    shapes give uneven chunks, an empty last chunk (B=5, C=20: 4 chunks of 2) and one chunk per channel."""
    _skip_unless("cpp")
    B, C, H, W, k = shape
    _compare("cpp", *_inputs(B, C, H, W, k, k, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    _skip_unless(backend)
    dev = device_for(backend)
    x, w, b = _inputs(1, 1, 5, 6, 3, 3, dev=dev) if _interpreted(backend) else _inputs(2, 3, 9, 12, 5, 5, dev=dev)
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided view
    assert not xt.is_contiguous()
    _compare(backend, xt, w, b, dilation=2)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _compare(backend, xc, w, b, stride=2)
    wn = w.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    _compare(backend, x, wn, None)
    if not _interpreted(backend):
        # rows of whole vectors (16 float64 = 2 vectors): the CPU weight gradient reads x in place
        x, w, b = _inputs(2, 3, 7, 16, 5, 5, dev=dev)
        xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        _compare(backend, xt, w, b)
        _compare(backend, x.detach().to(memory_format=torch.channels_last).requires_grad_(), w, b, dilation=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_explicit_padding(backend):
    _skip_unless(backend)
    x, w, _ = _inputs(1, 2, 10, 7, 3, 5, bias=False, dev=device_for(backend))
    _compare(backend, x, w, None, padding=(0, 3))
    _compare(backend, x, w, None, padding=(4, 1), stride=(2, 1), dilation=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    _skip_unless(backend)
    if _interpreted(backend):
        pytest.skip("too many calls for the Triton interpreter; its gradients are compared with the reference")
    # the row kernels (3x3; 7x7 dilation 3), a strided case, the tall-filter weight gradient (32+ rows), and
    # whole-vector rows (W = 8 in float64), whose weight gradient reads x in place
    for (H, W, k, d, s) in [(6, 5, 3, 1, 1), (7, 6, 5, 2, 2), (9, 7, 7, 3, 1), (33, 4, 9, 1, 1), (5, 8, 3, 1, 1)]:
        x, w, b = _inputs(1, 2, H, W, k, k, dev=device_for(backend))
        assert torch.autograd.gradcheck(
            lambda *a: depthwise_conv2d(*a, stride=s, dilation=d, backend=backend), (x, w, b))


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_opcheck_compiled(backend):
    _skip_unless(backend)
    dev = "cuda" if backend == "cuda" else "cpu"
    x, w, b = (t.detach().to(dev).requires_grad_() for t in _inputs(2, 3, 9, 8, 5, 5))
    torch.library.opcheck(torch.ops.vpfast.depthwise_conv2d_forward, (x, w, b, [1, 2], [2, 1], [1, 2]))
    g = torch.randn_like(torch.ops.vpfast.depthwise_conv2d_forward(x, w, b, [1, 2], [2, 1], [1, 2]))
    torch.library.opcheck(torch.ops.vpfast.depthwise_conv2d_backward,
                          (g, x.detach(), w.detach(), [1, 2], [2, 1], [1, 2], [True, True, True]))
    # rows of whole vectors (16 float32): the weight gradient reads x in place
    x, w = (t.detach().to(dev) for t in _inputs(1, 2, 6, 16, 3, 5, torch.float32)[:2])
    g = torch.randn(1, 2, 6, 16, device=dev)
    torch.library.opcheck(torch.ops.vpfast.depthwise_conv2d_backward,
                          (g, x, w, [1, 1], [1, 2], [1, 1], [True, True, True]))


def test_opcheck_triton():
    _skip_unless("triton")
    from vpfast.ops.depthwise_conv2d import _dw_triton_forward
    x, w, b = _inputs(1, 2, 5, 6, 3, 3, dev=device_for("triton"))
    torch.library.opcheck(_dw_triton_forward, (x, w, b, [1, 1], [1, 1], [1, 1]))


@pytest.mark.parametrize("shape", [(4, 8, 20, 24, 7), (3, 61, 16, 16, 5)], ids=str)
def test_deterministic_param_grads(shape):
    """Identical bits on every run and for 1, 2 and 3 threads. The second shape has small planes, which the
    CPU backward visits in blocks of channels whose size follows the thread count (blocks of 15, 7 and 5
    channels here, the last one partial); the sums must not depend on it."""
    _skip_unless("cpp")
    B, C, H, W, k = shape
    x, w, b = _inputs(B, C, H, W, k, k, torch.float32)
    runs = [_run(lambda *a: depthwise_conv2d(*a, dilation=2, backend="cpp"), x, w, b) for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append(_run(lambda *a: depthwise_conv2d(*a, dilation=2, backend="cpp"), x, w, b))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for a, b_ in zip(runs[0], r):
            assert torch.equal(a, b_)
    _compare("cpp", *_inputs(B, C, H, W, k, k, torch.float64), dilation=2)


def test_auto_and_torch_compile():
    x, w, b = _inputs(2, 3, 8, 8, 5, 5, torch.float32)
    ref = depthwise_conv2d_reference(x, w, b)
    torch.testing.assert_close(depthwise_conv2d(x, w, b), ref, **_tol(torch.float32))
    if not OP.static_reasons("cpp"):
        f = torch.compile(lambda *a: depthwise_conv2d(*a, backend="cpp"), fullgraph=True)
        torch.testing.assert_close(f(x, w, b), ref, **_tol(torch.float32))


def test_bad_input():
    x, w, b = _inputs(1, 4, 8, 8, 3, 3)
    with pytest.raises(ValueError, match="odd"):
        depthwise_conv2d(x, torch.randn(4, 1, 4, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv2d(x, torch.randn(4, 2, 3, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv2d(x, torch.randn(3, 1, 3, 3, dtype=x.dtype))  # channel mismatch
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        depthwise_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="bias"):
        depthwise_conv2d(x, w, torch.randn(3, dtype=x.dtype))
    with pytest.raises(ValueError, match="x"):
        depthwise_conv2d(x[0], w)
    with pytest.raises(TypeError):
        depthwise_conv2d(x, w.float())
    with pytest.raises(ValueError, match="empty"):
        depthwise_conv2d(x, torch.randn(4, 1, 31, 31, dtype=x.dtype), padding=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_drop_in(backend):
    _skip_unless(backend)
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 4, 7, stride=2, padding=3, dilation=1, groups=4).double()
    m = DepthwiseConv2d(4, 4, 7, stride=2, padding=3, groups=4, backend=backend).double()
    m.load_state_dict(ref.state_dict())
    dev = device_for(backend)
    ref, m = ref.to(dev), m.to(dev)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64).to(dev)
    torch.testing.assert_close(m(x), ref(x))


# ---- launch geometry and limits (host side: no GPU needed) -------------------------------------------------
_LAUNCH_GEOMETRY_TEST = r"""
#include <cstdio>
#include <vector>
#include "common/depthwise_conv2d.h"
using namespace vpfast::dw;
static int fails = 0;
#define CHECK(c) do { if (!(c)) { std::printf("FAIL line %d: %s\n", __LINE__, #c); ++fails; } } while (0)
int main() {
  // TAU's MixMlp with B = 17: 17 * 4096 planes of 8x8, one 16x16 tile each. As blockIdx.z (the old layout)
  // this was beyond 65535; on x it is one launch without a grid-stride pass.
  const TileGrid mix = tile_grid(17 * 4096, 8, 8, 16);
  CHECK(mix.total() == 69632 && mix.total() > kMaxGridYZ);
  CHECK(grid_x(mix.total(), 1) == 69632);
  // every (plane, tile row, tile column) exactly once, in order
  for (int64_t tile : {4, 16}) {
    const int64_t planes = 3, oh = 33, ow = 17;
    const TileGrid t = tile_grid(planes, oh, ow, tile);
    CHECK(t.tiles_h == (oh + tile - 1) / tile && t.tiles_w == (ow + tile - 1) / tile);
    std::vector<int> seen(t.total(), 0);
    int64_t expect = 0;
    for (int64_t item = 0; item < t.total(); ++item) {
      int64_t p, ty, tx;
      t.locate(item, p, ty, tx);
      CHECK(p >= 0 && p < planes && ty >= 0 && ty < t.tiles_h && tx >= 0 && tx < t.tiles_w);
      const int64_t flat = (p * t.tiles_h + ty) * t.tiles_w + tx;
      CHECK(flat == expect++);
      if (flat >= 0 && flat < t.total()) ++seen[flat];
    }
    for (int s : seen) CHECK(s == 1);
  }
  // a grid-stride pass covers what a capped grid leaves: 2^40 tiles launch kMaxGridX blocks
  CHECK(grid_x(int64_t(1) << 40, 1) == kMaxGridX);
  CHECK(grid_x(int64_t(1) << 40, 256) == kMaxGridX);
  CHECK(grid_x(1000, 256) == 4 && grid_x(1024, 256) == 4 && grid_x(1025, 256) == 5 && grid_x(0, 256) == 1);
  // shared tiles: 5x5 stride 1 -> 20x20 window + 25 taps; 11x11 dilation 9 -> 106x106 + 121
  CHECK(forward_tile_elems(16, 5, 5, 1, 1, 1, 1) == 20 * 20 + 25);
  CHECK(forward_tile_elems(16, 11, 11, 1, 1, 9, 9) == 106 * 106 + 121);
  CHECK(forward_tile_elems(16, 3, 3, 3, 3, 1, 1) == 48 * 48 + 9);
  CHECK(forward_tile_elems(16, 31, 31, 1, 1, int64_t(1) << 30, 1) == kMaxGridX);  // saturates, no overflow
  // float32 tiles of 11x11 dilation 9 fit in 48 KB, float64 ones do not (the direct kernel runs them)
  CHECK(forward_tile_elems(16, 11, 11, 1, 1, 9, 9) * 4 <= kMaxSharedBytes);
  CHECK(forward_tile_elems(16, 11, 11, 1, 1, 9, 9) * 8 > kMaxSharedBytes);
  int64_t mh, mw, ih, iw;
  CHECK(pair_tile_elems(16, 5, 5, 1, 1, 7, 7, 3, 3, mh, mw, ih, iw) == 38 * 38 + 34 * 34);
  CHECK(mh == 34 && mw == 34 && ih == 38 && iw == 38);
  CHECK(pair_tile_elems(16, 5, 5, 1, 1, 21, 21, 3, 3, mh, mw, ih, iw) * 4 <= kMaxSharedBytes);  // fused
  CHECK(pair_tile_elems(16, 5, 5, 1, 1, 21, 21, 3, 3, mh, mw, ih, iw) * 8 > kMaxSharedBytes);  // two convs
  CHECK(pair_tile_elems(16, 3, 3, 1, 1, 23, 23, 3, 3, mh, mw, ih, iw) * 4 > kMaxSharedBytes);
  CHECK(pair_tile_elems(16, 3, 3, 1, 1, 5, 5, int64_t(1) << 30, 1, mh, mw, ih, iw) == kMaxGridX);
  std::printf(fails ? "%d failed\n" : "ok\n", fails);
  return fails != 0;
}
"""


def test_launch_geometry_helpers(tmp_path):
    """The CUDA kernels' launch arithmetic (csrc/common/depthwise_conv2d.h) compiled for the host: work on
    gridDim.x for any number of planes, tiles enumerated exactly once, the shared-memory sizes that choose
    between the tiled and the direct forward (and the fused pair or two convolutions)."""
    import os
    import shutil
    import subprocess
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "launch.cpp", tmp_path / "launch"
    src.write_text(_LAUNCH_GEOMETRY_TEST)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(root, "csrc"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout


def test_gpu_limits_in_check():
    """What the GPU kernels cannot take is a dispatch reason (auto falls back, a named backend explains), not
    a CUDA error; B*C beyond 65535 is no longer such a limit. Meta tensors: nothing is allocated."""
    from vpfast.ops.depthwise_conv2d import gpu_limits
    x = torch.empty(17, 4096, 8, 8, device="meta")
    w = torch.empty(4096, 1, 3, 3, device="meta")
    assert OP.check("cuda", x, w, None, (1, 1), (1, 1), (1, 1)) == []
    assert OP.check("triton", x, w, None, (1, 1), (1, 1), (1, 1)) == []
    big = torch.empty(1, 1, 65536, 32768, device="meta")  # one plane of 2^31 elements
    w1 = torch.empty(1, 1, 3, 3, device="meta")
    assert OP.check("cuda", big, w1, None, (1, 1), (1, 1), (1, 1)) == []
    assert any("32 bits" in r for r in OP.check("triton", big, w1, None, (1, 1), (1, 1), (1, 1)))
    assert any("2^31" in r for r in OP.check("cuda", x, w, None, (1, 1), (2**31, 1), (1, 1)))
    assert gpu_limits("cpp", 1, 1, 65536, 32768, 65536, 32768, 3, 3, (2**40,)) == []


# ---- mixed precision and autocast --------------------------------------------------------------------------
LOW_PRECISION_CASES = [(2, 8, 16, 16, 5, 1, 1), (2, 8, 16, 16, 7, 3, 1), (2, 4, 15, 17, 3, 1, 2),
                       (1, 4, 20, 20, 21, 1, 1)]


@pytest.mark.parametrize("backend,dtype", low_precision_params("depthwise_conv2d"))
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision(backend, dtype, case):
    """float16/bfloat16 in and out, float32 inside: output and gradients within 8x the error of PyTorch's own
    convolution at that precision, both against float64 on the same (rounded) inputs."""
    B, C, H, W, k, d, s = case
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dev)
    w64 = (torch.randn(C, 1, k, k, generator=g, dtype=torch.float64) / k).to(dev)  # conv-init magnitudes
    b64 = (0.1 * torch.randn(C, generator=g, dtype=torch.float64)).to(dev)
    Ho, Wo = (H + 2 * d * (k // 2) - d * (k - 1) - 1) // s + 1, (W + 2 * d * (k // 2) - d * (k - 1) - 1) // s + 1
    go64 = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64).to(dev)
    low = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    exact = [t.detach().double().requires_grad_() for t in low]  # the same rounded values, in float64
    go = go64.to(dtype)

    def run(fn, args, grad):
        out = fn(*args)
        return (out, *torch.autograd.grad(out, args, grad))

    got = run(lambda *a: depthwise_conv2d(*a, stride=s, dilation=d, backend=backend), low, go)
    same = run(lambda *a: F.conv2d(a[0], a[1], a[2], s, d * (k // 2), d, groups=C), low, go)
    ref = run(lambda *a: F.conv2d(a[0], a[1], a[2], s, d * (k // 2), d, groups=C), exact, go.double())
    for name, a, r_same, r in zip(("out", "grad_x", "grad_w", "grad_b"), got, same, ref):
        assert a.dtype == dtype, name
        assert_close_bounded(a, r_same, r, factor=8, name=name)


@pytest.mark.parametrize("backend", ["torch", None, "cpp"], ids=["torch", "auto", "cpp"])
def test_cpu_autocast(backend):
    """Under CPU autocast the op returns what autocast gives F.conv2d: a bfloat16 result close to the
    reference run under autocast, gradients in the leaves' float32. The cpp kernels are float32/float64, so
    auto runs the reference for bfloat16 and a named cpp backend says why it cannot."""
    from vpfast._dispatch import BackendUnavailable
    x, w, b = _inputs(2, 6, 11, 13, 5, 5, torch.float32)
    if backend == "cpp":
        _skip_unless("cpp")
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(BackendUnavailable, match="bfloat16"):
            depthwise_conv2d(x, w, b, dilation=2, backend="cpp")
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda *a: depthwise_conv2d(*a, dilation=2, backend=backend), x, w, b)
        ref = _run(lambda *a: F.conv2d(*a, 1, 4, 2, groups=6), x, w, b)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for name, a, r in zip(("out", "grad_x", "grad_w", "grad_b"), got, ref):
        assert a.dtype == r.dtype, name
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name}: {m}")


# ---- on a GPU: the models' shapes and the grid limits -----------------------------------------------------
GPU_SHAPES = [  # (B, C, H, W, k, dilation): TAU/gSTA's MixMlp DWConv (3x3 at C = 4096) and attention (C = 512)
    (16, 4096, 16, 16, 3, 1), (16, 512, 16, 16, 5, 1), (16, 512, 16, 16, 7, 3), (16, 512, 16, 16, 21, 1),
    (17, 4096, 8, 8, 3, 1),  # 69632 planes: more than gridDim.y/z's 65535
    (17, 4096, 8, 8, 5, 1),
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_model_shapes_and_many_planes(backend, shape):
    _gpu_only(backend)
    B, C, H, W, k, d = shape
    _compare(backend, *_inputs(B, C, H, W, k, k, torch.float32, dev="cuda"), dilation=d)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic(backend):
    _gpu_only(backend)
    x, w, b = _inputs(8, 64, 16, 16, 7, 7, torch.float32, dev="cuda")
    runs = [_run(lambda *a: depthwise_conv2d(*a, dilation=3, backend=backend), x, w, b) for _ in range(3)]
    for r in runs[1:]:
        for a, b_ in zip(runs[0], r):
            assert torch.equal(a, b_)


def test_auto_prefers_cudnn_on_gpu():
    """auto on CUDA tensors runs the reference (cuDNN): both fused backends measured slower on an H200."""
    assert OP.auto_order(device="cuda") == ("torch",)
    if torch.cuda.is_available():
        x, w, b = _inputs(1, 2, 8, 8, 3, 3, torch.float32, dev="cuda")
        assert OP.select(None, x, w, b, (1, 1), (1, 1), (1, 1))[0] == "torch"


def test_tiny_values_denormals():
    """x around float32's smallest normal number: its products with the weights are denormal. The CPU kernels
    (denormals flushed in their own scope, csrc/cpu/denormals.h; such values count as 0) still match the
    reference, and leave the caller's denormal mode as it was in every thread."""
    if OP.static_reasons("cpp"):
        pytest.skip("; ".join(OP.static_reasons("cpp")))
    x, w, b = _inputs(2, 4, 12, 13, 5, 5, torch.float32, seed=5)
    x = (x * 1e-38).detach().requires_grad_()
    assert_keeps_fp_state(lambda: _compare("cpp", x, w, b))
    assert_keeps_fp_state(lambda: _compare("cpp", x, w, b, dilation=3))
