// The extension module vpfast._C. Ops register themselves with the dispatcher (TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp, TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); this file only exposes build metadata.
#include <pybind11/pybind11.h>
#include <string>

#include "build_info.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vpfast compiled kernels (ops live under torch.ops.vpfast)";
  m.def("build_info", []() { return std::string(VPFAST_BUILD_INFO); }, "JSON string with build metadata");
#ifdef VPFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
