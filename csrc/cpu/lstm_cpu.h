// CPU side of the fused LSTM kernels' host code, shared by cpu/stlstm.cpp and cpu/convlstm.cpp.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>

#include "cpu/output_cache.h"

namespace vpfast {
namespace cpu {

// the outputs' allocator for the host side shared with CUDA (common/lstm_planes.h): the CPU output cache
inline at::Tensor lstm_alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options);
}

// plane rows (H*W elements each) per parallel task: about 16K elements, so small planes are not one task each
inline int64_t lstm_grain(int64_t hw) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hw)); }

// f(A, B) with two run-time flags as std::true_type / std::false_type: the row kernels' template flags
template <typename F>
void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

}  // namespace cpu
}  // namespace vpfast
