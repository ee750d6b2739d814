"""Shared pieces of the benchmark suites.

Conventions read by `vpfast bench` (vpfast/bench.py): each benchmark sets `benchmark.group` (shape and mode),
`benchmark.extra_info["provider"]` ("eager" is the baseline the ratios are taken against, "compile" the second
one), and optionally "gbytes" / "gflops" (work per call) and "peak_mb" (peak extra memory of one call).

Device and dtype (`--device cpu|cuda`, `--dtype float32|bfloat16|float16|float64`): suites build their inputs
on the CPU with seeded generators and pass them through `record.to(t, grad)`, which moves them to the device
and casts floating tensors to the dtype (model suites move the model and run under `record.autocast()`
instead: mixed precision is how models train). Providers tied to the other device are deselected: on the CPU
the cpp backend is timed, on CUDA the cuda and triton backends. On CUDA the clock is CUDA events
(`vpfast.bench.cuda_event_timer`, set as pytest-benchmark's timer: each timing waits for the queued work),
every provider gets warm-up calls first, each timed round spans at least CUDA_MIN_ROUND_S (several calls
queued back to back, as in a training loop), and peak memory comes from torch.cuda.max_memory_allocated.
Steps must not build tensors on the CPU per call on a GPU run (a host allocation and copy per call timed
~15 ms on the H200 machine): build incoming gradients once or on the device.

Paired rounds (`--paired-rounds=N`, default 5, 0 turns them off): pytest-benchmark times one provider after
another, and on a shared VM whose speed drifts by 2x within minutes the ratio of two medians taken a minute
apart measures the drift as much as the code. So after the last provider of a group has run, every provider
that ran is timed again in N rounds that alternate between them (order reversed every other round), and each
non-eager result gets "paired_vs_eager": the median over rounds of t_eager / t_provider from the same round.
"""
import contextlib
import os

import pytest
import torch

from vpfast._dispatch import BackendUnavailable
from vpfast.bench import (device_error, device_name, paired_rounds, parse_dtype, peak_extra_mb, provider_device,
                          synchronize)
from vpfast.testing import private_compile_cache

private_compile_cache()

CUDA_WARMUP = 3  # calls before timing on a GPU (compilation, autotuning, allocator caches, clocks)
# least span of one timed round on a GPU: a round of a single call between two synchronisations exposes the
# CPU's launch latency of its first kernels (a Triton fwd+bwd of 0.8 ms pipelined read 1.3 ms alone on an
# H200), which a training loop hides by queueing ahead; rounds of several calls time what the loop sees
CUDA_MIN_ROUND_S = 0.005


class Recorder:
    """The `record` fixture: record(provider, fn, gbytes=None, gflops=None, memory=True) benchmarks fn and
    annotates the result; .device / .dtype are what this run measures, .to() and .autocast() build inputs."""

    def __init__(self, benchmark, request):
        self.benchmark = benchmark
        self.request = request
        self.device = request.config.getoption("device")
        self.dtype = parse_dtype(request.config.getoption("dtype"))

    def to(self, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """t on this run's device, floating tensors in its dtype, as a leaf that requires grad if `grad`.

        t: Tensor[*] (built on the CPU) -> Tensor[*] (strides and memory format kept)
        """
        dtype = self.dtype if t.is_floating_point() else t.dtype
        return t.detach().to(device=self.device, dtype=dtype).requires_grad_(grad)

    def autocast(self):
        """torch.autocast at this run's dtype for half types (model suites: float32 weights, mixed precision),
        else a no-op context."""
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device, dtype=self.dtype)
        return contextlib.nullcontext()

    def __call__(self, provider, fn, gbytes=None, gflops=None, memory=True):
        benchmark, request = self.benchmark, self.request
        try:
            fn()  # warm-up (torch.compile compiles here)
        except BackendUnavailable as e:  # e.g. a backend that does not take this dtype
            pytest.skip(str(e))
        except (RuntimeError, NotImplementedError) as e:
            if "not implemented for" not in str(e):  # a peer (torchvision) without a kernel for this dtype
                raise
            pytest.skip(str(e).splitlines()[0])
        if self.device == "cuda":
            for _ in range(CUDA_WARMUP - 1):
                fn()
            synchronize(self.device)
        info = benchmark.extra_info
        info["provider"] = provider
        info["device"] = self.device
        info["dtype"] = str(self.dtype).split(".")[-1]
        if gbytes is not None:
            info["gbytes"] = gbytes
        if gflops is not None:
            info["gflops"] = gflops
        if memory and not benchmark.disabled:
            info["peak_mb"] = peak_extra_mb(fn, self.device)
        result = benchmark(fn)
        key = getattr(request.node, "_paired_key", None)
        if key is not None and not benchmark.disabled and request.config.getoption("paired_rounds") > 0:
            _PAIRED.setdefault(key, {})[provider] = (fn, info)
        return result


# pairing key of the running test -> {provider: (fn, extra_info)}, filled by `record`, emptied after the
# group's last test (see paired_rounds)
_PAIRED: dict = {}


@pytest.fixture
def record(benchmark, request):
    """record(provider, fn, gbytes=None, gflops=None, memory=True): benchmark fn and annotate the result;
    record.to(t, grad) / record.autocast() / record.device / record.dtype: this run's device and dtype."""
    return Recorder(benchmark, request)


def pytest_addoption(parser):
    parser.addoption("--paired-rounds", type=int, default=5,
                     help="vpfast: after each benchmark group, time its providers again in this many alternating "
                          "rounds and record the paired ratio against eager (0: off)")
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="vpfast: device the inputs are built on; cuda times the cuda and triton backends with "
                          "CUDA events, cpu the cpp backend")
    parser.addoption("--dtype", default="float32",
                     help="vpfast: dtype of the op suites' inputs (float32, bfloat16, float16, float64); model "
                          "suites run under autocast at a half type")


def pytest_runtest_teardown(item):
    if not getattr(item, "_paired_last", False):
        return
    group = _PAIRED.pop(item._paired_key, {})
    if "eager" not in group or len(group) < 2:
        return
    rounds = item.config.getoption("paired_rounds")
    device = item.config.getoption("device")
    results = paired_rounds({n: fn for n, (fn, _) in group.items()}, rounds, device=device)
    for provider, (ratio, seconds) in results.items():
        info = group[provider][1]
        info["paired_rounds"] = rounds
        info["paired_median_s"] = seconds
        if provider != "eager":
            info["paired_vs_eager"] = ratio


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure reads its timer option
def pytest_configure(config):
    device = config.getoption("device")
    why = device_error(device)
    if why:
        raise pytest.UsageError(f"--device {device}: {why}")
    try:
        parse_dtype(config.getoption("dtype"))
    except ValueError as e:
        raise pytest.UsageError(f"--dtype: {e}") from None
    if device == "cuda":
        # kernels are queued asynchronously: a CPU clock would time the launches, not the work
        config.option.benchmark_timer = "vpfast.bench.cuda_event_timer"
        current = float(config.getoption("benchmark_min_time", default="0") or 0)
        config.option.benchmark_min_time = str(max(current, CUDA_MIN_ROUND_S))
    # one compiled graph per provider and shape; the default cache is too small for a whole suite
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    os.environ.setdefault("VPFAST_QUIET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name what was measured in the JSON (vpfast bench prints it as the table's header)."""
    from vpfast.info import _triton_version

    device = config.getoption("device")
    machine_info["vpfast"] = {
        "device": device, "device_name": device_name(device),
        "dtype": str(parse_dtype(config.getoption("dtype"))).split(".")[-1],
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
    }


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


def _deselect_other_device(config, items):
    # a provider tied to a backend of the other device (cpp on a GPU run, cuda/triton on a CPU run) is not
    # part of this run's comparison
    device = config.getoption("device")
    keep, dropped = [], []
    for item in items:
        provider = getattr(getattr(item, "callspec", None), "params", {}).get("provider")
        tied = provider_device(provider) if isinstance(provider, str) else None
        (dropped if tied not in (None, device) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With --benchmark-disable (CI's smoke run) compile each file's reference once, not once per shape.

    torch.compile costs tens of seconds per graph on this CPU; one compiled case per suite keeps that path
    working, the rest of the compile cases only matter when timing. (Runs last, after -k and the like, so
    that the pairing groups below see the tests that will run.)
    """
    _deselect_other_device(config, items)
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
