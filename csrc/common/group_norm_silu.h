// GroupNorm + SiLU arithmetic shared by csrc/cpu/group_norm_silu.cpp and csrc/cuda/group_norm_silu.cu.
//
// Per (sample n, group g) with M = (C / groups) * HW elements, per channel c of the group:
//   mean, rstd = 1 / sqrt(var + eps)       (biased variance, as GroupNorm)
//   xhat = (x - mean) * rstd,  a = xhat * w_c + b_c,  s = sigmoid(a),  y = a * s
// Backward, with g = dL/dy:
//   dy_a = g * s * (1 + a * (1 - s))        (d silu / d a)
//   per channel: A_c = sum dy_a,  B_c = sum dy_a * xhat      -> grad_bias, grad_weight (summed over n)
//   S1 = sum_c w_c A_c,  S2 = sum_c w_c B_c                   (over the group's channels)
//   grad_x = rstd * (w_c * dy_a - (S1 + xhat * S2) / M)
//          = dy_a * (rstd w_c) + (x - mean) * (-rstd^2 S2 / M) + (-rstd S1 / M)
// Statistics are accumulated as sums of (x - K) and (x - K)^2 with a shift K taken from the data (the
// group's first element), in double, which keeps var accurate even when |mean| >> std.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/math.h"

namespace vpfast {
namespace gns {

// sigmoid(a) = 1 / (1 + exp(-a)) without fast_sigmoid's sign split (fewer instructions in the CPU loops).
// On the CPU fast_exp clamps its argument to the finite range, so for a below about -88 (float) 1 + exp(-a)
// is the largest finite exp, not inf: sigmoid(a) and silu(a) come out as tiny numbers (|silu| < 1e-35, or
// 0 under the CPU kernels' flush-to-zero) instead of the exact, even tinier ones. On the device exp(-a) = inf
// gives sigmoid = 0 and silu = -0. Never NaN either way (no inf * 0 is formed).
template <typename T>
VPFAST_HD T sigmoid(T a) {
  return T(1) / (T(1) + fast_exp<T>(-a));
}

// silu(a) = a * sigmoid(a)
template <typename T>
VPFAST_HD T silu(T a) {
  return a * sigmoid<T>(a);
}

// d silu(a) / d a, times the incoming gradient g
template <typename T>
VPFAST_HD T silu_backward(T g, T a) {
  const T s = sigmoid<T>(a);
  return g * s * (T(1) + a * (T(1) - s));
}

// The normalised, affine-transformed value a of one element.
template <typename T>
VPFAST_HD T affine(T x, T mean, T rstd_w, T b) {
  return (x - mean) * rstd_w + b;
}

// mean and rstd from the shifted sums over M elements: s1 = sum(x - K), s2 = sum((x - K)^2).
VPFAST_HD void finish_stats(double s1, double s2, double K, double M, double eps, double& mean, double& rstd) {
  const double d = s1 / M;
  double var = s2 / M - d * d;
  var = var > 0.0 ? var : 0.0;
  mean = K + d;
  rstd = 1.0 / sqrt(var + eps);
}

// Coefficients of grad_x = dy_a * cdy + (x - mean) * cx + c0 for one channel.
struct InputGradCoef {
  double cdy, cx, c0;
};

VPFAST_HD InputGradCoef input_grad_coef(double rstd, double w, double S1, double S2, double M) {
  return {rstd * w, -rstd * rstd * S2 / M, -rstd * S1 / M};
}

template <typename T>
VPFAST_HD T input_grad(T dy_a, T x, T mean, T cdy, T cx, T c0) {
  return dy_a * cdy + (x - mean) * cx + c0;
}

// ---- host side, shared by the CPU and CUDA wrappers --------------------------------------------------------
struct Geometry {
  int64_t N, C, HW, G, Cg;
  bool channels_last;  // 4-D channels_last (read in place); otherwise NCHW-contiguous after dense()
};

inline Geometry geometry(const at::Tensor& x, int64_t groups, const char* name) {
  TORCH_CHECK(x.dim() >= 2, name, ": x must be [N, C, *]");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, name, ": C must be divisible by groups");
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.HW *= x.size(d);
  g.G = groups;
  g.Cg = g.C / groups;
  TORCH_CHECK(g.HW > 0 || g.N == 0, name, ": empty spatial size");
  g.channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return g;
}

// x itself when the kernels can read its layout (NCHW-contiguous or 4-D channels_last), else a contiguous copy
inline at::Tensor dense(const at::Tensor& x, bool channels_last) {
  return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

inline void check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, int64_t C, const char* what) {
  if (p.has_value() && p->defined()) {
    TORCH_CHECK(p->numel() == C && p->scalar_type() == x.scalar_type() && p->device() == x.device(),
                "vpfast::group_norm_silu: ", what, " must be [C] with x's dtype and device");
  }
}

// the backward's operands besides x: grad like x, mean and rstd [N, groups] with x's dtype
inline void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& rstd, const Geometry& g) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "vpfast::group_norm_silu_backward: grad must match x");
  TORCH_CHECK(mean.numel() == g.N * g.G && rstd.numel() == g.N * g.G && mean.scalar_type() == x.scalar_type() &&
                  rstd.scalar_type() == x.scalar_type(),
              "vpfast::group_norm_silu_backward: mean and rstd must be [N, groups] with x's dtype");
}

}  // namespace gns
}  // namespace vpfast
