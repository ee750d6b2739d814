"""Shared pieces of the benchmark suites.

Conventions read by `vpfast bench` (vpfast/bench.py): each benchmark sets `benchmark.group` (shape and mode),
`benchmark.extra_info["provider"]` ("eager" is the baseline the ratios are taken against), and optionally
"gbytes" / "gflops" (work per call) and "peak_mb" (peak extra memory of one call).
"""
import os

import pytest
import torch

from vpfast.testing import private_compile_cache

private_compile_cache()


def peak_extra_mb(fn) -> float:
    """Peak memory allocated by one call of fn on the CPU, over what was live before, in MiB.

    Read from the profiler's allocation events (the CPU allocator has no peak counter of its own).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak / 2**20


@pytest.fixture
def record(benchmark):
    """record(provider, fn, gbytes=None, gflops=None, memory=True): benchmark fn and annotate the result."""

    def run(provider, fn, gbytes=None, gflops=None, memory=True):
        fn()  # warm-up (torch.compile compiles here)
        info = benchmark.extra_info
        info["provider"] = provider
        if gbytes is not None:
            info["gbytes"] = gbytes
        if gflops is not None:
            info["gflops"] = gflops
        if memory and not benchmark.disabled:
            info["peak_mb"] = peak_extra_mb(fn)
        return benchmark(fn)

    return run


def pytest_configure(config):
    # one compiled graph per provider and shape; the default cache is too small for a whole suite
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    os.environ.setdefault("VPFAST_QUIET", "1")


def pytest_collection_modifyitems(config, items):
    """With --benchmark-disable (CI's smoke run) compile each file's reference once, not once per shape.

    torch.compile costs tens of seconds per graph on this CPU; one compiled case per suite keeps that path
    working, the rest of the compile cases only matter when timing.
    """
    if not config.getoption("benchmark_disable", default=False):
        return
    seen, keep, dropped = set(), [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("provider") == "compile":
            key = item.path
            if key in seen:
                dropped.append(item)
                continue
            seen.add(key)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
