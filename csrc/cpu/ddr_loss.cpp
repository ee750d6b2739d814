// DDR loss, CPU. Forward: one task per (b, t) row, three sweeps over the row while it sits in cache (max,
// sum of exponentials, loss terms), leaving the row's statistics for the backward pass. Backward: one task
// per output frame, a single elementwise sweep (see common/ddr_loss.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>

#include "common/ddr_loss.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

template <typename T>
VPFAST_CPU_CLONES void forward_row(const T* p0, const T* p1, const T* y0, const T* y1, int64_t D, T inv_tau,
                                   T eps, T* stats, double* row_loss) {
  T ma = -std::numeric_limits<T>::infinity(), mb = ma;
#pragma omp simd reduction(max : ma, mb)
  for (int64_t d = 0; d < D; ++d) {
    const T a = (p1[d] - p0[d]) * inv_tau, b = (y1[d] - y0[d]) * inv_tau;
    ma = a > ma ? a : ma;
    mb = b > mb ? b : mb;
  }
  T sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
  for (int64_t d = 0; d < D; ++d) {
    sa += fast_exp<T>((p1[d] - p0[d]) * inv_tau - ma);
    sb += fast_exp<T>((y1[d] - y0[d]) * inv_tau - mb);
  }
  stats[0] = ma;
  stats[1] = T(1) / sa;
  stats[2] = mb;
  stats[3] = T(1) / sb;
  T loss = 0, sp = 0, sq = 0;
#pragma omp simd reduction(+ : loss, sp, sq)
  for (int64_t d = 0; d < D; ++d) {
    T l, a_, b_;
    ddr::forward_elem<T>((p1[d] - p0[d]) * inv_tau, (y1[d] - y0[d]) * inv_tau, stats, eps, l, a_, b_);
    loss += l;
    sp += a_;
    sq += b_;
  }
  stats[4] = sp;
  stats[5] = sq;
  *row_loss = static_cast<double>(loss);
}

// Gradient for one frame t of pred (x = P) or target (x = Y): scale * (g[t-1] - g[t]), where g[r] is the
// logit gradient of row r; rows outside 0..T-2 contribute nothing.
template <typename T>
VPFAST_CPU_CLONES void backward_frame(const T* P, const T* Y, const T* stats, int64_t t, int64_t T_, int64_t D,
                                      T inv_tau, T eps, T scale, T* gp, T* gy) {
  const bool has_prev = t > 0, has_cur = t < T_ - 1;
  const T* sprev = stats + (t - 1) * ddr::kStats;
  const T* scur = stats + t * ddr::kStats;
  const T* pm = P + (t - 1) * D;  // valid only if has_prev
  const T* pc = P + t * D;
  const T* pn = P + (t + 1) * D;  // valid only if has_cur
  const T* ym = Y + (t - 1) * D;
  const T* yc = Y + t * D;
  const T* yn = Y + (t + 1) * D;
  if (has_prev && has_cur) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      T ga0, gb0, ga1, gb1;
      ddr::grad_logits<T>((pc[d] - pm[d]) * inv_tau, (yc[d] - ym[d]) * inv_tau, sprev, eps, ga0, gb0);
      ddr::grad_logits<T>((pn[d] - pc[d]) * inv_tau, (yn[d] - yc[d]) * inv_tau, scur, eps, ga1, gb1);
      gp[d] = scale * (ga0 - ga1);
      if (gy) gy[d] = scale * (gb0 - gb1);
    }
  } else if (has_prev) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      T ga0, gb0;
      ddr::grad_logits<T>((pc[d] - pm[d]) * inv_tau, (yc[d] - ym[d]) * inv_tau, sprev, eps, ga0, gb0);
      gp[d] = scale * ga0;
      if (gy) gy[d] = scale * gb0;
    }
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      T ga1, gb1;
      ddr::grad_logits<T>((pn[d] - pc[d]) * inv_tau, (yn[d] - yc[d]) * inv_tau, scur, eps, ga1, gb1);
      gp[d] = -scale * ga1;
      if (gy) gy[d] = -scale * gb1;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> ddr_loss_forward_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                         double tau, double eps) {
  TORCH_CHECK(pred.dim() == 5 && pred.sizes() == target.sizes() && pred.size(1) >= 3,
              "vpfast::ddr_loss_forward: pred and target must be equal [B, T, C, H, W] with T >= 3");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "vpfast::ddr_loss_forward: dtype mismatch");
  const auto P = pred.contiguous(), Y = target.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_);
  const int64_t rows = B * (T_ - 1);
  auto stats = at::empty({B, T_ - 1, ddr::kStats}, P.options());
  std::vector<double> row_loss(rows);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "ddr_loss_forward_cpu", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* y = Y.data_ptr<scalar_t>();
    scalar_t* st = stats.data_ptr<scalar_t>();
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / tau), e = static_cast<scalar_t>(eps);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (T_ - 1), t = r % (T_ - 1);
        const int64_t off = (b * T_ + t) * D;
        forward_row<scalar_t>(p + off, p + off + D, y + off, y + off + D, D, inv_tau, e, st + r * ddr::kStats,
                              &row_loss[r]);
      }
    });
  });
  // rows summed in a fixed order, so the loss does not depend on the thread count
  double total = 0;
  for (double v : row_loss) total += v;
  auto loss = at::scalar_tensor(total / static_cast<double>(rows * D), P.options());
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> ddr_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                                          const at::Tensor& target, const at::Tensor& stats,
                                                          double tau, double eps, bool need_target) {
  TORCH_CHECK(pred.dim() == 5 && pred.sizes() == target.sizes(), "vpfast::ddr_loss_backward: bad shapes");
  const auto P = pred.contiguous(), Y = target.contiguous(), S = stats.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_);
  TORCH_CHECK(S.numel() == B * (T_ - 1) * ddr::kStats, "vpfast::ddr_loss_backward: stats has the wrong size");
  auto gp = cpu::empty_output(P.sizes(), P.options());
  auto gy = need_target ? cpu::empty_output(Y.sizes(), Y.options()) : at::empty({0}, P.options());
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "ddr_loss_backward_cpu", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* y = Y.data_ptr<scalar_t>();
    const scalar_t* st = S.data_ptr<scalar_t>();
    scalar_t* gpp = gp.data_ptr<scalar_t>();
    scalar_t* gyp = need_target ? gy.data_ptr<scalar_t>() : nullptr;
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / tau), e = static_cast<scalar_t>(eps);
    const scalar_t scale = static_cast<scalar_t>(g / (tau * static_cast<double>(B * (T_ - 1) * D)));
    at::parallel_for(0, B * T_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        const int64_t b = f / T_, t = f % T_;
        backward_frame<scalar_t>(p + b * T_ * D, y + b * T_ * D, st + b * (T_ - 1) * ddr::kStats, t, T_, D,
                                 inv_tau, e, scale, gpp + f * D, gyp ? gyp + f * D : nullptr);
      }
    });
  });
  return {gp, gy};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("ddr_loss_forward", &vpfast::ddr_loss_forward_cpu);
  m.impl("ddr_loss_backward", &vpfast::ddr_loss_backward_cpu);
}
