// DDR loss arithmetic shared by csrc/cpu/ddr_loss.cpp and csrc/cuda/ddr_loss.cu.
//
// Rows are (b, t) pairs, t = 0..T-2, with logits a = (P[t+1] - P[t]) / tau and b = (Y[t+1] - Y[t]) / tau
// over D = C*H*W elements. The forward pass leaves six numbers per row, so that the backward pass is a
// single elementwise sweep with no D-sized buffer:
//   ma = max(a), ia = 1 / sum(exp(a - ma)) (same for b) -> p = exp(a - ma) * ia, q = exp(b - mb) * ib
//   sp = sum_d p * dl/dp,  sq = sum_d q * dl/dq          -> the softmax Jacobian's rank-one term
// (p is not formed as exp(a - logsumexp(a)): rounding logsumexp to the logits' magnitude would shift every
// p by the same relative error, up to 1e-3 in float32 for logits in the thousands.)
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common/math.h"

namespace vpfast {
namespace ddr {

constexpr int kStats = 6;  // ma, ia, mb, ib, sp, sq

// One element's loss term p*log(p/(q+eps)+eps) and its contributions to sp and sq, given p and q.
// (Two divisions: p*r/(re*qe) = r*r/re with r = p/qe.)
template <typename T>
VPFAST_HD void forward_terms(T p, T q, T eps, T& loss, T& sp, T& sq) {
  const T r = p / (q + eps);
  const T re = r + eps;
  const T inv_re = T(1) / re;
  const T log_re = fast_log<T>(re);
  loss = p * log_re;
  sp = p * (log_re + r * inv_re);  // p * dl/dp
  sq = -q * (r * r * inv_re);      // q * dl/dq
}

// forward_terms from the logits a, b and the row's statistics
template <typename T>
VPFAST_HD void forward_elem(T a, T b, const T* stats, T eps, T& loss, T& sp, T& sq) {
  forward_terms<T>(fast_exp<T>(a - stats[0]) * stats[1], fast_exp<T>(b - stats[2]) * stats[3], eps, loss, sp, sq);
}

// Gradient of one row's summed loss with respect to its logits a and b (before the 1/tau and the mean).
template <typename T>
VPFAST_HD void grad_logits(T a, T b, const T* stats, T eps, T& ga, T& gb) {
  const T p = fast_exp<T>(a - stats[0]) * stats[1];
  const T q = fast_exp<T>(b - stats[2]) * stats[3];
  const T r = p / (q + eps);
  const T re = r + eps;
  const T inv_re = T(1) / re;
  ga = p * (fast_log<T>(re) + r * inv_re - stats[4]);
  gb = q * (-(r * r * inv_re) - stats[5]);
}

// ---- host side, shared by the CPU and CUDA wrappers ----
inline void check_inputs(const char* fn, const at::Tensor& pred, const at::Tensor& target) {
  TORCH_CHECK(pred.dim() == 5 && pred.sizes() == target.sizes() && pred.size(1) >= 3, fn,
              ": pred and target must be equal [B, T, C, H, W] with T >= 3");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), fn, ": dtype mismatch");
}

// the backward pass's statistics: [B, T-1, kStats] values in pred's arithmetic type (float32 for half types)
inline void check_stats(const char* fn, const at::Tensor& stats, const at::Tensor& pred) {
  TORCH_CHECK(stats.numel() == pred.size(0) * (pred.size(1) - 1) * kStats &&
                  stats.scalar_type() == at::toOpMathType(pred.scalar_type()),
              fn, ": stats has the wrong size or dtype");
}

}  // namespace ddr
}  // namespace vpfast
