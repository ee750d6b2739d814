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

// The operand checks of each fused op's entry points, shared by the CPU and CUDA wrappers. Absent optional
// operands are passed as nullptr.
inline void check_stlstm_gates_forward(const at::Tensor& c, const at::Tensor& h_g, const at::Tensor& m_g,
                                       const at::Tensor& m, const at::Tensor* x_g) {
  TORCH_CHECK(c.dim() == 4, "vpfast::stlstm_gates_forward: c must be [B, C, H, W]");
  check_operand("vpfast::stlstm", h_g, c, 4, "h_g");
  check_operand("vpfast::stlstm", m_g, c, 3, "m_g");
  check_operand("vpfast::stlstm", m, c, 1, "m");
  if (x_g) check_operand("vpfast::stlstm", *x_g, c, 7, "x_g");
}

inline void check_stlstm_gates_backward(const at::Tensor& c, const at::Tensor& grad_cm, const at::Tensor& grad_op,
                                        const at::Tensor& act, const at::Tensor& cm, const at::Tensor& m,
                                        const at::Tensor* grad_delta) {
  TORCH_CHECK(c.dim() == 4, "vpfast::stlstm_gates_backward: c must be [B, C, H, W]");
  check_operand("vpfast::stlstm", grad_cm, c, 2, "grad_cm");
  check_operand("vpfast::stlstm", grad_op, c, 1, "grad_o_part");
  check_operand("vpfast::stlstm", act, c, 4, "act");
  check_operand("vpfast::stlstm", cm, c, 2, "cm");
  check_operand("vpfast::stlstm", m, c, 1, "m");
  if (grad_delta) check_operand("vpfast::stlstm", *grad_delta, c, 2, "grad_delta");
}

// stage 2, forward (ref = o_part; a, b = o_m, last) and backward (ref = o; a, b = grad_h, h_or_tl)
inline void check_stlstm_output(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& a,
                                const char* a_name, const at::Tensor& b, const char* b_name,
                                const at::Tensor* highway) {
  TORCH_CHECK(ref.dim() == 4, op, ": ", ref_name, " must be [B, C, H, W]");
  check_operand("vpfast::stlstm", a, ref, 1, a_name);
  check_operand("vpfast::stlstm", b, ref, 1, b_name);
  if (highway) check_operand("vpfast::stlstm", *highway, ref, 1, "highway");
}

inline void check_convlstm_forward(const at::Tensor& c, const at::Tensor& h_g, const at::Tensor* x_g) {
  TORCH_CHECK(c.dim() == 4, "vpfast::convlstm_forward: c must be [B, C, H, W]");
  check_operand("vpfast::convlstm", h_g, c, 4, "h_g");
  if (x_g) check_operand("vpfast::convlstm", *x_g, c, 4, "x_g");
}

inline void check_convlstm_backward(const at::Tensor& c, const at::Tensor& act, const at::Tensor& c_new,
                                    const at::Tensor& h, const at::Tensor* grad_h, const at::Tensor* grad_c) {
  TORCH_CHECK(c.dim() == 4, "vpfast::convlstm_backward: c must be [B, C, H, W]");
  check_operand("vpfast::convlstm", act, c, 3, "act");
  check_operand("vpfast::convlstm", c_new, c, 1, "c_new");
  check_operand("vpfast::convlstm", h, c, 1, "h");
  if (grad_h) check_operand("vpfast::convlstm", *grad_h, c, 1, "grad_h");
  if (grad_c) check_operand("vpfast::convlstm", *grad_c, c, 1, "grad_c");
}

}  // namespace lstm
}  // namespace vpfast
