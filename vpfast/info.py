"""`python -m vpfast.info` / `vpfast info`: what this installation can run, and why not.

Prints versions, build metadata of vpfast._C, CPU capability and threads, the op x backend table with the
reason for every backend that cannot run here, and per device (cpu, cuda) what auto picks for each op and why:
the op's preference order for that device (`Op.prefer`) and the first backend in it that can run there, with
the dtypes each backend declares (`Op.dtypes`).
"""
from __future__ import annotations

import os
import platform

import torch

from . import _ext
from ._dispatch import BACKENDS, REGISTRY, Op

DEVICES = ("cpu", "cuda")


def _triton_version() -> str:
    if not _ext.TRITON_INSTALLED:
        return "not installed"
    try:
        import triton

        return triton.__version__
    except Exception as e:  # a broken Triton install should not break the report
        return f"installed but fails to import ({e})"


def report() -> str:
    import vpfast  # noqa: F401  (registers every op)

    lines = ["vpfast " + vpfast.__version__, ""]
    lines.append(f"python           {platform.python_version()} ({platform.machine()})")
    lines.append(f"torch            {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    lines.append(f"CUDA available   {torch.cuda.is_available()}"
                 + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    lines.append(f"triton           {_triton_version()}"
                 + ("  [TRITON_INTERPRET=1]" if _ext.triton_interpret() else ""))
    lines.append(f"CPU capability   {torch.backends.cpu.get_cpu_capability()}")
    lines.append(f"threads          {torch.get_num_threads()} (cores: {os.cpu_count()})")
    lines.append(f"VPFAST_BACKEND   {os.environ.get('VPFAST_BACKEND', '(unset: auto)')}")
    lines.append("")
    info = _ext.build_info()
    if info:
        lines.append("extension vpfast._C: loaded")
        for key in ("version", "torch", "torch_cuda", "with_cuda", "cuda_home", "cuda_arch_list", "debug"):
            lines.append(f"  {key:15s} {info.get(key)}")
        lines.append(f"  {'cxx_flags':15s} {' '.join(info.get('cxx_flags') or [])}")
        try:
            cache = _ext.output_cache_info()
            lines.append(f"  {'output cache':15s} limit {cache['limit_bytes'] >> 20} MiB "
                         f"(VPFAST_CPU_OUTPUT_CACHE_MB), {cache['cached_bytes'] >> 20} MiB cached")
        except RuntimeError as e:  # a malformed VPFAST_CPU_OUTPUT_CACHE_MB
            lines.append(f"  {'output cache':15s} ERROR: {str(e).splitlines()[0]}")
        if info.get("torch") != torch.__version__:
            lines.append(f"  WARNING: built for torch {info.get('torch')}, running {torch.__version__}")
    else:
        lines.append(f"extension vpfast._C: NOT loaded - {_ext.LOAD_ERROR}")
    lines.append("")
    width = max([len(n) for n in REGISTRY] + [2])
    lines.append(f"{'op':{width}s}  " + "  ".join(f"{b:7s}" for b in BACKENDS))
    notes = []
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        cells = []
        for b in BACKENDS:
            why = op.static_reasons(b)
            if not why:
                cells.append("yes")
            else:
                notes.append(f"  {name}/{b}: " + "; ".join(why))
                cells.append("no")
        lines.append(f"{name:{width}s}  " + "  ".join(f"{c:7s}" for c in cells))
    if notes:
        lines += ["", "why not:"] + notes
    for device in DEVICES:
        lines += [""] + auto_report(device)
    lines += ["", "dtypes each fused backend takes (Op.dtypes; other dtypes go to torch under auto):"]
    lines += dtype_table()
    lines += ["", "auto picks, per call, the first backend of the op's order for the inputs' device that can run "
                  "them (device, dtype, shape); the tables above are that choice for inputs every backend takes."]
    return "\n".join(lines)


def device_reasons(op: Op, backend: str, device: str) -> list[str]:
    """Why auto would pass over `backend` for inputs on `device`, as far as that is known without the inputs:
    the backend's static reasons and the device rules of Op.reasons (cpp takes CPU tensors, cuda CUDA tensors,
    triton CUDA tensors when a GPU runs it, and auto never picks Triton's interpreter)."""
    why = op.static_reasons(backend)
    if backend not in op.impls:
        return why
    if device == "cuda" and not torch.cuda.is_available():
        why.append("no CUDA device is available")
    if backend == "cpp" and device != "cpu":
        why.append("cpp needs cpu tensors")
    elif backend == "cuda" and device != "cuda":
        why.append("cuda needs cuda tensors")
    elif backend == "triton":
        if device == "cpu":
            why.append("auto never picks Triton for CPU tensors (the interpreter is for testing)")
        elif _ext.triton_interpret():
            why.append("TRITON_INTERPRET=1 runs Triton on CPU tensors in this process")
    return list(dict.fromkeys(why))  # a reason found twice (static and by device) once


def auto_table(device: str) -> list[dict]:
    """Per op: {"op", "order" (auto's candidates for `device`, best first), "pick" (the first that can run
    there, "torch" if none), "passed_over" ({backend: [reasons]} for the candidates before the pick)}."""
    import vpfast  # noqa: F401  (registers every op)

    rows = []
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        order = tuple(op.auto_order(device=device))
        pick, passed = "torch", {}
        for cand in order:
            why = device_reasons(op, cand, device) if cand != "torch" else []
            if cand in op.impls and not why:
                pick = cand
                break
            passed[cand] = why or [f"{name} has no {cand} implementation"]
        rows.append({"op": name, "order": order, "pick": pick, "passed_over": passed})
    return rows


def auto_report(device: str) -> list[str]:
    rows = auto_table(device)
    if device == "cuda":
        title = ("auto on cuda (inputs on a GPU)" if torch.cuda.is_available() else
                 "auto on cuda: unavailable here (no CUDA device); the order is what auto tries on a GPU")
    else:
        title = "auto on cpu (inputs on the CPU)"
    width = max([len(r["op"]) for r in rows] + [2])
    lines = [title + ":", f"  {'op':{width}s}  {'order (Op.prefer)':26s}  picks"]
    notes: dict[tuple, list[str]] = {}  # (backend, reason) -> ops
    for r in rows:
        lines.append(f"  {r['op']:{width}s}  {' > '.join(r['order']):26s}  {r['pick']}")
        for b, why in r["passed_over"].items():
            for w in why:
                notes.setdefault((b, w), []).append(r["op"])
    if notes:
        lines.append("  passed over:")
        for (b, why), ops in notes.items():
            where = "every op" if len(ops) == len(rows) else ", ".join(ops)
            lines.append(f"    {b} ({where}): {why}")
    return lines


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}.get(
        dtype, str(dtype).split(".")[-1])


def dtype_table() -> list[str]:
    import vpfast  # noqa: F401  (registers every op)

    width = max([len(n) for n in REGISTRY] + [2])
    fused = ("cpp", "cuda", "triton")
    lines = [f"  {'op':{width}s}  " + "  ".join(f"{b:17s}" for b in fused)]
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        cells = [" ".join(_short(d) for d in op.dtypes.get(b, ())) if b in op.impls else "-" for b in fused]
        lines.append(f"  {name:{width}s}  " + "  ".join(f"{c:17s}" for c in cells))
    return lines


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
