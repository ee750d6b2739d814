// The extension module vpfast._C. Ops register themselves with the dispatcher (TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp, TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); this file only exposes build metadata and the
// controls of the CPU output cache (csrc/cpu/output_cache.h).
#include <pybind11/pybind11.h>
#include <string>

#include "build_info.h"
#include "cpu/output_cache.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vpfast compiled kernels (ops live under torch.ops.vpfast)";
  m.def("build_info", []() { return std::string(VPFAST_BUILD_INFO); }, "JSON string with build metadata");
  m.def("output_cache_stats", []() {
    const auto s = vpfast::cpu::output_cache_stats();
    pybind11::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  m.def("output_cache_set_limit", &vpfast::cpu::output_cache_set_limit);
  m.def("output_cache_clear", &vpfast::cpu::output_cache_clear);
#ifdef VPFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
