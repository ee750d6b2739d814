// Tensor-side helpers of the fused LSTM CPU kernels (cpu/stlstm.cpp, cpu/convlstm.cpp): operands are read
// plane by plane in place, so only the H*W planes must be contiguous.
#pragma once
#include <ATen/ATen.h>

#include "common/stlstm.h"

namespace vpfast {
namespace lstm {

// A [B, K, H, W] tensor whose H*W planes are contiguous (any batch/channel strides); others are copied.
inline at::Tensor planar(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  const bool ok = (W == 1 || t.stride(3) == 1) && (H == 1 || t.stride(2) == W);
  return ok ? t : t.contiguous();
}

template <typename T>
Planes<T> planes(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

}  // namespace lstm
}  // namespace vpfast
