// Host side of the fused LSTM kernels (stlstm, convlstm) on CPU and CUDA: operand checks and the strided
// plane views the kernels read. Operands are read plane by plane in place, so only the H*W planes must be
// contiguous.
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

// planes(t) when on, an empty view otherwise (an optional operand)
template <typename T>
Planes<T> planes_opt(bool on, const at::Tensor& t) {
  return on ? planes<T>(t) : Planes<T>{nullptr, 0, 0};
}

// t must be [B, k*C, H, W] for c of shape [B, C, H, W], with c's dtype and device.
inline void check_operand(const char* op, const at::Tensor& t, const at::Tensor& c, int64_t k, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == c.size(0) && t.size(1) == k * c.size(1) && t.size(2) == c.size(2) &&
                  t.size(3) == c.size(3),
              op, ": ", what, " must be [B, ", k, "C, H, W] for c of shape ", c.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == c.scalar_type() && t.device() == c.device(), op, ": ", what,
              " must match c's dtype and device");
}

}  // namespace lstm
}  // namespace vpfast
