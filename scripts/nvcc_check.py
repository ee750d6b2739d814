"""Compile one CUDA source of vpfast with setup.py's flags, as a quick check without building everything.

    python scripts/nvcc_check.py csrc/cuda/depthwise_conv2d.cu [--arch 9.0 --arch 8.0] [-- -Xptxas -v]

Needs nvcc (CUDA_HOME or /usr/local/cuda) and a CUDA build of torch; no GPU. The object file goes to a
temporary directory and is thrown away; arguments after `--` go to nvcc (`-Xptxas -v`: registers, spills).
"""
import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--arch", action="append", help="compute capability, e.g. 9.0 (default: 8.0 and 9.0)")
    ap.add_argument("nvcc_args", nargs="*")
    a = ap.parse_args()
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    from torch.utils import cpp_extension as ce
    import torch

    incs = [os.path.join(ROOT, "csrc")] + ce.include_paths(device_type="cuda")
    for base in dict.fromkeys([sysconfig.get_paths()["purelib"]] + [p for p in sys.path if p]):
        incs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    gencode = []
    for arch in a.arch or ["8.0", "9.0"]:
        n = arch.replace(".", "")
        gencode += [f"-gencode=arch=compute_{n},code=sm_{n}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-c", a.source, "-o",
           os.path.join(tempfile.mkdtemp(), "out.o"), "-std=c++20", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG",
           "-DVPFAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "--compiler-options", "-fPIC",
           *ce.COMMON_NVCC_FLAGS, *gencode, *[f"-I{i}" for i in incs], *a.nvcc_args]
    print(" ".join(cmd[:4]), "...", " ".join(gencode), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
