"""The CPU output cache (csrc/cpu/output_cache.h): compiled kernels reuse freed output blocks of >= 1 MiB.

A reused block holds whatever the last tensor left in it, so every op that takes its outputs from the cache is
run on blocks poisoned with NaN and must still match the reference: a kernel that leaves any element unwritten
fails here.
"""
import gc
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import vpfast
from vpfast import ops
from vpfast.ops.depthwise_conv2d import OP as DW_OP

pytestmark = pytest.mark.skipif(bool(DW_OP.static_reasons("cpp")), reason="; ".join(DW_OP.static_reasons("cpp")))


@pytest.fixture(autouse=True)
def _cache_on():
    before = vpfast.output_cache_info()["limit_bytes"] >> 20
    vpfast.set_output_cache_limit(256)
    yield
    vpfast.set_output_cache_limit(before)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


def _run(fn, args):
    """Outputs of fn and the gradients of every input that requires grad, as one flat list."""
    outs = [o for o in _flat(fn(*args)) if o.numel()]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads))


def _maps(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_() for s in shapes]


def _stlstm(xg, hg, mg, c, m, om, gates, output):
    cm, o_part, delta = gates(xg, hg, mg, c, m)
    return cm, delta, output(o_part, om, cm[:, : c.shape[1]])  # c_t standing in for conv_last's output


def _causal(xg, hg, cg, c, mg, k, om, cell, memory, output):
    c_new, carry = cell(xg, hg, cg, c)
    m_new, o_part = memory(carry, mg, k + c_new.repeat(1, 4, 1, 1))  # c_t standing in for conv_c2m's input
    return c_new, carry, m_new, output(o_part, om, c_new - m_new)


def _causal_case(backend):
    ref = backend == "torch"
    return lambda *a: _causal(
        *a, cell=ops.causal_lstm_cell_reference if ref else lambda *g: ops.causal_lstm_cell(*g, backend="cpp"),
        memory=ops.causal_lstm_memory_reference if ref else lambda *g: ops.causal_lstm_memory(*g, backend="cpp"),
        output=ops.causal_lstm_output_reference if ref else lambda *g: ops.causal_lstm_output(*g, backend="cpp"))


B, C, H, W = 2, 16, 64, 64  # one float64 map is 1 MiB: the smallest block the cache keeps
CASES = {
    "depthwise_conv2d": (lambda *a: ops.depthwise_conv2d(*a, backend="cpp"), ops.depthwise_conv2d_reference,
                         lambda: _maps((B, C, H, W), (C, 1, 5, 5), (C,))),
    "large_kernel_attention": (lambda *a: ops.large_kernel_attention(*a, dilation=3, backend="cpp"),
                               lambda *a: ops.large_kernel_attention_reference(*a, dilation=3),
                               lambda: _maps((B, C, H, W), (C, 1, 5, 5), (C,), (C, 1, 7, 7), (C,))),
    "stlstm": (lambda *a: _stlstm(*a, gates=lambda *g: ops.stlstm_gates(*g, 1.0, True, backend="cpp"),
                                  output=lambda *o: ops.stlstm_output(*o, backend="cpp")),
               lambda *a: _stlstm(*a, gates=lambda *g: ops.stlstm_gates_reference(*g, 1.0, True),
                                  output=ops.stlstm_output_reference),
               lambda: _maps((B, 7 * C, H, W), (B, 4 * C, H, W), (B, 3 * C, H, W), (B, C, H, W), (B, C, H, W),
                             (B, C, H, W))),
    "stlstm_gates": (lambda *a: ops.stlstm_gates(*a, 1.0, True, backend="cpp"),
                     lambda *a: ops.stlstm_gates_reference(*a, 1.0, True),
                     lambda: _maps((B, 7 * C, H, W), (B, 4 * C, H, W), (B, 3 * C, H, W), (B, C, H, W),
                                   (B, C, H, W))),
    "causal_lstm": (_causal_case("cpp"), _causal_case("torch"),
                    lambda: _maps((B, 7 * C, H, W), (B, 4 * C, H, W), (B, 3 * C, H, W), (B, C, H, W), (B, 3 * C, H, W),
                                  (B, 4 * C, H, W), (B, C, H, W))),
    "causal_lstm_merged": (_causal_case("cpp"), _causal_case("torch"),
                           lambda: [None] + _maps((B, 4 * C, H, W)) + [None] + _maps(
                               (B, C, H, W), (B, 3 * C, H, W), (B, 4 * C, H, W), (B, C, H, W), seed=1)),
    "convlstm": (lambda *a: ops.convlstm(*a, 0.0, True, backend="cpp"),
                 lambda *a: ops.convlstm_reference(*a, 0.0, True),
                 lambda: _maps((B, 4 * C, H, W), (B, 4 * C, H, W), (B, C, H, W))),
    "motion_gru": (lambda *a: ops.motion_gru(*a, backend="cpp"), ops.motion_gru_reference,
                   lambda: _maps((B, C, H, W), (B, C, H, W), (B, C, H, W), (C, 2 * C, 3, 3), (C,), (C, 2 * C, 3, 3),
                                 (C,), (C, 2 * C, 3, 3), (C,))),
    "flow_warp": (lambda *a: ops.flow_warp(*a, backend="cpp"), ops.flow_warp_reference,
                  lambda: [m * f for m, f in zip(_maps((B, C, H, W), (B, 2, H, W)), (1, 6))]),
    "deform_warp": (lambda *a: ops.deform_warp(*a, backend="cpp"), ops.deform_warp_reference,
                    lambda: _maps((B, C, H, W), (B, 18, H, W), (B, 9, H, W), (C, C, 3, 3))),
    "group_norm_silu": (lambda *a: ops.group_norm_silu(*a, backend="cpp"), ops.group_norm_silu_reference,
                        lambda: [_maps((B, C, H, W))[0], 4, *_maps((C,), (C,), seed=1)]),
    "group_norm_silu_channels_last": (
        lambda *a: ops.group_norm_silu(*a, backend="cpp"), ops.group_norm_silu_reference,
        lambda: [_maps((B, C, H, W))[0].detach().to(memory_format=torch.channels_last).requires_grad_(), 4,
                 *_maps((C,), (C,), seed=1)]),
    "ddr_loss": (lambda *a: ops.ddr_loss(*a, backend="cpp"), ops.ddr_loss_reference,
                 lambda: _maps((2, 10, 1, 64, 128), (2, 10, 1, 64, 128))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reused_poisoned_blocks_give_the_reference(name):
    fn, ref, make = CASES[name]
    args = make()
    first = _run(fn, args)
    with torch.no_grad():
        for t in first:
            t.fill_(math.nan)
    big = sum(t.numel() * t.element_size() >= 2**20 for t in first)
    assert big >= 1
    del first
    gc.collect()
    hits = vpfast.output_cache_info()["hits"]
    got = _run(fn, args)
    assert vpfast.output_cache_info()["hits"] - hits >= 1, "the second call should reuse freed blocks"
    want = _run(ref, args)
    assert len(got) == len(want)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_limit_evicts_and_zero_turns_it_off():
    x, w, b = [t.detach() for t in _maps((B, C, H, W), (C, 1, 5, 5), (C,))]
    ys = [ops.depthwise_conv2d(x, w, b, backend="cpp") for _ in range(3)]  # three live 1 MiB blocks
    del ys
    info = vpfast.output_cache_info()
    assert info["cached_blocks"] >= 3 and info["cached_bytes"] <= info["limit_bytes"]
    vpfast.set_output_cache_limit(2)
    info = vpfast.output_cache_info()
    assert info["cached_bytes"] <= 2 << 20 and info["limit_bytes"] == 2 << 20
    vpfast.set_output_cache_limit(0)
    assert vpfast.output_cache_info()["cached_bytes"] == 0
    y = ops.depthwise_conv2d(x, w, b, backend="cpp")
    del y
    assert vpfast.output_cache_info()["cached_bytes"] == 0
    vpfast.set_output_cache_limit(256)
    y = ops.depthwise_conv2d(x, w, b, backend="cpp")
    del y
    assert vpfast.output_cache_info()["cached_bytes"] >= 2**20
    vpfast.empty_output_cache()
    assert vpfast.output_cache_info()["cached_bytes"] == 0


def test_outputs_are_ordinary_tensors():
    x, w, b = [t.detach() for t in _maps((B, C, H, W), (C, 1, 5, 5), (C,))]
    y = ops.depthwise_conv2d(x, w, b, backend="cpp")
    want = ops.depthwise_conv2d_reference(x, w, b)
    torch.testing.assert_close(y, want)
    y.resize_(2 * B, C, H, W)  # a storage from the cache grows like any other
    torch.testing.assert_close(y[:B], want)
    z = y.clone()
    del y
    torch.testing.assert_close(z[:B], want)


def test_blocks_freed_on_other_threads():
    x, w, b = [t.detach() for t in _maps((B, C, H, W), (C, 1, 5, 5), (C,))]
    want = ops.depthwise_conv2d_reference(x, w, b)
    ys = [ops.depthwise_conv2d(x, w, b, backend="cpp") for _ in range(8)]

    def drop(i):
        ys[i] = None

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(8):
        torch.testing.assert_close(ops.depthwise_conv2d(x, w, b, backend="cpp"), want)


def test_profiler_sees_the_outputs():
    """Memory profiles (and the benchmarks' peak_mb) count cached-allocator outputs like any other."""
    from torch.profiler import ProfilerActivity, profile

    x, w, b = [t.detach() for t in _maps((B, C, H, W), (C, 1, 5, 5), (C,))]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = ops.depthwise_conv2d(x, w, b, backend="cpp")
        del y
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    n = x.numel() * x.element_size()
    assert n in sizes and -n in sizes


def test_bad_limits():
    with pytest.raises(ValueError, match="mb must be an int >= 0"):
        vpfast.set_output_cache_limit(-1)
    with pytest.raises(ValueError, match="mb must be an int >= 0"):
        vpfast.set_output_cache_limit(1.5)
    code = ("import torch, vpfast, vpfast.info; print(vpfast.info.report()); "
            "x = torch.randn(2, 16, 64, 64, dtype=torch.float64); "
            "vpfast.ops.depthwise_conv2d(x, torch.randn(16, 1, 3, 3, dtype=torch.float64), backend='cpp')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "VPFAST_CPU_OUTPUT_CACHE_MB": "lots"})
    assert "output cache    ERROR: VPFAST_CPU_OUTPUT_CACHE_MB must be a whole number" in r.stdout
    assert r.returncode != 0 and "VPFAST_CPU_OUTPUT_CACHE_MB must be a whole number" in r.stderr
