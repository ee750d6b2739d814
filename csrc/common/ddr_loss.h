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
#include "common/math.h"

namespace vpfast {
namespace ddr {

constexpr int kStats = 6;  // ma, ia, mb, ib, sp, sq

// One element's loss term p*log(p/(q+eps)+eps) and its contributions to sp and sq.
template <typename T>
VPFAST_HD void forward_elem(T a, T b, const T* stats, T eps, T& loss, T& sp, T& sq) {
  const T p = fast_exp<T>(a - stats[0]) * stats[1];
  const T q = fast_exp<T>(b - stats[2]) * stats[3];
  const T qe = q + eps;
  const T r = p / qe;
  const T re = r + eps;
  const T log_re = fast_log<T>(re);
  loss = p * log_re;
  sp = p * (log_re + r / re);  // p * dl/dp
  sq = -q * p * r / (re * qe);  // q * dl/dq
}

// Gradient of one row's summed loss with respect to its logits a and b (before the 1/tau and the mean).
template <typename T>
VPFAST_HD void grad_logits(T a, T b, const T* stats, T eps, T& ga, T& gb) {
  const T p = fast_exp<T>(a - stats[0]) * stats[1];
  const T q = fast_exp<T>(b - stats[2]) * stats[3];
  const T qe = q + eps;
  const T r = p / qe;
  const T re = r + eps;
  ga = p * (fast_log<T>(re) + r / re - stats[4]);
  gb = q * (-p * r / (re * qe) - stats[5]);
}

}  // namespace ddr
}  // namespace vpfast
