// CPU side of the fused LSTM kernels' host code, shared by cpu/stlstm.cpp and cpu/convlstm.cpp.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "cpu/output_cache.h"

namespace vpfast {
namespace cpu {

// the outputs' allocator for the host side shared with CUDA (common/lstm_planes.h): the CPU output cache
inline at::Tensor lstm_alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options);
}

// plane rows (H*W elements each) per parallel task: about 16K elements, so small planes are not one task each
inline int64_t lstm_grain(int64_t hw) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hw)); }

}  // namespace cpu
}  // namespace vpfast
