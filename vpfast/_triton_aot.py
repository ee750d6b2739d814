"""Compile the package's Triton kernels for CUDA targets ahead of time, on a machine without a GPU.

Why: without a GPU the Triton backend runs under TRITON_INTERPRET=1, and the interpreter never compiles; a
kernel the compiler rejects (a loop-carried variable that changes type, an unsupported dtype in an atomic,
too large a block) passes every CPU test and fails on the first GPU launch. `triton.compile` for a
`GPUTarget` needs no GPU and raises the same errors, so CI can compile what the package launches.

What to compile is recorded, not listed: `record()` intercepts every kernel launch the ops make while they
run under the interpreter and turns it into a `Spec`, the same (kernel, signature, constexprs, attributes,
options) that `JITFunction.run` would hand the compiler for those arguments on a CUDA device. The
specialisation uses Triton's own function (`native_specialize_impl`) with the CUDA backend, so integer
arguments get i32/i64/u64 by value, 16-divisible ones `tt.divisibility`, and the value 1 becomes a constexpr,
exactly as the launcher decides (`compare_with_launcher()` checks that against Triton's own code).
`compile_specs()` then compiles each distinct spec for each architecture in fresh subprocesses that do not
set TRITON_INTERPRET (read when kernels are defined) and use a throwaway Triton cache, so nothing carries
over between runs.

Used by tests/test_triton_compile.py. Written against Triton 3.8's runtime/jit.py (create_function_from_signature,
JITFunction._pack_args); `unsupported_reason()` says what is missing where a Triton lacks those pieces.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# a spec whose compile crashes or hangs the worker must not hang CI
WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Spec:
    """One specialisation of one kernel, as JITFunction.run would compile it.

    module, name: where the @triton.jit function lives (import path, attribute); file: its source file
    (the worker checks it imports the same one); signature: {param: type} with "constexpr" for constexprs;
    constexprs: {param: value} (a tl.dtype as ("tl.dtype", name)); attrs: {param: attribute string of
    native_specialize_impl ("D": divisible by 16, "": none)}; options: launch options (num_warps ...) the
    call passed. The dicts are held as tuples of pairs, so that specs hash and deduplicate.
    """
    module: str
    name: str
    file: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple = ()

    @property
    def kernel(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.name}"

    def describe(self) -> str:
        """kernel[param=type/attr ..., CONST=value ...]: what distinguishes this specialisation."""
        sig, ce, at = dict(self.signature), dict(self.constexprs), dict(self.attrs)
        parts = []
        for p, ty in sig.items():
            if ty == "constexpr":
                parts.append(f"{p}={_show(ce[p])}")
            else:
                parts.append(f"{p}:{ty}" + (f"/{at[p]}" if at.get(p) else ""))
        parts += [f"{k}={_show(v)}" for k, v in self.options]
        return f"{self.kernel}[{', '.join(parts)}]"

    def to_json(self) -> dict:
        return {"module": self.module, "name": self.name, "file": self.file, "signature": list(self.signature),
                "constexprs": list(self.constexprs), "attrs": list(self.attrs), "options": list(self.options)}

    @staticmethod
    def from_json(d: dict) -> "Spec":
        return Spec(d["module"], d["name"], d["file"],
                    *(_tuples(d[k]) for k in ("signature", "constexprs", "attrs", "options")))


_DTYPE_TAG = "tl.dtype"


def _encode(v):
    """A constexpr value as hashable JSON-able data (a tl.dtype as ("tl.dtype", name))."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    import triton.language as tl
    if isinstance(v, tl.dtype):
        return (_DTYPE_TAG, v.name)
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    raise TypeError(f"cannot record constexpr value {v!r} of type {type(v).__name__}")


def _decode(v):
    if isinstance(v, tuple) and len(v) == 2 and v[0] == _DTYPE_TAG:
        import triton.language as tl
        return tl.dtype(v[1])
    return v


def _show(v) -> str:
    return v[1] if isinstance(v, tuple) and len(v) == 2 and v[0] == _DTYPE_TAG else repr(v)


def _tuples(x):
    # JSON gives lists where the Spec held tuples
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x


@functools.lru_cache(maxsize=None)
def _specializer():
    """(backend, arg, is_const, specialize, align) -> (type, attribute), as the installed Triton's launcher.

    Triton >= 3.5 does it in C++ (native_specialize_impl); earlier 3.x releases build a Python function per
    backend with create_specialize_impl(backend.get_arg_specialization)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        return native_specialize_impl
    except ImportError:
        from triton.runtime.jit import create_specialize_impl
        made = {}

        def specialize_impl(backend, arg, is_const, specialize, align):
            if id(backend) not in made:
                made[id(backend)] = create_specialize_impl(backend.get_arg_specialization)
            return made[id(backend)](arg, is_const, specialize, align)
        return specialize_impl


def unsupported_reason() -> str | None:
    """Why recording cannot mirror this Triton's launcher, or None."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    try:
        _specializer()
        from triton.runtime.interpreter import InterpretedFunction  # noqa: F401
        from triton.runtime.jit import KernelParam  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        return (f"this Triton ({triton.__version__}) lacks what the launch recorder mirrors (Triton 3.x's "
                f"native_specialize_impl or create_specialize_impl, InterpretedFunction, KernelParam): {e}")
    return None


_BACKEND = None


def _cuda_backend():
    # the specialisation rules are the CUDA backend's; any sm gives the same argument types and attributes
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        _BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    return _BACKEND


def specialize(fn, jit_kwargs: dict, args: tuple, kwargs: dict) -> Spec:
    """The Spec JITFunction.run would compile for fn[grid](*args, **kwargs) on a CUDA device.

    fn: the Python function under @triton.jit; jit_kwargs: the decorator's arguments (do_not_specialize ...).
    Mirrors triton/runtime/jit.py (3.8): create_function_from_signature builds (type, attribute) per argument
    with native_specialize_impl; _pack_args turns them into signature, constexprs and attributes.
    """
    from triton.runtime.jit import KernelParam

    sig = inspect.signature(fn)
    names = list(sig.parameters)
    dns = jit_kwargs.get("do_not_specialize") or ()
    dnsa = jit_kwargs.get("do_not_specialize_on_alignment") or ()
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsa or p.name in dnsa)
              for i, p in enumerate(sig.parameters.values())]
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    backend = _cuda_backend()
    signature, constexprs, attrs = [], [], []
    for kp in params:
        value = bound.arguments[kp.name]
        if isinstance(value, (tuple, list)):
            raise TypeError(f"{fn.__name__}: tuple argument {kp.name} is not mirrored by the launch recorder")
        if kp.is_constexpr:
            ty, attr = "constexpr", None
        else:
            spec_value = not kp.do_not_specialize
            ty, attr = _specializer()(backend, value, kp.is_const, spec_value,
                                      not kp.do_not_specialize_on_alignment)
            if kp.annotation_type:
                if kp.annotation_type == "u1" or kp.annotation_type[:2] in ("fp", "bf"):
                    spec_value = False
                ty, attr = (kp.annotation_type, attr) if spec_value else (kp.annotation_type, None)
        signature.append((kp.name, ty))
        if ty == "constexpr":
            constexprs.append((kp.name, _encode(value)))
            attr = ""  # _pack_args gives constexprs an empty attribute list
        if isinstance(attr, str):
            attrs.append((kp.name, attr))
    return Spec(fn.__module__, fn.__qualname__, os.path.realpath(fn.__code__.co_filename), tuple(signature),
                tuple(constexprs), tuple(attrs), tuple(sorted((k, _encode(v)) for k, v in options.items())))


@dataclass
class Recording:
    """What record() saw: specs in launch order, duplicates removed."""
    specs: dict = field(default_factory=dict)  # Spec -> number of launches
    tag: object = None  # set by the caller; every spec remembers the tags it was launched under
    tags: dict = field(default_factory=dict)  # Spec -> set of tags

    def add(self, spec: Spec) -> None:
        self.specs[spec] = self.specs.get(spec, 0) + 1
        self.tags.setdefault(spec, set()).add(self.tag)


@contextlib.contextmanager
def record(execute: bool = False):
    """Record every Triton kernel launch in the block (kernels defined under TRITON_INTERPRET=1).

    execute=False skips running the kernels: only the launch arguments matter here, the interpreter is
    slow, and outputs are then uninitialised memory (fine for recording; the ops' values are tested elsewhere).
    Yields a Recording.
    """
    from triton.runtime.interpreter import InterpretedFunction

    rec = Recording()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            rec.add(specialize(self.fn, self.kwargs, args, kwargs))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield rec
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def compare_with_launcher():
    """Check specialize() against the installed Triton's own launcher code, launch by launch.

    Needs a process whose kernels are JITFunctions (defined without TRITON_INTERPRET) and launches on CPU
    tensors: each launch is not run but handed both to Triton's binder (create_function_from_signature) and
    JITFunction._pack_args with the CUDA backend, and to specialize(). Yields [launches, mismatches], with
    mismatches a list of (kernel, Triton's (signature, constexprs, attrs), ours). Triton 3.8's internals.
    """
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = _cuda_backend()
    result = [0, []]
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, dict(kwargs), bound, specialization, options)
        spec = specialize(self.fn, {"do_not_specialize": self.do_not_specialize,
                                    "do_not_specialize_on_alignment": self.do_not_specialize_on_alignment},
                          args, kwargs)
        ours = (dict(spec.signature), {(self.arg_names.index(k),): _decode(v) for k, v in spec.constexprs},
                {(self.arg_names.index(k),): backend.parse_attr(v) for k, v in spec.attrs})
        result[0] += 1
        if ours != (signature, constexprs, attrs):
            result[1].append((spec.kernel, repr((signature, constexprs, attrs)), repr(ours)))

    JITFunction.run = run
    try:
        yield result
    finally:
        JITFunction.run = original


def covering_subset(specs) -> list[Spec]:
    """A subset of specs that still has, for every kernel and combination of pointer dtypes, every constexpr
    value and every integer argument type (i32, i64, a constexpr 1) seen in specs, chosen greedily (the spec
    that adds the most unseen ones first, the earlier on ties). Divisibility attributes are not kept apart.

    For a second architecture: what differs between targets is mostly per dtype (which instructions exist,
    e.g. bf16 atomics) and per block size (resources), which this keeps.
    """
    def features(s):
        return ({(p, "=", repr(v)) for p, v in s.constexprs}
                | {(p, ":", t) for p, t in s.signature if t != "constexpr" and not t.startswith("*")})

    groups: dict = {}
    for s in dict.fromkeys(specs):
        groups.setdefault((s.module, s.name, tuple(t for _, t in s.signature if t.startswith("*"))), []).append(s)
    chosen = []
    for members in groups.values():
        need = set().union(*(features(s) for s in members))
        while need:
            best = max(members, key=lambda s: len(features(s) & need))  # max keeps the first of equals
            chosen.append(best)
            need -= features(best)
    return chosen


# ---- compiling, in subprocesses without TRITON_INTERPRET ----------------------------------------------------
@dataclass
class Result:
    spec: Spec
    arch: int
    ok: bool
    error: str = ""
    seconds: float = 0.0


def compile_specs(pairs, jobs: int = 2, timeout: float = WORKER_TIMEOUT_S) -> list[Result]:
    """Compile each (spec, arch) pair (arch 80, 90 ...: sm_80, sm_90) in `jobs` worker processes.

    Returns one Result per pair. A worker that dies (a compiler crash) turns its unfinished pairs into
    failures naming the pair it was compiling and the worker's stderr.
    """
    pairs = list(pairs)
    jobs = max(1, min(jobs, len(pairs)))
    shards = [pairs[i::jobs] for i in range(jobs)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the tree this vpfast comes from
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vpfast-aot-") as tmp:
        procs = []
        for i, shard in enumerate(shards):
            inp, out = os.path.join(tmp, f"in{i}.json"), os.path.join(tmp, f"out{i}.json")
            with open(inp, "w") as f:
                json.dump([[s.to_json(), a] for s, a in shard], f)
            wenv = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{i}"))
            # stdout carries the index of the pair being compiled, so a crash can be attributed
            p = subprocess.Popen([sys.executable, "-m", "vpfast._triton_aot", inp, out], cwd=root, env=wenv,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((p, shard, out))
        deadline = time.monotonic() + timeout
        for p, shard, out in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
                stderr += f"\n(worker killed after {timeout:.0f} s)"
            done = {}
            if os.path.exists(out):
                with open(out) as f:
                    for r in json.load(f):
                        done[r["index"]] = r
            started = [int(x) for x in stdout.split()] if stdout else []
            for i, (s, a) in enumerate(shard):
                if i in done:
                    r = done[i]
                    results.append(Result(s, a, r["ok"], r["error"], r["seconds"]))
                else:
                    what = ("the worker died compiling this one" if started and started[-1] == i
                            else "not compiled: the worker died before it")
                    results.append(Result(s, a, False, f"{what} (exit {p.returncode}):\n{stderr[-4000:]}"))
    return results


def _compile_one(spec: Spec, arch: int):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(spec.module)
    fn = getattr(mod, spec.name)
    src_file = os.path.realpath(fn.fn.__code__.co_filename)
    if src_file != spec.file:
        raise RuntimeError(f"the worker imported {spec.module} from {src_file}, the recording from {spec.file}")
    backend = _cuda_backend()
    constexprs = {k: _decode(v) for k, v in spec.constexprs}
    attrs = {(fn.arg_names.index(k),): backend.parse_attr(v) for k, v in spec.attrs}
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=constexprs, attrs=attrs)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options={k: _decode(v) for k, v in spec.options})


def error_text(e: BaseException) -> str:
    """The error and its causes: Triton's CompilationError shows where, its cause says what."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n-- caused by --\n".join(parts)


def _worker(inp: str, out: str) -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "the compile worker must run without TRITON_INTERPRET"
    with open(inp) as f:
        pairs = [(Spec.from_json(s), a) for s, a in json.load(f)]
    results = []
    for i, (spec, arch) in enumerate(pairs):
        print(i, flush=True)
        t = time.perf_counter()
        try:
            _compile_one(spec, arch)
            ok, err = True, ""
        except Exception as e:  # noqa: BLE001  (every compiler error is a finding to report)
            ok, err = False, error_text(e)
        results.append({"index": i, "ok": ok, "error": err, "seconds": time.perf_counter() - t})
        with open(out + ".tmp", "w") as f:  # partial results survive a later crash
            json.dump(results, f)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
