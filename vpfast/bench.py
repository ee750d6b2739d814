"""`vpfast bench [OP ...] [--device cuda] [--dtype bfloat16]`: run the pytest-benchmark suites and print one
comparison table.

For every benchmark group (op, shape, mode) it lists each provider's median time, the ratios against the eager
torch reference and against the reference under torch.compile measured in the same run, the paired ratio
(median over rounds that alternate the providers, see benchmarks/conftest.py; robust to the machine's drift
between the separate timings), achieved GB/s or GFLOP/s, and peak extra memory. The table's header names the
device and dtype the numbers were measured on.

On a GPU (`--device cuda`) every input is built on the GPU, times are read from CUDA events (each timing
synchronises the device, after warm-up calls; the table shows medians), peak memory from
torch.cuda.max_memory_allocated, and the providers are eager, compile and the GPU backends (cuda, triton): the
cpp backend is not timed there, as the GPU backends are not timed on the CPU.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# the device each fused backend takes its tensors on; providers not listed (eager, compile, peers such as
# torchvision, a whole model) run wherever their inputs are
BACKEND_DEVICE = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """"float32" / "bfloat16" / "float16" / "float64" (or a torch.dtype) -> torch.dtype; ValueError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64",
           "double": "float64", "float": "float32"}.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def device_error(device: str) -> str | None:
    """Why `device` ("cpu" or "cuda") cannot be benchmarked here, or None."""
    if device not in DEVICES:
        return f"device must be one of {', '.join(DEVICES)}, got {device!r}"
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        return f"no CUDA device is available (torch {torch.__version__}, {build})"
    return None


def device_name(device: str) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model}, {n} thread{'' if n == 1 else 's'}"


def backend_of(provider: str) -> str:
    """The vpfast backend a benchmark provider runs: "torch" for the references (eager, compile), else the
    provider's name up to a variant suffix ("cuda_sep" -> "cuda")."""
    return "torch" if provider in ("eager", "compile") else provider.split("_")[0]


def provider_device(provider: str) -> str | None:
    """The device a provider is tied to ("cpu" for cpp, "cuda" for cuda and triton), None if it runs on any."""
    return BACKEND_DEVICE.get(backend_of(provider))


# ---- timing ---------------------------------------------------------------------------------------------
class CudaEventTimer:
    """A clock (seconds, like time.perf_counter) read from CUDA events on the current stream.

    Each call records an event and waits for it, so the difference of two calls is the GPU time of the work
    queued between them (kernels, and the gaps where the GPU waited for the CPU to launch them). Event
    intervals are single-precision milliseconds: the clock adds up the intervals between consecutive calls in
    double precision instead of measuring from a fixed origin, whose float32 distance would lose microseconds
    after a few minutes.
    """

    def __init__(self, name: str = "cuda_event_timer"):
        self.__name__ = name  # pytest-benchmark records its timer as module.__name__
        self._prev = None
        self._elapsed = 0.0

    def __call__(self) -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self._prev is not None:
            self._elapsed += self._prev.elapsed_time(ev) / 1e3
        self._prev = ev
        return self._elapsed


# pytest-benchmark's --benchmark-timer takes a module attribute: `vpfast.bench.cuda_event_timer`
cuda_event_timer = CudaEventTimer()


def timer_for(device: str):
    """A clock in seconds for work on `device`: CUDA events for "cuda", time.perf_counter for the CPU."""
    if device == "cuda":
        return cuda_event_timer
    return time.perf_counter


def synchronize(device: str) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str = "cpu", warmup: int = 3, reps: int = 20, min_time: float = 0.0) -> list[float]:
    """Seconds per call of fn on `device`, one entry per timed repetition (take the median).

    warmup calls run first (compilation, autotuning, caches), then `reps` timings; each timing repeats fn until
    it spans about min_time seconds and divides, so that calls of microseconds are not timer resolution.
    On the GPU the clock is CUDA events (timer_for), which waits for the queued work.
    """
    if reps < 1:
        raise ValueError(f"measure: reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    clock = timer_for(device)
    synchronize(device)
    inner = 1
    if min_time > 0:  # sized from a few queued calls: one call alone pays the launch latency after a sync
        inner = max(1, int(min_time / max(_timed(fn, 3, clock), 1e-7)))
    return [_timed(fn, inner, clock) for _ in range(reps)]


def peak_extra_mb(fn, device: str = "cpu") -> float:
    """Peak memory allocated by one call of fn on `device`, over what was live before, in MiB.

    CUDA: the caching allocator's max_memory_allocated after a reset, minus memory_allocated before. CPU: read
    from the profiler's allocation events (the CPU allocator has no peak counter of its own).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base) / 2**20
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


def grad_step(fn, args):
    """A step that runs fn(*args) and the gradients of every input that requires grad.

    The incoming gradients are fixed random tensors (on the outputs' device, in their dtype) and the results
    are returned, not accumulated into `.grad`: that is how a network runs the op's backward.
    (`out.sum().backward()` would feed expanded constant gradients and add a read-modify-write of every leaf's
    `.grad` to each call.)
    """
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.no_grad():
        outs = fn(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator().manual_seed(123)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]

    def step():
        return torch.autograd.grad(fn(*args), leaves, grads)
    return step


def op_step(fn, args, train: bool):
    """What a benchmark times for an op: `grad_step(fn, args)` when train (forward and backward), else fn(*args)
    under no_grad (forward only)."""
    if train:
        return grad_step(fn, args)

    def step():
        with torch.no_grad():
            return fn(*args)
    return step


def _timed(fn, repeats: int, clock=time.perf_counter) -> float:
    t = clock()
    for _ in range(repeats):
        fn()
    return (clock() - t) / repeats


def paired_rounds(entries: dict, rounds: int, min_time: float = 0.02, device: str = "cpu") -> dict:
    """Time every fn of {provider: fn} once per round, alternating providers (order reversed every other
    round), for `rounds` rounds.

    Returns {provider: (median over rounds of t_eager / t_provider, median seconds per call)}; the ratio is
    nan when there is no "eager" entry. Each timing repeats fn until it spans about min_time seconds, so that
    calls of microseconds are not timer noise. Ratios taken within a round cancel the machine's slow drift,
    which two medians measured minutes apart do not. On "cuda" the clock is CUDA events.
    """
    if rounds < 1:
        raise ValueError(f"paired_rounds: rounds must be >= 1, got {rounds}")
    clock = timer_for(device)
    synchronize(device)
    names = list(entries)
    reps = {n: max(1, int(min_time / max(_timed(entries[n], 1, clock), 1e-6))) for n in names}
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(_timed(entries[n], reps[n], clock))
    base = times.get("eager")
    out = {}
    for n in names:
        ratio = statistics.median(b / t for b, t in zip(base, times[n])) if base else float("nan")
        out[n] = (ratio, statistics.median(times[n]))
    return out


def providers(op, sep: bool = False):
    """pytest params for a suite's providers: eager and compile (the reference), then each fused backend (cpp,
    cuda, triton; with sep=True also a "<backend>_sep" variant each), skipped with the op's reasons when that
    backend cannot run here. benchmarks/conftest.py keeps those of the device being measured."""
    import pytest

    out = [pytest.param("eager", id="eager"), pytest.param("compile", id="compile")]
    for b in ("cpp", "cuda", "triton"):
        why = op.static_reasons(b)
        marks = [pytest.mark.skip(reason="; ".join(why))] if why else []
        out.append(pytest.param(b, id=b, marks=marks))
        if sep:
            out.append(pytest.param(b + "_sep", id=b + "_sep", marks=marks))
    return out


def suites_dir() -> str:
    """The benchmark suites: benchmarks/ beside the package in a source checkout (so that a checkout runs its
    own suites, whichever copy an editable install points vpfast.benchmarks at), else the installed
    vpfast.benchmarks."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if os.path.isfile(os.path.join(here, "conftest.py")) and os.path.isfile(os.path.join(here, "test_bench_ddr_loss.py")):
        return here
    from . import benchmarks

    return os.path.dirname(benchmarks.__file__)


def run(ops: list[str], quick: bool = False, extra: list[str] | None = None,
        paired_rounds: int | None = None, device: str = "cpu", dtype: str = "float32") -> int:
    root = suites_dir()
    available = sorted(f[len("test_bench_"):-3] for f in os.listdir(root)
                       if f.startswith("test_bench_") and f.endswith(".py"))
    ops = ops or available
    unknown = [o for o in ops if o not in available]
    if unknown:
        print(f"vpfast bench: unknown suite(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    if paired_rounds is not None and paired_rounds < 0:
        print(f"vpfast bench: --paired-rounds must be >= 0, got {paired_rounds}", file=sys.stderr)
        return 2
    why = device_error(device)
    if why:
        print(f"vpfast bench: --device {device}: {why}", file=sys.stderr)
        return 2
    try:
        dt = parse_dtype(dtype)
    except ValueError as e:
        print(f"vpfast bench: --dtype: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={root}",
               f"--benchmark-json={out}", "--benchmark-sort=name"]
        if device != "cpu" or dt != torch.float32:
            cmd += [f"--device={device}", f"--dtype={str(dt).split('.')[-1]}"]
        if quick:
            cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"]
        if paired_rounds is None and quick:
            paired_rounds = 3
        if paired_rounds is not None:
            cmd.append(f"--paired-rounds={paired_rounds}")
        cmd += [os.path.join(root, f"test_bench_{o}.py") for o in ops] + list(extra or [])
        print("running:", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, stdout=subprocess.DEVNULL if not os.environ.get("VPFAST_BENCH_VERBOSE")
                               else None)
        if not os.path.exists(out):
            print(f"vpfast bench: pytest exited with {code} and wrote no results", file=sys.stderr)
            return code or 1
        with open(out) as f:
            data = json.load(f)
    print(table(data["benchmarks"], data.get("machine_info"), quick=quick))
    return code


# a provider whose ratio to eager from the separate medians and from the paired rounds differ by more than this
# factor was timed while the machine's speed changed (other jobs, frequency scaling): the row is flagged
DISAGREE = 1.5
QUICK_NOTE = ("quick run (--quick): a smoke run of the suites with few timing rounds. On a busy machine its "
              "ratios can be off by several times; run `vpfast bench` without --quick for numbers to quote.")
DISAGREE_NOTE = (f"! the plain ratio (separate medians, 'vs eager') and the paired ratio (alternating rounds) differ "
                 f"by more than {DISAGREE}x: the machine's speed changed while this ran. Trust neither without a "
                 f"rerun; the paired ratio is the more robust (more rounds: --paired-rounds N).")


def _header(machine_info: dict | None) -> str | None:
    info = (machine_info or {}).get("vpfast")
    if not info:
        return None
    return (f"device: {info.get('device_name')} ({info.get('device')}), dtype {info.get('dtype')}, "
            f"torch {info.get('torch')}, triton {info.get('triton')}")


def table(benchmarks: list[dict], machine_info: dict | None = None, quick: bool = False) -> str:
    """The comparison table of a pytest-benchmark JSON's "benchmarks" (and its "machine_info", whose "vpfast"
    entry, written by benchmarks/conftest.py, names the device in the header). quick: say that the numbers come
    from a smoke run. Rows whose plain and paired ratios disagree are flagged with "!" and explained below."""
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    head = _header(machine_info)
    lines = ([QUICK_NOTE] if quick else []) + ([head] if head else [])
    flagged = 0
    header = (f"  {'provider':14s} {'median':>10s} {'vs eager':>9s} {'vs compile':>10s} {'paired':>8s} "
              f"{'GB/s':>8s} {'GFLOP/s':>8s} {'peak MiB':>9s}")

    def median_of(rows, provider):
        return next((r["stats"]["median"] for r in rows if r["extra_info"].get("provider") == provider), None)

    for group in sorted(groups):
        rows = groups[group]
        base, comp = median_of(rows, "eager"), median_of(rows, "compile")
        lines += ["", group, header]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            t = r["stats"]["median"]
            info = r["extra_info"]
            ratio = f"{base / t:8.2f}x" if base else "        -"
            vs_comp = f"{comp / t:9.2f}x" if comp else "         -"
            paired = info.get("paired_vs_eager", 1.0 if info.get("provider") == "eager" and
                              "paired_rounds" in info else None)
            flag = " "
            if paired is not None and base and paired > 0 and max(base / t / paired, paired * t / base) > DISAGREE:
                flag, flagged = "!", flagged + 1
            paired = f"{paired:7.2f}x" if paired is not None else "       -"
            gbs = f"{info['gbytes'] / t:8.1f}" if "gbytes" in info else "       -"
            gfl = f"{info['gflops'] / t:8.1f}" if "gflops" in info else "       -"
            mem = f"{info['peak_mb']:9.1f}" if "peak_mb" in info else "        -"
            name = info.get("provider", r["name"])
            lines.append(f"  {name:14s} {t * 1e3:8.3f}ms {ratio} {vs_comp} {paired}{flag}{gbs} {gfl} {mem}")
    if flagged:
        lines += ["", DISAGREE_NOTE]
    return "\n".join(lines)
