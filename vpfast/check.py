"""`python -m vpfast.check --device cuda`: one command that says whether vpfast works on this machine's GPU, and
how fast.

1. The device's tests: pytest on the repository's tests/ (a source checkout), selecting the parametrisations
   that run there: on cuda `-k "cuda or triton or gpu"` (the cuda and triton backends, which get CUDA tensors
   when a GPU is present, and the GPU-only tests, whose names say cuda or gpu); on cpu `-k cpp` (the compiled
   CPU kernels). pytest-xdist spreads them over processes on a GPU machine when it is installed.
2. A short benchmark table: each op's forward+backward at the models' shapes (tiny shapes on the CPU), for
   the eager torch reference and each backend of the device (cuda and triton; cpp on the CPU), in float32
   and bfloat16 on a GPU: median time, ratio = eager time / backend time, nominal GB/s, what auto picks.
3. A summary, printed last: device, versions, test counts and failures, the table, and flags: every op for
   which auto's choice is slower than the torch reference, and every backend that raised. The same results
   go to a JSON file (--out, default vpfast-check-<device>.json) for pasting numbers into notes.

Exit status: 0 when no test failed and no backend raised, 1 otherwise (a flagged auto choice is reported,
not failed), 2 for a device that is not there.

GB/s is a nominal minimum traffic over the median time: every input read twice (forward and backward), every
output written and its gradient read, every input gradient written; it ignores what a kernel re-reads or
saves, so it is a floor-based rate to set against the device's copy bandwidth, not a measured one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import bench

GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
TEST_SELECTION = {"cuda": "cuda or triton or gpu", "cpu": "cpp"}
DEFAULT_DTYPES = {"cuda": ("float32", "bfloat16"), "cpu": ("float32",)}
# timing: warm-up calls, timed repetitions (median taken), and the least time one repetition spans
# (a timing of several queued calls, as in a training loop: one call alone after a sync also times the CPU's
# launch latency, 1.3 ms instead of 0.8 ms for a Triton fwd+bwd on an H200)
TIMING = {"full": (5, 25, 5e-3), "quick": (2, 7, 2e-3)}


# ---- benchmark cases --------------------------------------------------------------------------------------
@dataclass
class Case:
    """One op at one shape: `call(backend, *tensors)` runs the public op (returns its differentiable outputs);
    `inputs(tiny)` builds [(cpu tensor, requires_grad)] with a seeded generator; `op` names the Op whose
    auto choice is reported."""

    name: str
    op: str
    shape: str
    tiny_shape: str
    call: Callable
    inputs: Callable
    backends: tuple = field(default=())


def _gen():
    return torch.Generator().manual_seed(0)


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _cases() -> list[Case]:
    from . import ops
    from .ops import stlstm as S

    out = []

    def ddr(tiny):
        g = _gen()
        s = (2, 4, 1, 8, 8) if tiny else (16, 10, 3, 128, 128)
        return [(torch.rand(s, generator=g), True), (torch.rand(s, generator=g), False)]

    out.append(Case("ddr_loss", "ddr_loss", "(16,10,3,128,128)", "(2,4,1,8,8)",
                    lambda b, p, y: ops.ddr_loss(p, y, backend=b), ddr))

    for label, k, d in (("5x5", 5, 1), ("7x7 d3", 7, 3), ("21x21", 21, 1)):
        def dw(tiny, k=k):
            g = _gen()
            B, C, H, W = (2, 8, 12, 12) if tiny else (16, 512, 16, 16)
            return [(_randn(g, B, C, H, W), True), (_randn(g, C, 1, k, k, scale=0.1), True),
                    (_randn(g, C, scale=0.1), True)]

        out.append(Case(f"depthwise_conv2d {label}", "depthwise_conv2d", "(16,512,16,16)", "(2,8,12,12)",
                        lambda b, x, w, bias, d=d: ops.depthwise_conv2d(x, w, bias, dilation=d, backend=b), dw))

    def lka(tiny):
        g = _gen()
        B, C, H, W = (2, 8, 12, 12) if tiny else (16, 512, 16, 16)
        return [(_randn(g, B, C, H, W), True), (_randn(g, C, 1, 5, 5, scale=0.1), True), (_randn(g, C, scale=0.1), True),
                (_randn(g, C, 1, 7, 7, scale=0.1), True), (_randn(g, C, scale=0.1), True)]

    out.append(Case("large_kernel_attention 5x5+7x7 d3", "large_kernel_attention", "(16,512,16,16)",
                    "(2,8,12,12)", lambda b, *a: ops.large_kernel_attention(*a, dilation=3, backend=b), lka))

    def gn(tiny):
        g = _gen()
        N, C, H, W = (4, 8, 8, 8) if tiny else (160, 64, 64, 64)
        return [(_randn(g, N, C, H, W), True), (1 + _randn(g, C, scale=0.1), True), (_randn(g, C, scale=0.1), True)]

    out.append(Case("group_norm_silu 2 groups", "group_norm_silu", "(160,64,64,64)", "(4,8,8,8)",
                    lambda b, x, w, bias: ops.group_norm_silu(x, 2, w, bias, backend=b), gn))

    for mode in ("zeros", "border"):
        def fw(tiny):
            g = _gen()
            B, C, H, W = (2, 4, 8, 8) if tiny else (16, 64, 64, 64)
            return [(_randn(g, B, C, H, W), True), (_randn(g, B, 2, H, W, scale=3.0), True)]

        out.append(Case(f"flow_warp {mode}", "flow_warp", "(16,64,64,64)", "(2,4,8,8)",
                        lambda b, x, f, mode=mode: ops.flow_warp(x, f, mode, backend=b), fw))

    def dfw(tiny):
        g = _gen()
        B, C, H, W = (2, 4, 8, 8) if tiny else (8, 64, 64, 64)
        return [(_randn(g, B, C, H, W), True), (_randn(g, B, 18, H, W, scale=1.5), True),
                (torch.rand(B, 9, H, W, generator=g), True), (_randn(g, C, C, 3, 3, scale=1.0 / (3 * C)), True)]

    out.append(Case("deform_warp k=3", "deform_warp", "(8,64,64,64)", "(2,4,8,8)",
                    lambda b, *a: ops.deform_warp(*a, backend=b), dfw))

    def mg(tiny):
        g = _gen()
        B, Cin, M, H, W = (2, 4, 3, 6, 6) if tiny else (16, 64, 18, 16, 16)
        t = [(_randn(g, B, Cin, H, W), True), (_randn(g, B, M, H, W), True), (_randn(g, B, M, H, W), True)]
        for _ in range(3):
            t += [(_randn(g, M, Cin + M, 3, 3, scale=0.05), True), (_randn(g, M, scale=0.1), True)]
        return t

    out.append(Case("motion_gru k=3", "motion_gru", "B16 64->18 16x16", "B2 4->3 6x6",
                    lambda b, *a: ops.motion_gru(*a, backend=b), mg))

    def gates(tiny):
        g = _gen()
        B, C, H, W = (2, 4, 6, 6) if tiny else (16, 128, 16, 16)
        return [(_randn(g, B, n * C, H, W, scale=0.5), True) for n in (7, 4, 3, 1, 1)]

    out.append(Case("stlstm_gates", "stlstm_gates", "B16 C128 16x16", "B2 C4 6x6",
                    lambda b, *a: S.stlstm_gates(*a, 1.0, False, backend=b)[:2], gates))

    def output(tiny):
        g = _gen()
        B, C, H, W = (2, 4, 6, 6) if tiny else (16, 128, 16, 16)
        return [(_randn(g, B, C, H, W, scale=0.5), True) for _ in range(3)]

    out.append(Case("stlstm_output", "stlstm_output", "B16 C128 16x16", "B2 C4 6x6",
                    lambda b, *a: S.stlstm_output(*a, backend=b), output))

    from .ops import causal_lstm as CL

    def causal_maps(*ks):
        def make(tiny):
            g = _gen()
            B, C, H, W = (2, 4, 6, 6) if tiny else (16, 128, 16, 16)
            return [(_randn(g, B, n * C, H, W, scale=0.5), True) for n in ks]
        return make

    # PredRNN++'s Moving-MNIST cell (C=128) at B=16, separate convolutions (its merge is off at that size)
    for name, ks, fn in (("causal_lstm_cell", (7, 4, 3, 1), lambda b, *a: CL.causal_lstm_cell(*a, backend=b)),
                         ("causal_lstm_memory", (4, 3, 4), lambda b, *a: CL.causal_lstm_memory(*a, backend=b)),
                         ("causal_lstm_output", (1, 1, 1), lambda b, *a: CL.causal_lstm_output(*a, backend=b))):
        out.append(Case(name, name, "B16 C128 16x16", "B2 C4 6x6", fn, causal_maps(*ks)))

    def cl(tiny):
        g = _gen()
        B, C, H, W = (2, 4, 6, 6) if tiny else (16, 128, 16, 16)
        return [(_randn(g, B, n * C, H, W, scale=0.5), True) for n in (4, 4, 1)]

    out.append(Case("convlstm", "convlstm", "B16 C128 16x16", "B2 C4 6x6",
                    lambda b, *a: ops.convlstm(*a, backend=b), cl))
    return out


def _place(inputs, device, dtype):
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).requires_grad_(grad)
            for t, grad in inputs]


def _as_tuple(out):
    return tuple(o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor))


def fwd_bwd_step(fn, args):
    """A forward+backward step of fn(*args): fixed random incoming gradients for every output, the gradients
    of the inputs that require grad returned (not accumulated). Also returns the nominal bytes of one step
    (see the module docstring).

    fn: (*Tensor) -> Tensor or tuple of Tensors; args: list of Tensor -> (step: () -> tuple, nbytes: int)
    """
    leaves = [a for a in args if a.requires_grad]
    outs = _as_tuple(fn(*args))
    g = torch.Generator().manual_seed(123)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
             for o in outs]
    nbytes = (2 * sum(a.numel() * a.element_size() for a in args)
              + 2 * sum(o.numel() * o.element_size() for o in outs)
              + sum(a.numel() * a.element_size() for a in leaves))

    def step():
        return torch.autograd.grad(_as_tuple(fn(*args)), leaves, grads)
    return step, nbytes


def auto_choice(op_name: str, call) -> str:
    """The backend the op's auto dispatch picks for one call of `call()` (read by watching Op.select)."""
    from ._dispatch import REGISTRY

    op = REGISTRY[op_name]
    picked = []
    original = op.select

    def spy(backend, *args, **kwargs):
        name, fn = original(backend, *args, **kwargs)
        picked.append(name)
        return name, fn

    op.select = spy  # an instance attribute shadows the method for this call only
    try:
        with torch.no_grad():
            call()
    finally:
        del op.select
    return picked[0] if picked else "torch"


def _short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def bench_case(case: Case, device: str, dtype: torch.dtype, tiny: bool, timing=TIMING["full"]) -> dict:
    """Time one case's forward+backward for eager torch and each backend of the device; the auto choice."""
    from ._dispatch import REGISTRY, BackendUnavailable

    warmup, reps, min_time = timing
    backends = case.backends or (GPU_BACKENDS if device == "cuda" else CPU_BACKENDS)
    op = REGISTRY[case.op]
    args = _place(case.inputs(tiny), device, dtype)
    row = {"case": case.name, "op": case.op, "shape": case.tiny_shape if tiny else case.shape,
           "dtype": str(dtype).split(".")[-1], "results": {}}
    for b in ("torch",) + tuple(backends):
        why = op.static_reasons(b)
        if why:
            row["results"][b] = {"skipped": "; ".join(why)}
            continue
        try:
            step, nbytes = fwd_bwd_step(lambda *a, b=b: case.call(b, *a), args)
            times = bench.measure(step, device, warmup=warmup, reps=reps, min_time=min_time)
            # the CPU's peak comes from the profiler, whose start/stop lines clutter this command's output
            peak = bench.peak_extra_mb(step, device) if device == "cuda" else None
        except BackendUnavailable as e:
            row["results"][b] = {"skipped": str(e)}
            continue
        except Exception as e:  # a backend that raises is a finding to report, not a reason to stop the check
            row["results"][b] = {"error": _short_error(e)}
            continue
        t = statistics.median(times)
        row["results"][b] = {"ms": t * 1e3, "gbps": nbytes / t / 1e9, "peak_mb": peak,
                             "spread_ms": [min(times) * 1e3, max(times) * 1e3]}
    base = row["results"]["torch"].get("ms")
    for r in row["results"].values():
        if "ms" in r and base:
            r["ratio"] = base / r["ms"]
    try:
        pick = auto_choice(case.op, lambda: case.call("auto", *args))
    except Exception as e:
        row["auto"] = {"error": _short_error(e)}
        return row
    row["auto"] = {"backend": pick, "ratio": row["results"].get(pick, {}).get("ratio")}
    return row


def run_bench(device: str, dtypes, tiny: bool, quick: bool, only=None, progress=print) -> list[dict]:
    rows = []
    for dt in dtypes:
        for case in _cases():
            if only and not any(o in case.name for o in only):
                continue
            t0 = time.perf_counter()
            row = bench_case(case, device, bench.parse_dtype(dt), tiny, TIMING["quick" if quick else "full"])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            progress(f"  bench {case.name} {row['dtype']}: {_row_brief(row)} ({row['seconds']:.1f} s)")
    return rows


def _row_brief(row) -> str:
    parts = []
    for b, r in row["results"].items():
        if "ms" in r:
            parts.append(f"{b} {r['ms']:.3f} ms")
        else:
            parts.append(f"{b} {'error' if 'error' in r else 'n/a'}")
    auto = row.get("auto", {})
    return ", ".join(parts) + f"; auto -> {auto.get('backend', 'error')}"


def flags(rows: list[dict], tests: dict | None) -> list[str]:
    """What the summary must point out: auto choices slower than torch, backends that raised, failed tests."""
    out = []
    for row in rows:
        label = f"{row['case']} {row['dtype']}"
        auto = row.get("auto", {})
        if "error" in auto:
            out.append(f"{label}: auto dispatch raised {auto['error']}")
        elif auto.get("backend") != "torch" and auto.get("ratio") is not None and auto["ratio"] < 1.0:
            out.append(f"{label}: auto picks {auto['backend']}, {auto['ratio']:.2f}x eager torch (slower than torch)")
        for b, r in row["results"].items():
            if "error" in r:
                out.append(f"{label}: backend {b} raised {r['error']}")
    if tests and (tests.get("failed") or tests.get("errors")):
        out.append(f"tests: {tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors")
    if tests and "error" in tests and "passed" not in tests:
        out.append(f"tests: {tests['error']}")
    if tests and tests.get("interrupted"):
        out.append(f"tests: interrupted after {tests['seconds']:.0f} s (--test-timeout)")
    return out


def format_table(rows: list[dict], backends) -> str:
    """One line per (op, dtype): eager ms, then each backend's ms / ratio / GB/s, then auto's pick."""
    cols = ("torch",) + tuple(backends)
    width = max([len(f"{r['case']} {r['shape']}") for r in rows] + [10])
    head = f"{'op  shape':{width}s}  {'dtype':8s} " + " ".join(
        f"{('eager' if b == 'torch' else b) + ' ms / ratio / GB/s':>26s}" for b in cols) + "  auto"
    lines = [head]
    for r in rows:
        cells = []
        for b in cols:
            res = r["results"].get(b, {})
            if "ms" in res:
                cells.append(f"{res['ms']:9.3f} {res.get('ratio', float('nan')):6.2f}x {res['gbps']:8.1f}")
            elif "error" in res:
                cells.append(f"{'error':>26s}")
            else:
                cells.append(f"{'n/a':>26s}")
        auto = r.get("auto", {})
        if "error" in auto:
            pick = "error"
        else:
            ratio = auto.get("ratio")
            pick = auto.get("backend", "?") + (f" {ratio:.2f}x" if ratio is not None else "")
            if auto.get("backend") != "torch" and ratio is not None and ratio < 1.0:
                pick += "  <- slower than torch"
        lines.append(f"{r['case'] + ' ' + r['shape']:{width}s}  {r['dtype']:8s} " + " ".join(cells) + "  " + pick)
    notes = sorted({f"  {b}: {res['skipped']}" for r in rows for b, res in r["results"].items()
                    if "skipped" in res})
    if notes:
        lines += ["n/a:"] + notes[:12] + ([f"  ... {len(notes) - 12} more (see the JSON)"] if len(notes) > 12 else [])
    return "\n".join(lines)


# ---- tests ------------------------------------------------------------------------------------------------
def tests_dir() -> str | None:
    """tests/ of the source checkout this vpfast was imported from, or None (an installed wheel has none)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    return here if os.path.isfile(os.path.join(here, "conftest.py")) else None


def _xdist_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def test_command(device: str, quick: bool, jobs: int | None, paths: list[str], junit: str,
                 select: str | None = None) -> list[str]:
    """The pytest command line of the device's test subset."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"]
    select = TEST_SELECTION[device] if select is None else select
    if select:
        cmd += ["-k", select]
    if quick:
        cmd += ["-m", "not slow"]
    if jobs is None:  # a GPU machine has the cores for it; two cores here are better spent in one process
        jobs = min(8, max(1, (os.cpu_count() or 1) // 2)) if device == "cuda" else 0
    if jobs and jobs > 1 and _xdist_installed():
        cmd += ["-n", str(jobs)]
    return cmd + list(paths)


def parse_junit(path: str) -> dict:
    """Counts (passed, failed, errors, skipped) and the failing tests' ids and first message lines."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for s in suites:
        for case in s.iter("testcase"):
            kinds = {child.tag for child in case}
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if "failure" in kinds or "error" in kinds:
                tag = "failure" if "failure" in kinds else "error"
                out["failed" if tag == "failure" else "errors"] += 1
                msg = (case.find(tag).get("message") or "").strip().splitlines()
                out["failures"].append(f"{name}: {msg[0][:200] if msg else tag}")
            elif "skipped" in kinds:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    return out


def run_tests(device: str, quick: bool = False, jobs: int | None = None, paths: list[str] | None = None,
              select: str | None = None, timeout: float = 600.0) -> dict:
    """Run the device's test subset in a child pytest (its output goes to this terminal); the counts.

    On timeout the child gets SIGINT, so that pytest still writes its report of what ran."""
    if paths is None:
        root = tests_dir()
        if root is None:
            return {"error": "no tests/ beside the vpfast package (run from a source checkout)"}
        paths = [root]
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = test_command(device, quick, jobs, paths, junit, select)
        print("running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        # the child imports this process's vpfast (a checkout's, whichever copy an editable install names)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
        proc = subprocess.Popen(cmd, env=env)
        interrupted = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            interrupted = True
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        out = {"command": cmd[1:], "returncode": rc, "seconds": time.perf_counter() - t0,
               "interrupted": interrupted}
        if os.path.exists(junit):
            out.update(parse_junit(junit))
        else:
            out["error"] = f"pytest exited with {rc} and wrote no report"
    return out


# ---- summary ----------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    from . import __version__, _ext
    from .info import _triton_version

    info = _ext.build_info()
    env = {"device": device, "device_name": bench.device_name(device), "vpfast": __version__,
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": _triton_version(),
           "python": sys.version.split()[0],
           "extension": "loaded" if info else f"not loaded ({_ext.LOAD_ERROR})",
           "extension_with_cuda": info.get("with_cuda"), "extension_arch": info.get("cuda_arch_list")}
    if device == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        env["threads"] = torch.get_num_threads()
    return env


def summary(result: dict) -> str:
    env, tests = result["environment"], result.get("tests")
    lines = ["", "=" * 30 + f" vpfast check ({env['device']}) " + "=" * 30]
    dev = env["device_name"] + (f" (sm {env['capability']})" if env.get("capability") else "")
    lines.append(f"device     {dev}")
    lines.append(f"versions   vpfast {env['vpfast']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
                 f"triton {env['triton']}, python {env['python']}")
    lines.append(f"extension  {env['extension']}" + (f", CUDA kernels: {env['extension_with_cuda']} "
                                                      f"(arch {env['extension_arch']})" if env['extension'] == 'loaded' else ""))
    if tests is None:
        lines.append("tests      not run (--no-tests)")
    elif "error" in tests and "passed" not in tests:
        lines.append(f"tests      {tests['error']}")
    else:
        lines.append(f"tests      {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped in {tests['seconds']:.0f} s"
                     + (" (INTERRUPTED)" if tests.get("interrupted") else ""))
        for f in tests["failures"][:20]:
            lines.append(f"  FAILED {f}")
        if len(tests["failures"]) > 20:
            lines.append(f"  ... {len(tests['failures']) - 20} more in the JSON")
    if result.get("bench"):
        lines += ["", "fwd+bwd, median ms / ratio (eager torch time / backend time) / nominal GB/s; auto = what "
                      "auto dispatch picks"]
        lines.append(format_table(result["bench"], result["backends"]))
    lines.append("")
    if result["flags"]:
        lines.append("FLAGGED:")
        lines += [f"  {f}" for f in result["flags"]]
    else:
        lines.append("nothing flagged: every auto choice is at least as fast as torch, no backend raised")
    if result.get("out"):
        lines.append(f"results written to {result['out']}")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpfast.check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: GPU tests and model-shape benchmarks; cpu: the CPU analogue at tiny shapes "
                        "(default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions; tests marked slow left out")
    p.add_argument("--no-tests", action="store_true", help="only the benchmark table")
    p.add_argument("--no-bench", action="store_true", help="only the tests")
    p.add_argument("--out", default=None, help="JSON file of the results (default vpfast-check-<device>.json; "
                                               "'-' for none)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="benchmark dtypes (default: float32 bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--ops", nargs="+", default=None, help="only benchmark cases whose name contains one of these")
    p.add_argument("--tiny", action="store_true", default=None,
                   help="tiny shapes (the default on cpu; on cuda the models' shapes unless given)")
    p.add_argument("-k", dest="select", default=None,
                   help="pytest -k expression of the test subset (default: %s)" % TEST_SELECTION)
    p.add_argument("--tests", nargs="+", default=None, help="test paths (default: the checkout's tests/)")
    p.add_argument("--jobs", "-n", type=int, default=None,
                   help="pytest-xdist processes (default: up to 8 on cuda when xdist is installed, 0 on cpu)")
    p.add_argument("--test-timeout", type=float, default=600.0, help="seconds before the tests are interrupted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the benchmarks (default: torch's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    why = bench.device_error(args.device)
    if why:
        print(f"vpfast check: --device {args.device}: {why}", file=sys.stderr)
        return 2
    try:
        dtypes = [str(bench.parse_dtype(d)).split(".")[-1] for d in (args.dtypes or DEFAULT_DTYPES[args.device])]
    except ValueError as e:
        print(f"vpfast check: --dtypes: {e}", file=sys.stderr)
        return 2
    import vpfast.ops  # noqa: F401  (registers every op)

    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    result = {"environment": environment(args.device), "tests": None, "bench": [],
              "backends": GPU_BACKENDS if args.device == "cuda" else CPU_BACKENDS}
    if not args.no_tests:
        result["tests"] = run_tests(args.device, args.quick, args.jobs, args.tests, args.select, args.test_timeout)
    if not args.no_bench:
        tiny = args.device == "cpu" if args.tiny is None else args.tiny
        print(f"benchmarks ({args.device}, {'tiny' if tiny else 'model'} shapes, {', '.join(dtypes)}):", flush=True)
        result["bench"] = run_bench(args.device, dtypes, tiny, args.quick, args.ops,
                                    progress=lambda s: print(s, flush=True))
    result["flags"] = flags(result["bench"], result["tests"])
    result["seconds"] = time.perf_counter() - t0
    out = args.out if args.out is not None else f"vpfast-check-{args.device}.json"
    if out != "-":
        result["out"] = os.path.abspath(out)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(summary(result))
    tests = result["tests"] or {}
    bad = (tests.get("failed") or tests.get("errors") or ("error" in tests and "passed" not in tests)
           or any("error" in r for row in result["bench"] for r in row["results"].values())
           or any("error" in row.get("auto", {}) for row in result["bench"]))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
