"""`vpfast bench [OP ...]`: run the pytest-benchmark suites and print one comparison table.

For every benchmark group (op, shape, mode) it lists each provider's median time, the ratio against the
eager torch reference measured in the same run, the paired ratio (median over rounds that alternate the
providers, see benchmarks/conftest.py; robust to the machine's drift between the separate timings),
achieved GB/s or GFLOP/s, and peak extra memory.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def grad_step(fn, args):
    """A step that runs fn(*args) and the gradients of every input that requires grad.

    The incoming gradients are fixed random tensors and the results are returned, not accumulated into
    `.grad`: that is how a network runs the op's backward. (`out.sum().backward()` would feed expanded
    constant gradients and add a read-modify-write of every leaf's `.grad` to each call.)
    """
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.no_grad():
        outs = fn(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator().manual_seed(123)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]

    def step():
        return torch.autograd.grad(fn(*args), leaves, grads)
    return step


def _timed(fn, repeats: int) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def paired_rounds(entries: dict, rounds: int, min_time: float = 0.02) -> dict:
    """Time every fn of {provider: fn} once per round, alternating providers (order reversed every other
    round), for `rounds` rounds.

    Returns {provider: (median over rounds of t_eager / t_provider, median seconds per call)}; the ratio is
    nan when there is no "eager" entry. Each timing repeats fn until it spans about min_time seconds, so that
    calls of microseconds are not timer noise. Ratios taken within a round cancel the machine's slow drift,
    which two medians measured minutes apart do not.
    """
    if rounds < 1:
        raise ValueError(f"paired_rounds: rounds must be >= 1, got {rounds}")
    names = list(entries)
    reps = {n: max(1, int(min_time / max(_timed(entries[n], 1), 1e-6))) for n in names}
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(_timed(entries[n], reps[n]))
    base = times.get("eager")
    out = {}
    for n in names:
        ratio = statistics.median(b / t for b, t in zip(base, times[n])) if base else float("nan")
        out[n] = (ratio, statistics.median(times[n]))
    return out


def providers(op):
    """pytest params for a suite's providers: eager and compile (the reference), then cpp and cuda, each
    skipped with the op's reasons when that backend cannot run here."""
    import pytest

    out = [pytest.param("eager", id="eager"), pytest.param("compile", id="compile")]
    for b in ("cpp", "cuda"):
        why = op.static_reasons(b)
        out.append(pytest.param(b, id=b, marks=[pytest.mark.skip(reason="; ".join(why))] if why else []))
    return out


def suites_dir() -> str:
    from . import benchmarks

    return os.path.dirname(benchmarks.__file__)


def run(ops: list[str], quick: bool = False, extra: list[str] | None = None,
        paired_rounds: int | None = None) -> int:
    root = suites_dir()
    available = sorted(f[len("test_bench_"):-3] for f in os.listdir(root)
                       if f.startswith("test_bench_") and f.endswith(".py"))
    ops = ops or available
    unknown = [o for o in ops if o not in available]
    if unknown:
        print(f"vpfast bench: unknown suite(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={root}",
               f"--benchmark-json={out}", "--benchmark-sort=name"]
        if quick:
            cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"]
        if paired_rounds is None and quick:
            paired_rounds = 3
        if paired_rounds is not None:
            if paired_rounds < 0:
                print(f"vpfast bench: --paired-rounds must be >= 0, got {paired_rounds}", file=sys.stderr)
                return 2
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
    print(table(data["benchmarks"]))
    return code


def table(benchmarks: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    lines = []
    header = (f"  {'provider':14s} {'median':>10s} {'vs eager':>9s} {'paired':>8s} {'GB/s':>8s} {'GFLOP/s':>8s} "
              f"{'peak MiB':>9s}")
    for group in sorted(groups):
        rows = groups[group]
        base = next((r["stats"]["median"] for r in rows if r["extra_info"].get("provider") == "eager"), None)
        lines += ["", group, header]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            t = r["stats"]["median"]
            info = r["extra_info"]
            ratio = f"{base / t:8.2f}x" if base else "        -"
            paired = info.get("paired_vs_eager", 1.0 if info.get("provider") == "eager" and
                              "paired_rounds" in info else None)
            paired = f"{paired:7.2f}x" if paired is not None else "       -"
            gbs = f"{info['gbytes'] / t:8.1f}" if "gbytes" in info else "       -"
            gfl = f"{info['gflops'] / t:8.1f}" if "gflops" in info else "       -"
            mem = f"{info['peak_mb']:9.1f}" if "peak_mb" in info else "        -"
            name = info.get("provider", r["name"])
            lines.append(f"  {name:14s} {t * 1e3:8.3f}ms {ratio} {paired} {gbs} {gfl} {mem}")
    return "\n".join(lines)
