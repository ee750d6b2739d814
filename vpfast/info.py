"""`python -m vpfast.info` / `vpfast info`: what this installation can run, and why not.

Prints versions, build metadata of vpfast._C, CPU capability and threads, and the op x backend table with
the reason for every backend that cannot run here.
"""
from __future__ import annotations

import os
import platform

import torch

from . import _ext
from ._dispatch import BACKENDS, REGISTRY


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
    lines += ["", "auto picks, per call, the first of cuda, cpp, triton, torch that supports the inputs"]
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
