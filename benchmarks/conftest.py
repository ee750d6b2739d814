"""Shared pieces of the benchmark suites.

Conventions read by `vpfast bench` (vpfast/bench.py): each benchmark sets `benchmark.group` (shape and mode),
`benchmark.extra_info["provider"]` ("eager" is the baseline the ratios are taken against), and optionally
"gbytes" / "gflops" (work per call) and "peak_mb" (peak extra memory of one call).

Paired rounds (`--paired-rounds=N`, default 5, 0 turns them off): pytest-benchmark times one provider after
another, and on a shared VM whose speed drifts by 2x within minutes the ratio of two medians taken a minute
apart measures the drift as much as the code. So after the last provider of a group has run, every provider
that ran is timed again in N rounds that alternate between them (order reversed every other round), and each
non-eager result gets "paired_vs_eager": the median over rounds of t_eager / t_provider from the same round.
"""
import os

import pytest
import torch

from vpfast.bench import paired_rounds
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


# pairing key of the running test -> {provider: (fn, extra_info)}, filled by `record`, emptied after the
# group's last test (see paired_rounds)
_PAIRED: dict = {}


@pytest.fixture
def record(benchmark, request):
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
        result = benchmark(fn)
        key = getattr(request.node, "_paired_key", None)
        if key is not None and not benchmark.disabled and request.config.getoption("paired_rounds") > 0:
            _PAIRED.setdefault(key, {})[provider] = (fn, info)
        return result

    return run


def pytest_addoption(parser):
    parser.addoption("--paired-rounds", type=int, default=5,
                     help="vpfast: after each benchmark group, time its providers again in this many alternating "
                          "rounds and record the paired ratio against eager (0: off)")


def pytest_runtest_teardown(item):
    if not getattr(item, "_paired_last", False):
        return
    group = _PAIRED.pop(item._paired_key, {})
    if "eager" not in group or len(group) < 2:
        return
    rounds = item.config.getoption("paired_rounds")
    for provider, (ratio, seconds) in paired_rounds({n: fn for n, (fn, _) in group.items()}, rounds).items():
        info = group[provider][1]
        info["paired_rounds"] = rounds
        info["paired_median_s"] = seconds
        if provider != "eager":
            info["paired_vs_eager"] = ratio


def pytest_configure(config):
    # one compiled graph per provider and shape; the default cache is too small for a whole suite
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    os.environ.setdefault("VPFAST_QUIET", "1")


def _mark_paired_groups(items):
    # tests that differ only in their provider form one pairing group; the last of them (in run order) times
    # the group's providers in alternating rounds when it tears down
    last = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", None)
        if not params or "provider" not in params:
            continue
        item._paired_key = (str(item.path), item.originalname,
                            tuple(sorted((k, repr(v)) for k, v in params.items() if k != "provider")))
        last[item._paired_key] = item
    for item in last.values():
        item._paired_last = True


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With --benchmark-disable (CI's smoke run) compile each file's reference once, not once per shape.

    torch.compile costs tens of seconds per graph on this CPU; one compiled case per suite keeps that path
    working, the rest of the compile cases only matter when timing. (Runs last, after -k and the like, so
    that the pairing groups below see the tests that will run.)
    """
    if not config.getoption("benchmark_disable", default=False):
        _mark_paired_groups(items)
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
