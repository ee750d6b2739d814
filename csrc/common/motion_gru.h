// MotionGRU pointwise arithmetic shared by csrc/cpu/motion_gru.cpp and csrc/cuda/motion_gru.cu.
#pragma once
#include <ATen/ATen.h>

#include "common/math.h"

namespace vpfast {
namespace mgru {

template <typename T> VPFAST_HD T reset_fwd(T gr, T f) { return fast_sigmoid<T>(gr) * f; }

template <typename T> VPFAST_HD void reset_bwd(T g, T gr, T f, T& d_gr, T& d_f) {
  const T r = fast_sigmoid<T>(gr);
  d_gr = g * f * r * (T(1) - r);
  d_f = g * r;
}

template <typename T> VPFAST_HD void update_fwd(T gu, T o, T f, T d, T& f_out, T& d_out) {
  const T u = fast_sigmoid<T>(gu);
  const T t = fast_tanh<T>(o);
  const T dn = d + T(0.5) * (f - d);
  f_out = f * (T(1) - u) + t * u + dn;
  d_out = dn;
}

// F = f (1 - u) + t u + D and D = d + (f - d) / 2, so D's gradient also receives F's.
template <typename T>
VPFAST_HD void update_bwd(T g_f, T g_d, T gu, T o, T f, T& d_gu, T& d_o, T& d_f, T& d_d) {
  const T u = fast_sigmoid<T>(gu);
  const T t = fast_tanh<T>(o);
  const T g_dn = g_d + g_f;
  d_gu = g_f * (t - f) * u * (T(1) - u);
  d_o = g_f * u * (T(1) - t * t);
  d_f = g_f * (T(1) - u) + T(0.5) * g_dn;
  d_d = T(0.5) * g_dn;
}

// ---- host side, shared by the CPU and CUDA wrappers ----
inline void check_pair(const char* fn, const at::Tensor& gates, const at::Tensor& f) {
  TORCH_CHECK(f.dim() == 4 && gates.dim() == 4, fn, ": gates and f_prev must be 4-D");
  TORCH_CHECK(gates.size(0) == f.size(0) && gates.size(1) == 2 * f.size(1) && gates.size(2) == f.size(2) &&
                  gates.size(3) == f.size(3),
              fn, ": gates must be [B, 2M, H, W] for f_prev [B, M, H, W]");
  TORCH_CHECK(gates.scalar_type() == f.scalar_type(), fn, ": dtype mismatch");
}

inline void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& f) {
  TORCH_CHECK(t.sizes() == f.sizes() && t.scalar_type() == f.scalar_type(), fn, ": ", name,
              " must match f_prev in shape and dtype");
}

// The checks of each entry point: one per op, run by both the CPU and the CUDA wrapper.
inline void check_reset(const at::Tensor& gates, const at::Tensor& f_prev) {
  check_pair("vpfast::motion_gru_reset", gates, f_prev);
}

inline void check_reset_backward(const at::Tensor& grad, const at::Tensor& gates, const at::Tensor& f_prev) {
  check_pair("vpfast::motion_gru_reset_backward", gates, f_prev);
  check_like("vpfast::motion_gru_reset_backward", "grad", grad, f_prev);
}

inline void check_update(const at::Tensor& gates, const at::Tensor& o, const at::Tensor& f_prev,
                         const at::Tensor& d_prev) {
  check_pair("vpfast::motion_gru_update", gates, f_prev);
  check_like("vpfast::motion_gru_update", "o", o, f_prev);
  check_like("vpfast::motion_gru_update", "d_prev", d_prev, f_prev);
}

inline void check_update_backward(const at::Tensor& grad_f, const at::Tensor& grad_d, const at::Tensor& gates,
                                  const at::Tensor& o, const at::Tensor& f_prev) {
  const char* fn = "vpfast::motion_gru_update_backward";
  check_pair(fn, gates, f_prev);
  check_like(fn, "grad_f", grad_f, f_prev);
  check_like(fn, "grad_d", grad_d, f_prev);
  check_like(fn, "o", o, f_prev);
}

}  // namespace mgru
}  // namespace vpfast
