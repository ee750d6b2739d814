// DDR loss, CPU. Forward: one task per (b, t) row, three sweeps over the row while it sits in cache (max; sum
// of exponentials, kept in a scratch row; loss terms), leaving the row's statistics for the backward pass.
// Backward: one task per (sequence, chunk of the frame), walking the frames in order so that each row's logit
// gradient is computed once (see backward_chunk and common/ddr_loss.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "common/ddr_loss.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

// ex, ey: scratch rows of D elements (the exponentials of pass 2, reused by pass 3)
template <typename T>
VPFAST_CPU_CLONES void forward_row(const T* p0, const T* p1, const T* y0, const T* y1, int64_t D, T inv_tau,
                                   T eps, T* stats, double* row_loss, T* ex, T* ey) {
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
    ex[d] = fast_exp<T>((p1[d] - p0[d]) * inv_tau - ma);
    ey[d] = fast_exp<T>((y1[d] - y0[d]) * inv_tau - mb);
    sa += ex[d];
    sb += ey[d];
  }
  const T ia = T(1) / sa, ib = T(1) / sb;
  stats[0] = ma;
  stats[1] = ia;
  stats[2] = mb;
  stats[3] = ib;
  T loss = 0, sp = 0, sq = 0;
#pragma omp simd reduction(+ : loss, sp, sq)
  for (int64_t d = 0; d < D; ++d) {
    T l, a_, b_;
    ddr::forward_terms<T>(ex[d] * ia, ey[d] * ib, eps, l, a_, b_);
    loss += l;
    sp += a_;
    sq += b_;
  }
  stats[4] = sp;
  stats[5] = sq;
  *row_loss = static_cast<double>(loss);
}

// Gradient for frames t of one chunk [d0, d0 + n) of a sequence: frame t of pred (x = P) or target (x = Y)
// gets scale * (g[t-1] - g[t]), where g[r] is the logit gradient of row r (rows outside 0..T-2 contribute
// nothing). Frame t's call computes row t's gradient once, keeps it in `cur` for frame t+1 (which reads it as
// `prev`), so every row's exp/log work is done once rather than for both frames it touches.
template <typename T, bool HAS_PREV, bool HAS_CUR>
VPFAST_CPU_CLONES void backward_chunk(const T* pc, const T* pn, const T* yc, const T* yn, const T* scur, int64_t n,
                                      T inv_tau, T eps, T scale, const T* prev_a, const T* prev_b, T* cur_a,
                                      T* cur_b, T* gp, T* gy) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    T ga1 = T(0), gb1 = T(0);
    if constexpr (HAS_CUR) {
      ddr::grad_logits<T>((pn[d] - pc[d]) * inv_tau, (yn[d] - yc[d]) * inv_tau, scur, eps, ga1, gb1);
      cur_a[d] = ga1;
      cur_b[d] = gb1;
    }
    if constexpr (HAS_PREV && HAS_CUR) {
      gp[d] = scale * (prev_a[d] - ga1);
      if (gy) gy[d] = scale * (prev_b[d] - gb1);
    } else if constexpr (HAS_PREV) {
      gp[d] = scale * prev_a[d];
      if (gy) gy[d] = scale * prev_b[d];
    } else {
      gp[d] = -scale * ga1;
      if (gy) gy[d] = -scale * gb1;
    }
  }
}

// elements per backward task: the four row buffers (prev/cur, pred/target) stay in L1
constexpr int64_t kChunk = 1024;

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
      std::vector<scalar_t> ex(2 * D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (T_ - 1), t = r % (T_ - 1);
        const int64_t off = (b * T_ + t) * D;
        forward_row<scalar_t>(p + off, p + off + D, y + off, y + off + D, D, inv_tau, e, st + r * ddr::kStats,
                              &row_loss[r], ex.data(), ex.data() + D);
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
  TORCH_CHECK(pred.dim() == 5 && pred.sizes() == target.sizes() && pred.size(1) >= 3,
              "vpfast::ddr_loss_backward: pred and target must be equal [B, T, C, H, W] with T >= 3");
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
    const int64_t chunks = (D + kChunk - 1) / kChunk;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(4 * kChunk);
      scalar_t *prev_a = buf.data(), *prev_b = prev_a + kChunk, *cur_a = prev_b + kChunk, *cur_b = cur_a + kChunk;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, d0 = (task % chunks) * kChunk, n = std::min(kChunk, D - d0);
        const scalar_t* pb = p + b * T_ * D + d0;
        const scalar_t* yb = y + b * T_ * D + d0;
        const scalar_t* sb = st + b * (T_ - 1) * ddr::kStats;
        for (int64_t t = 0; t < T_; ++t) {
          const int64_t f = b * T_ + t;
          const scalar_t* pc = pb + t * D;
          const scalar_t* yc = yb + t * D;
          const scalar_t* pn = pc + D;  // read only while t < T - 1
          const scalar_t* yn = yc + D;
          const scalar_t* scur = sb + t * ddr::kStats;
          scalar_t* gpt = gpp + f * D + d0;
          scalar_t* gyt = gyp ? gyp + f * D + d0 : nullptr;
          if (t == 0)
            backward_chunk<scalar_t, false, true>(pc, pn, yc, yn, scur, n, inv_tau, e, scale, prev_a, prev_b, cur_a,
                                                  cur_b, gpt, gyt);
          else if (t < T_ - 1)
            backward_chunk<scalar_t, true, true>(pc, pn, yc, yn, scur, n, inv_tau, e, scale, prev_a, prev_b, cur_a,
                                                 cur_b, gpt, gyt);
          else
            backward_chunk<scalar_t, true, false>(pc, pn, yc, yn, scur, n, inv_tau, e, scale, prev_a, prev_b, cur_a,
                                                  cur_b, gpt, gyt);
          std::swap(prev_a, cur_a);
          std::swap(prev_b, cur_b);
        }
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
