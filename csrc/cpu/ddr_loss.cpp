// DDR loss, CPU. Forward: one task per (b, t) row, three sweeps over the row while it sits in cache (max; sum
// of exponentials, kept in a scratch row; loss terms), leaving the row's statistics for the backward pass.
// Backward: one task per (sequence, chunk of the frame), walking the frames in order so that each row's logit
// gradient is computed once (see backward_chunk and common/ddr_loss.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/denormals.h"
#include "common/ddr_loss.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

// Passes 1 and 2 over a row: the maxima of the logits a = (p1 - p0) / tau, b = (y1 - y0) / tau, and
// ex = exp(a - ma), ey = exp(b - mb) into the scratch rows ex, ey of D elements; stats[0..3] = ma, 1/sum ex,
// mb, 1/sum ey.
template <typename T>
VPFAST_CPU_CLONES void row_exp(const T* p0, const T* p1, const T* y0, const T* y1, int64_t D, T inv_tau,
                               T* stats, T* ex, T* ey) {
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
  stats[0] = ma;
  stats[1] = T(1) / sa;
  stats[2] = mb;
  stats[3] = T(1) / sb;
}

// Pass 3 of the forward pass: the row's loss and stats[4], stats[5] = sp, sq from the exponentials.
template <typename T>
VPFAST_CPU_CLONES void row_terms(const T* ex, const T* ey, int64_t D, T eps, T* stats, double* row_loss) {
  const T ia = stats[1], ib = stats[3];
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

// Pass 3 of the fused forward+gradient: as row_terms, and in place of the exponentials p and q, beside them
// the per-element terms p * dl/dp (ap) and q * dl/dq (bq, only with TARGET).
template <typename T, bool TARGET>
VPFAST_CPU_CLONES void row_terms_grad(T* ex, T* ey, int64_t D, T eps, T* stats, double* row_loss, T* ap, T* bq) {
  const T ia = stats[1], ib = stats[3];
  T loss = 0, sp = 0, sq = 0;
#pragma omp simd reduction(+ : loss, sp, sq)
  for (int64_t d = 0; d < D; ++d) {
    const T p = ex[d] * ia, q = ey[d] * ib;
    T l, a_, b_;
    ddr::forward_terms<T>(p, q, eps, l, a_, b_);
    loss += l;
    sp += a_;
    ex[d] = p;
    ap[d] = a_;
    if constexpr (TARGET) {
      sq += b_;
      ey[d] = q;
      bq[d] = b_;
    }
  }
  stats[4] = sp;
  stats[5] = sq;
  *row_loss = static_cast<double>(loss);
}

// The fused forward+gradient stores gradient elements below kept_min<T>() in magnitude as 0. Its autograd
// backward multiplies the stored gradients by the incoming one in PyTorch (no flushed denormals there); with
// an incoming gradient below 1 (a weighted loss term, as TAU's 0.1 * DDR) the products of elements near the
// smallest normal number would be denormal and cost a microcode assist each: 2 ms of a 2.3 ms step on randn
// frames. 2^26 times the smallest normal number: any incoming gradient above 2^-26 gives normal numbers or 0.
// The elements dropped are below 1e-30 (float32) while the row's gradient is of order 1 / (tau * B * T * D).
template <typename T> constexpr T kept_min() { return std::numeric_limits<T>::min() * T(67108864); }
template <typename T> VPFAST_HD T drop_tiny(T v) { return std::abs(v) < kept_min<T>() ? T(0) : v; }

// Pass 4 of the fused forward+gradient: the row's logit gradient g = x - p * s (the softmax Jacobian applied to
// the terms x = p * dl/dp), left in x for the next frame, and frame t's gradient
// out = scale * (prev - g), where prev is the previous row's g (null for the first row); with out null, only g.
template <typename T>
VPFAST_CPU_CLONES void row_grad(const T* p, T s, T scale, const T* prev, T* x, T* out, int64_t D) {
  if (!out) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] - p[d] * s;
  } else if (prev) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T g = x[d] - p[d] * s;
      x[d] = g;
      out[d] = drop_tiny(scale * (prev[d] - g));
    }
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T g = x[d] - p[d] * s;
      x[d] = g;
      out[d] = drop_tiny(-scale * g);
    }
  }
}

// out = scale * x (the last frame's gradient, from the last row alone)
template <typename T> VPFAST_CPU_CLONES void scaled_copy(const T* x, T scale, T* out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = drop_tiny(scale * x[d]);
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
  ddr::check_inputs("vpfast::ddr_loss_forward", pred, target);
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
    cpu::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> ex(2 * D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (T_ - 1), t = r % (T_ - 1);
        const int64_t off = (b * T_ + t) * D;
        row_exp<scalar_t>(p + off, p + off + D, y + off, y + off + D, D, inv_tau, st + r * ddr::kStats, ex.data(),
                          ex.data() + D);
        row_terms<scalar_t>(ex.data(), ex.data() + D, D, e, st + r * ddr::kStats, &row_loss[r]);
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
  ddr::check_inputs("vpfast::ddr_loss_backward", pred, target);
  ddr::check_stats("vpfast::ddr_loss_backward", stats, pred);
  const auto P = pred.contiguous(), Y = target.contiguous(), S = stats.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_);
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
    cpu::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
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

// Forward and gradient in one call, for a caller that will differentiate (the cpp backend under autograd).
// The backward pass of ddr_loss_forward recomputes both exponentials, the log and two divisions per element,
// which the forward pass has just done: here each task walks the rows of its frames in order and, while a row
// is still in cache, turns its loss terms into the row's logit gradient and frame t's gradient
// scale * (g[t-1] - g[t]) (incoming gradient 1; the autograd backward multiplies by the real one). That halves
// the transcendental work of forward+backward, at the cost of keeping the gradients (pred-sized, and
// target-sized when need_target) from the forward pass to the backward pass instead of the row statistics.
// Tasks: (sequence, run of frames); a run that does not start at frame 0 also computes the row before it
// (for its g[t-1]) without counting its loss, so every row's loss is summed once, by the run of its frame.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ddr_loss_forward_grad_cpu(const at::Tensor& pred,
                                                                        const at::Tensor& target, double tau,
                                                                        double eps, bool need_target) {
  ddr::check_inputs("vpfast::ddr_loss_forward_grad", pred, target);
  const auto P = pred.contiguous(), Y = target.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_);
  const int64_t rows = B * (T_ - 1);
  auto gp = cpu::empty_output(P.sizes(), P.options());
  auto gy = need_target ? cpu::empty_output(Y.sizes(), Y.options()) : at::empty({0}, P.options());
  std::vector<double> row_loss(rows);
  // runs of frames per sequence: one when the sequences alone keep every thread busy (or there are none)
  const int64_t threads = at::get_num_threads();
  const int64_t runs = std::min<int64_t>(T_ - 1, B >= 2 * threads || B == 0 ? 1 : (2 * threads + B - 1) / B);
  const int64_t run_len = (T_ + runs - 1) / runs;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "ddr_loss_forward_grad_cpu", [&] {
    using T = scalar_t;
    const T* p = P.data_ptr<T>();
    const T* y = Y.data_ptr<T>();
    T* gpp = gp.data_ptr<T>();
    T* gyp = need_target ? gy.data_ptr<T>() : nullptr;
    const T inv_tau = static_cast<T>(1.0 / tau), e = static_cast<T>(eps);
    const T scale = static_cast<T>(1.0 / (tau * static_cast<double>(rows * D)));
    cpu::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
      // ex, ey: exponentials then p, q; ga/gb (cur) and their previous rows (prev)
      std::vector<T> buf(6 * D);
      T *ex = buf.data(), *ey = ex + D, *cur_a = ey + D, *cur_b = cur_a + D, *prev_a = cur_b + D,
        *prev_b = prev_a + D;
      T stats[ddr::kStats];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / runs, f0 = (task % runs) * run_len, f1 = std::min(T_, f0 + run_len);
        if (f0 >= f1) continue;
        bool have_prev = false;
        for (int64_t r = std::max<int64_t>(f0 - 1, 0); r < std::min(f1, T_ - 1); ++r) {
          const int64_t off = (b * T_ + r) * D;
          double loss;
          row_exp<T>(p + off, p + off + D, y + off, y + off + D, D, inv_tau, stats, ex, ey);
          if (need_target)
            row_terms_grad<T, true>(ex, ey, D, e, stats, &loss, cur_a, cur_b);
          else
            row_terms_grad<T, false>(ex, ey, D, e, stats, &loss, cur_a, nullptr);
          if (r >= f0) {  // frame r's gradient, and the row's loss, belong to this run
            row_loss[b * (T_ - 1) + r] = loss;
            row_grad<T>(ex, stats[4], scale, have_prev ? prev_a : nullptr, cur_a, gpp + off, D);
            if (need_target) row_grad<T>(ey, stats[5], scale, have_prev ? prev_b : nullptr, cur_b, gyp + off, D);
          } else {  // only g[f0 - 1], for frame f0
            row_grad<T>(ex, stats[4], scale, nullptr, cur_a, nullptr, D);
            if (need_target) row_grad<T>(ey, stats[5], scale, nullptr, cur_b, nullptr, D);
          }
          std::swap(prev_a, cur_a);
          std::swap(prev_b, cur_b);
          have_prev = true;
        }
        if (f1 == T_) {  // the last frame: only the last row touches it
          const int64_t off = (b * T_ + T_ - 1) * D;
          scaled_copy<T>(prev_a, scale, gpp + off, D);
          if (need_target) scaled_copy<T>(prev_b, scale, gyp + off, D);
        }
      }
    });
  });
  double total = 0;  // rows summed in a fixed order, so the loss does not depend on the thread count
  for (double v : row_loss) total += v;
  auto loss = at::scalar_tensor(total / static_cast<double>(rows * D), P.options());
  return {loss, gp, gy};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("ddr_loss_forward", &vpfast::ddr_loss_forward_cpu);
  m.impl("ddr_loss_backward", &vpfast::ddr_loss_backward_cpu);
  m.impl("ddr_loss_forward_grad", &vpfast::ddr_loss_forward_grad_cpu);
}
