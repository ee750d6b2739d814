"""Build vpfast and its extension module vpfast._C.

The C++ CPU kernels are always compiled. The CUDA kernels are compiled when nvcc and a CUDA-enabled torch
are both present (no GPU is needed to compile them), or when VPFAST_FORCE_CUDA=1.

Build knobs (all optional, printed at build start):
  VPFAST_SKIP_CUDA=1      never compile the CUDA sources (fast local iterations)
  VPFAST_FORCE_CUDA=1     compile them even if detection says no (fails loudly if it cannot)
  VPFAST_DEBUG=1          -O0 -g, no NDEBUG
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "8.0;9.0+PTX" when no GPU is visible (SASS for
                          Ampere A100 and Hopper H100/H200, PTX of 9.0 for newer GPUs to JIT-compile);
                          with a GPU visible, torch builds for that GPU
  MAX_JOBS                parallel compile jobs; default from cores and memory
  CUDA_HOME               CUDA toolkit root; default: the directory that holds bin/nvcc
"""
import glob
import json
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    # torch guesses CUDA_HOME from the nvcc on PATH; on this machine kind that is a wrapper in
    # /usr/local/bin, which gives /usr/local (no CUDA headers there). A toolkit root must hold both
    # bin/nvcc and include/cuda_runtime.h.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if all(os.path.exists(os.path.join(c, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return c
    return None


def _nvidia_pip_includes():
    # torch's CUDA headers include cublas_v2.h / cusparse.h, which the pip nvidia-* wheels ship rather than
    # the toolkit; add every include dir those wheels provide.
    # Look on sys.path too: in a venv that inherits torch from another environment (a .pth file), the wheels
    # sit in that environment's site-packages, not in this interpreter's purelib.
    found = []
    bases = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + [p for p in sys.path if p]
    for base in dict.fromkeys(bases):
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if inc not in found:
                found.append(inc)
    return found


def _default_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # an nvcc job with torch headers peaks around 3 GiB
    return max(1, min(cores, int(mem_gib // 3)))


SKIP_CUDA = _flag("VPFAST_SKIP_CUDA")
FORCE_CUDA = _flag("VPFAST_FORCE_CUDA")
DEBUG = _flag("VPFAST_DEBUG")

cuda_home = None if SKIP_CUDA else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
os.environ.setdefault("MAX_JOBS", str(_default_jobs()))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

torch_has_cuda = torch.version.cuda is not None
WITH_CUDA = (not SKIP_CUDA) and (FORCE_CUDA or (cuda_home is not None and torch_has_cuda))
if WITH_CUDA and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    # SASS for the GPUs the package targets (A100: 8.0, H100/H200: 9.0), so neither runs JIT-compiled PTX, whose
    # first launch compiles every kernel in the extension; the newest as PTX too, JIT-compiled for later GPUs.
    # The second architecture is one more device pass per .cu file: about +30% of CUDA compile time (nvcc 13.0:
    # convlstm.cu 73 -> 96 and group_norm_silu.cu 66 -> 85 CPU-seconds against "8.0+PTX").
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if WITH_CUDA else []

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags = opt + [
    "-std=c++20",
    "-fopenmp-simd",  # honours `#pragma omp simd` (vectorised reductions)
    # at::parallel_for is an inline `#pragma omp parallel` in torch's headers: without -fopenmp it silently
    # runs on one thread. Compile-only flag: the GOMP symbols resolve to the libgomp that torch loads.
    "-fopenmp",
    "-fno-trapping-math",  # lets GCC if-convert the clamps in csrc/common/math.h and vectorise
    "-Wno-unused-function",
]
nvcc_flags = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
if not DEBUG:
    cxx_flags.append("-DNDEBUG")
    nvcc_flags.append("-DNDEBUG")
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []
if WITH_CUDA:
    include_dirs += _nvidia_pip_includes()
    define_macros.append(("VPFAST_WITH_CUDA", None))

build_info = {
    "version": VERSION,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "with_cuda": WITH_CUDA,
    "cuda_home": cuda_home if WITH_CUDA else None,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
    "cxx_flags": cxx_flags,
    "nvcc_flags": nvcc_flags if WITH_CUDA else None,
    "debug": DEBUG,
    "python": sys.version.split()[0],
    "sources": cpu_sources + cuda_sources,
}
print("vpfast build configuration:")
for key in ("torch", "torch_cuda", "with_cuda", "cuda_home", "cuda_arch_list", "debug"):
    print(f"  {key:15s} {build_info[key]}")
print(f"  {'MAX_JOBS':15s} {os.environ['MAX_JOBS']}")
print(f"  {'sources':15s} {len(cpu_sources)} C++, {len(cuda_sources)} CUDA")
if not WITH_CUDA:
    build_info["cuda_skipped"] = ("VPFAST_SKIP_CUDA was set" if SKIP_CUDA else "torch was a CPU-only build"
                                  if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)")
    print(f"  CUDA sources skipped: {build_info['cuda_skipped']}")

# the metadata is compiled into the module (vpfast._C.build_info()), so it can never disagree with the binary
_header = '// generated by setup.py\n#pragma once\n#define VPFAST_BUILD_INFO R"json(' + json.dumps(build_info) + ')json"\n'
_header_path = os.path.join(ROOT, "csrc", "build_info.h")
if not os.path.exists(_header_path) or open(_header_path).read() != _header:  # keep ninja's rebuilds incremental
    with open(_header_path, "w") as f:
        f.write(_header)


Ext = CUDAExtension if WITH_CUDA else CppExtension
ext = Ext(
    name="vpfast._C",
    sources=cpu_sources + cuda_sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if WITH_CUDA else {"cxx": cxx_flags},
)

setup(
    name="vpfast",
    version=VERSION,
    description="Fast kernels, layers and models for spatiotemporal video prediction (PyTorch)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["vpfast", "vpfast.*"]) + ["vpfast.kernels", "vpfast.benchmarks"],
    package_dir={"vpfast.kernels": "kernels", "vpfast.benchmarks": "benchmarks"},
    package_data={"vpfast": ["data/*.npz"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-image", "torchvision"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["vpfast=vpfast.cli:main"]},
    zip_safe=False,
)
