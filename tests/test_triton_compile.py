"""Every Triton kernel specialisation the package launches compiles for sm_80 and sm_90, without a GPU.

The interpreter that runs the Triton backend in CI never compiles, so a kernel the GPU compiler rejects
passes every CPU test. Here each op with a Triton backend runs forward and backward under the interpreter
over its options (optional tensors present or None, flags, layouts, which inputs need gradients and which
outputs receive them, a small odd shape and an aligned model-like one) in float32, float64, bfloat16 and
float16; vpfast._triton_aot records each kernel launch as the specialisation Triton's launcher would compile
on a GPU (pointer dtypes, i32/i64 by value, divisibility, constexprs), without running the kernels, and
compiles each distinct one in worker processes that do not interpret: all of them for sm_90 (H100/H200), and
for sm_80 (A100) a subset that keeps every kernel, pointer dtype, constexpr value and integer type (CI time).

What is compiled is what the ops launch, not a list kept here. What is kept here is how to call each op
(CASES); the coverage tests fail when an op with a Triton backend has no case, when a kernel launched in
kernels/*.py is never reached, or when a boolean constexpr is seen with only one value, so that the cases
cannot fall behind the kernels silently. An op that refuses a dtype (BackendUnavailable) is not recorded for
it; float32 must be accepted. test_recorder_matches_triton_launcher checks the recorded specialisations
against Triton's own launcher code, so that a Triton upgrade cannot make this module compile the wrong ones.

On a machine with a GPU the Triton tests compile every kernel they launch, so this module skips there.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

import vpfast.ops as vops
from vpfast import _ext
from vpfast import _triton_aot as aot
from vpfast._dispatch import REGISTRY, BackendUnavailable

# Hopper (H100/H200) gets every recorded specialisation; Ampere (A100) a covering subset, which halves CI's time
# for this module: per kernel and pointer dtypes, every constexpr value and integer type (_triton_aot.covering_subset)
FULL_ARCHS = (90,)
COVER_ARCHS = (80,)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
JOBS = max(1, min(8, len(os.sched_getaffinity(0))))  # CI has 2 cores

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the Triton tests compile every kernel they run"),
    pytest.mark.skipif(not _ext.TRITON_INSTALLED, reason="Triton is not installed"),
    pytest.mark.skipif(_ext.TRITON_INSTALLED and not _ext.triton_interpret(),
                       reason="recording launches needs the Triton interpreter (TRITON_INTERPRET=1)"),
    pytest.mark.skipif(_ext.TRITON_INSTALLED and aot.unsupported_reason() is not None,
                       reason=str(aot.unsupported_reason() if _ext.TRITON_INSTALLED else "")),
]

# A boolean constexpr that only ever takes one value, with the reason; any other is required to be seen both ways.
ONE_SIDED: dict[tuple[str, str], str] = {}


# ---- how to call each op --------------------------------------------------------------------------------------
@dataclass
class Call:
    fn: object
    args: tuple
    kwargs: dict = field(default_factory=dict)


class Make:
    """Seeded random tensors of one dtype: make(*shape), make.cl(*shape) for channels_last."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.g = torch.Generator().manual_seed(0)

    def __call__(self, *shape):
        return torch.randn(shape, generator=self.g).to(self.dtype)

    def cl(self, *shape):
        return self(*shape).contiguous(memory_format=torch.channels_last)


def _opt(t, present):
    return t if present else None


def _variants(odd, aligned, *axes):
    """(shape, *options): every combination of the option axes at the aligned shapes (model-like: sizes that are
    multiples of 16, blocks at their largest); at the odd shapes (batch 1, sizes that are not) the first values
    of every axis together and the last values together. Each shape entry is a tuple of sizes."""
    for shape in aligned:
        for combo in itertools.product(*axes):
            yield (shape, *combo)
    for shape in odd:
        for combo in dict.fromkeys([tuple(a[0] for a in axes), tuple(a[-1] for a in axes)]):
            yield (shape, *combo)


def _convlstm(m):
    for (B, C, H, W), has_x, tanh_c in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)], [0, 1], [False, True]):
        yield Call(vops.convlstm, (_opt(m(B, 4 * C, H, W), has_x), m(B, 4 * C, H, W), m(B, C, H, W)),
                   dict(forget_bias=1.0, tanh_c=tanh_c))


def _ddr_loss(m):
    for (shape,) in _variants([(1, 3, 2, 3, 5)], [(2, 4, 3, 32, 32)]):
        yield Call(vops.ddr_loss, (m(*shape), m(*shape)))


def _stlstm_gates(m):
    for (B, C, H, W), has_x, delta in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)], [0, 1], [False, True]):
        yield Call(vops.stlstm_gates, (_opt(m(B, 7 * C, H, W), has_x), m(B, 4 * C, H, W), m(B, 3 * C, H, W),
                                       m(B, C, H, W), m(B, C, H, W)), dict(with_delta=delta))


def _stlstm_output(m):
    for shape, hw in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)], [0, 1]):
        yield Call(vops.stlstm_output, (m(*shape), m(*shape), m(*shape), _opt(m(*shape), hw)))


def _causal_lstm_cell(m):
    for (B, C, H, W), has_x, has_c in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)], [0, 1], [0, 1]):
        yield Call(vops.causal_lstm_cell, (_opt(m(B, 7 * C, H, W), has_x), m(B, 4 * C, H, W),
                                           _opt(m(B, 3 * C, H, W), has_c), m(B, C, H, W)))


def _causal_lstm_memory(m):
    for (B, C, H, W), carry in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)], [1, 4]):
        yield Call(vops.causal_lstm_memory, (m(B, carry * C, H, W), m(B, 3 * C, H, W), m(B, 4 * C, H, W)))


def _causal_lstm_output(m):
    for (shape,) in _variants([(1, 3, 5, 7)], [(2, 16, 16, 16)]):
        yield Call(vops.causal_lstm_output, (m(*shape), m(*shape), m(*shape)))


def _depthwise_conv2d(m):
    # (kernel, stride, padding, dilation) at the models' maps (TAU/SimVP: 3x3, and large-kernel attention's 5x5
    # and dilated 7x7), then odd sizes with non-unit and unequal geometry
    aligned = [((3, 3), 1, None, 1), ((5, 5), 1, None, 1), ((7, 7), 1, None, 3)]
    odd = [((3, 5), 1, None, 1), ((3, 3), 2, 0, 1), ((5, 3), (1, 2), None, (2, 1))]
    for shape, geometries in (((2, 16, 32, 32), aligned), ((1, 3, 7, 9), odd)):
        for ((kh, kw), s, p, d), bias in itertools.product(geometries, [0, 1]):
            C = shape[1]
            yield Call(vops.depthwise_conv2d, (m(*shape), m(C, 1, kh, kw), _opt(m(C), bias)),
                       dict(stride=s, padding=p, dilation=d))


def _large_kernel_attention(m):
    for (B, C, H, W), b0, b1, pw in _variants([(1, 3, 7, 9)], [(2, 16, 32, 32)], [0, 1], [0, 1], [0, 1]):
        yield Call(vops.large_kernel_attention,
                   (m(B, C, H, W), m(C, 1, 5, 5), _opt(m(C), b0), m(C, 1, 7, 7), _opt(m(C), b1)),
                   dict(dilation=3, weight_pw=_opt(m(C, C, 1, 1), pw), bias_pw=_opt(m(C), pw)))


def _deform_warp(m):
    for (B, C, H, W, O), k in _variants([(1, 3, 5, 7, 2)], [(2, 16, 16, 16, 16)], [1, 3]):
        yield Call(vops.deform_warp, (m(B, C, H, W), m(B, 2 * k * k, H, W), torch.sigmoid(m(B, k * k, H, W)),
                                      m(O, C, k, k)))


def _flow_warp(m):
    for (B, C, H, W), mode, align in _variants([(1, 3, 5, 7)], [(2, 16, 32, 32)], ["zeros", "border"],
                                               [False, True]):
        yield Call(vops.flow_warp, (m(B, C, H, W), m(B, 2, H, W)), dict(padding_mode=mode, align_corners=align))


def _motion_gru(m):
    for (B, Cin, M, H, W), bias in _variants([(1, 3, 2, 5, 7)], [(2, 4, 4, 16, 16)], [0, 1]):
        w = [m(M, Cin + M, 3, 3) for _ in range(3)]
        b = [_opt(m(M), bias) for _ in range(3)]
        yield Call(vops.motion_gru, (m(B, Cin, H, W), m(B, M, H, W), m(B, M, H, W), w[0], b[0], w[1], b[1], w[2],
                                     b[2]))


def _group_norm_silu(m):
    # (shape, groups, channels_last): NCHW and channels_last at a model's map, then odd NCHW, [N, C, L] and
    # channels_last shapes
    for (shape, groups, cl), w, b in _variants([((1, 6, 5, 7), 2, False), ((2, 6, 11), 3, False),
                                                ((2, 12, 5, 5), 4, True)],
                                               [((2, 32, 32, 32), 2, False), ((2, 32, 32, 32), 2, True)],
                                               [0, 1], [0, 1]):
        C = shape[1]
        yield Call(vops.group_norm_silu, (m.cl(*shape) if cl else m(*shape), groups, _opt(m(C), w), _opt(m(C), b)))


CASES = {
    "convlstm": _convlstm,
    "ddr_loss": _ddr_loss,
    "stlstm_gates": _stlstm_gates,
    "stlstm_output": _stlstm_output,
    "causal_lstm_cell": _causal_lstm_cell,
    "causal_lstm_memory": _causal_lstm_memory,
    "causal_lstm_output": _causal_lstm_output,
    "depthwise_conv2d": _depthwise_conv2d,
    "large_kernel_attention": _large_kernel_attention,
    "deform_warp": _deform_warp,
    "flow_warp": _flow_warp,
    "motion_gru": _motion_gru,
    "group_norm_silu": _group_norm_silu,
}


# ---- recording ---------------------------------------------------------------------------------------------
def _subsets(items):
    """Every non-empty subset for up to 3 items; otherwise each single item and all of them."""
    items = list(items)
    if len(items) <= 3:
        return [list(c) for r in range(1, len(items) + 1) for c in itertools.combinations(items, r)]
    return [[i] for i in items] + [items]


def _float_tensors(call):
    return [i for i, a in enumerate(call.args) if isinstance(a, torch.Tensor) and a.is_floating_point()] + \
           [k for k, a in call.kwargs.items() if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _with_grad(call, keys):
    args, kwargs = list(call.args), dict(call.kwargs)
    leaves = []
    for key in keys:
        holder = args if isinstance(key, int) else kwargs
        holder[key] = holder[key].detach().requires_grad_()
        leaves.append(holder[key])
    return args, kwargs, leaves


def _backward(call, keys, out_choices):
    args, kwargs, leaves = _with_grad(call, keys)
    out = call.fn(*args, backend="triton", **kwargs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    for chosen in out_choices(len(outs)):
        torch.autograd.grad([outs[i] for i in chosen], leaves, [torch.ones_like(outs[i]) for i in chosen],
                            allow_unused=True, retain_graph=True)


def _run_call(call):
    """Forward without gradients, then forward + backward for each choice of the inputs that need gradients
    (with every output receiving one) and for each choice of the outputs that receive gradients (with every
    input needing one): what decides the backward kernels' constexprs. One axis at a time, not their product."""
    with torch.no_grad():
        call.fn(*call.args, backend="triton", **call.kwargs)
    floats = _float_tensors(call)
    for keys in _subsets(floats):
        _backward(call, keys, lambda n: [list(range(n))])
    _backward(call, floats, lambda n: _subsets(range(n)) if n > 1 else [])


@dataclass
class Launches:
    recording: aot.Recording
    refused: dict  # (op, dtype name, case index) -> reason
    seconds: float


@pytest.fixture(scope="module")
def launches():
    t = time.perf_counter()
    refused = {}
    with aot.record(execute=False) as rec:
        for op_name, cases in CASES.items():
            for dtype in DTYPES:
                name = str(dtype).replace("torch.", "")
                rec.tag = (op_name, name)
                for i, call in enumerate(cases(Make(dtype))):
                    try:
                        _run_call(call)
                    except BackendUnavailable as e:
                        if dtype == torch.float32:
                            raise  # a case the op refuses in float32 is a wrong case
                        refused[(op_name, name, i)] = str(e)
    return Launches(rec, refused, time.perf_counter() - t)


# ---- coverage of the cases -----------------------------------------------------------------------------------
def test_every_triton_op_has_a_case():
    with_triton = sorted(n for n, op in REGISTRY.items() if "triton" in op.impls)
    missing = [n for n in with_triton if n not in CASES]
    assert not missing, f"ops with a Triton backend and no entry in CASES (add how to call them): {missing}"


def _launched_kernels() -> set[str]:
    """module.kernel for every `kernel[grid](...)` launch written in kernels/*.py."""
    import vpfast.kernels as pkg
    found = set()
    for path in sorted(os.listdir(os.path.dirname(pkg.__file__))):
        if not path.endswith(".py"):
            continue
        with open(os.path.join(os.path.dirname(pkg.__file__), path)) as f:
            tree = ast.parse(f.read())
        jitted = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                  and any("jit" in ast.unparse(d) for d in n.decorator_list)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted):
                found.add(f"{path[:-3]}.{node.func.value.id}")
    return found


def test_every_kernel_is_launched(launches):
    recorded = {s.kernel for s in launches.recording.specs}
    written = _launched_kernels()
    assert written, "found no kernel launches in kernels/*.py"
    assert not written - recorded, f"kernels no case reaches (extend CASES): {sorted(written - recorded)}"


def test_boolean_constexprs_take_both_values(launches):
    seen: dict = {}
    for s in launches.recording.specs:
        for p, v in s.constexprs:
            if isinstance(v, bool):
                seen.setdefault((s.kernel, p), set()).add(v)
    one_sided = {k: v for k, v in seen.items() if len(v) == 1 and k not in ONE_SIDED}
    assert not one_sided, ("boolean constexprs seen with one value only (extend CASES, or list them in "
                           f"ONE_SIDED with the reason): {one_sided}")


# ---- the recorder against Triton's own launcher --------------------------------------------------------------
_LAUNCHER_CHECK = """
import json, os, pkgutil, importlib, sys
import torch
import vpfast.ops  # with TRITON_INTERPRET=1: dispatch lets the triton backend take CPU tensors
del os.environ["TRITON_INTERPRET"]
import vpfast.kernels
for m in pkgutil.iter_modules(vpfast.kernels.__path__):  # defined as JITFunctions: no interpreter
    importlib.import_module("vpfast.kernels." + m.name)
os.environ["TRITON_INTERPRET"] = "1"
from vpfast import _triton_aot as aot
sys.path.insert(0, "tests")
import test_triton_compile as t
with aot.compare_with_launcher() as result:
    for cases in t.CASES.values():
        for call in cases(t.Make(torch.float32)):
            t._run_call(call)
print(json.dumps(result))
"""


def test_recorder_matches_triton_launcher():
    """specialize() gives what Triton's own binder and _pack_args give, for every float32 launch of CASES
    (kernels compiled as JITFunctions in a subprocess): a Triton whose launcher specialises differently fails
    here rather than compiling the wrong specialisations."""
    from triton.runtime import jit
    if not (hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")):
        pytest.skip("this Triton has no create_function_from_signature / JITFunction._pack_args (3.8's) to compare")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    launches, mismatches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert launches > 100, f"only {launches} launches reached the launcher check"
    assert not mismatches, (f"{len(mismatches)} of {launches} launches specialise differently from Triton's "
                            "launcher (kernel, Triton's, ours): " + "\n".join(map(str, mismatches[:5])))


# ---- the compile check -------------------------------------------------------------------------------------
def _dtype(spec):
    return next((t[1:] for _, t in spec.signature if t.startswith("*")), "-")


def _failure_report(failures, compiled: int, shown: int = 12) -> str:
    """Per kernel, dtype and arch how many fail; then each distinct error (numbers in the message ignored, so
    one error at several block sizes is one) with its specialisations and the compiler's message."""
    count: dict = {}
    for r in failures:
        key = (r.spec.kernel, _dtype(r.spec))
        count.setdefault(key, {}).setdefault(r.arch, 0)
        count[key][r.arch] += 1
    lines = [f"{len(failures)} of {compiled} kernel specialisation compiles fail for the GPU:"]
    for (kernel, dt), by_arch in sorted(count.items()):
        lines.append(f"  {kernel} {dt}: " + ", ".join(f"sm_{a} {n}" for a, n in sorted(by_arch.items())))
    groups: dict = {}
    for r in failures:
        last = r.error.strip().splitlines()[-1] if r.error.strip() else ""
        groups.setdefault((r.spec.kernel, re.sub(r"\d+", "#", last)), []).append(r)
    lines.append(f"\n{len(groups)} distinct error(s):")
    for i, rs in enumerate(groups.values()):
        lines.append(f"\n== {rs[0].spec.kernel}: {len(rs)} specialisation(s), e.g. sm_{rs[0].arch} "
                     f"{rs[0].spec.describe()}")
        if i >= shown:
            lines.append("   " + rs[0].error.strip().splitlines()[-1][:300])
            continue
        for r in rs[1:4]:
            lines.append(f"   also sm_{r.arch} {r.spec.describe()}")
        if len(rs) > 4:
            lines.append(f"   ... and {len(rs) - 4} more")
        lines.append(rs[0].error if len(rs[0].error) < 3000 else rs[0].error[:3000] + " ...")
    return "\n".join(lines)


@pytest.mark.slow
def test_launched_kernels_compile_for_gpu(launches):
    specs = list(launches.recording.specs)
    assert specs
    cover = aot.covering_subset(specs)
    pairs = [(s, a) for a in FULL_ARCHS for s in specs] + [(s, a) for a in COVER_ARCHS for s in cover]
    t = time.perf_counter()
    results = aot.compile_specs(pairs, jobs=JOBS)
    seconds = time.perf_counter() - t
    per_dtype: dict = {}
    for s, tags in launches.recording.tags.items():
        for op, dt in tags:
            per_dtype.setdefault(op, set()).add(dt)
    print(f"\nrecorded {sum(launches.recording.specs.values())} launches -> {len(specs)} specialisations of "
          f"{len({s.kernel for s in specs})} kernels in {launches.seconds:.1f} s; compiled all for "
          f"{', '.join(f'sm_{a}' for a in FULL_ARCHS)} and {len(cover)} for {', '.join(f'sm_{a}' for a in COVER_ARCHS)}"
          f" in {seconds:.1f} s ({JOBS} workers)")
    print("dtypes recorded per op:", {op: sorted(d) for op, d in sorted(per_dtype.items())})
    if launches.refused:
        print("refused (op, dtype, case):", sorted(launches.refused))
    per_kernel: dict = {}
    for r in results:
        per_kernel[r.spec.kernel] = per_kernel.get(r.spec.kernel, 0.0) + r.seconds
    print("compile seconds per kernel:", {k: round(v, 1) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])})
    assert len(results) == len(pairs)
    failures = [r for r in results if not r.ok]
    if failures:
        pytest.fail(_failure_report(failures, len(results)), pytrace=False)
