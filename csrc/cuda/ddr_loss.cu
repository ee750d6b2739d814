// DDR loss, CUDA. Forward: one block per (b, t) row with block-wide reductions (max, sum of exponentials,
// loss terms); backward: one thread per element (grid-stride). Arithmetic from common/ddr_loss.h, as on the
// CPU, run in at::opmath_type<scalar_t>: float for float/half/bfloat16 (elements converted on load, results
// rounded on store), double for double. The row statistics are kept in that type too.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>

#include "common/ddr_loss.h"

namespace vpfast {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Op>
__device__ T block_reduce(T v, T* smem, Op op) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] = op(smem[threadIdx.x], smem[threadIdx.x + s]);
    __syncthreads();
  }
  const T out = smem[0];
  __syncthreads();
  return out;
}

// (x1[d] - x0[d]) * inv_tau in the arithmetic type
template <typename T, typename S>
__device__ __forceinline__ T logit(const S* x1, const S* x0, int64_t d, T inv_tau) {
  return (static_cast<T>(x1[d]) - static_cast<T>(x0[d])) * inv_tau;
}

template <typename S, typename T = at::opmath_type<S>>
__global__ void forward_kernel(const S* __restrict__ P, const S* __restrict__ Y, int64_t T_, int64_t D,
                               T inv_tau, T eps, T* __restrict__ stats, double* __restrict__ row_loss) {
  __shared__ T smem[kThreads];
  const int64_t r = blockIdx.x, b = r / (T_ - 1), t = r % (T_ - 1);
  const S *p0 = P + (b * T_ + t) * D, *p1 = p0 + D, *y0 = Y + (b * T_ + t) * D, *y1 = y0 + D;
  auto mx = [](T x, T y) { return x > y ? x : y; };
  auto add = [](T x, T y) { return x + y; };
  T ma = -INFINITY, mb = -INFINITY;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    ma = mx(ma, logit<T>(p1, p0, d, inv_tau));
    mb = mx(mb, logit<T>(y1, y0, d, inv_tau));
  }
  ma = block_reduce<T>(ma, smem, mx);
  mb = block_reduce<T>(mb, smem, mx);
  T sa = 0, sb = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    sa += fast_exp<T>(logit<T>(p1, p0, d, inv_tau) - ma);
    sb += fast_exp<T>(logit<T>(y1, y0, d, inv_tau) - mb);
  }
  T st[ddr::kStats] = {ma, T(1) / block_reduce<T>(sa, smem, add), mb, T(1) / block_reduce<T>(sb, smem, add),
                       0, 0};
  T loss = 0, sp = 0, sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    T l, a_, b_;
    ddr::forward_elem<T>(logit<T>(p1, p0, d, inv_tau), logit<T>(y1, y0, d, inv_tau), st, eps, l, a_, b_);
    loss += l;
    sp += a_;
    sq += b_;
  }
  loss = block_reduce<T>(loss, smem, add);
  sp = block_reduce<T>(sp, smem, add);
  sq = block_reduce<T>(sq, smem, add);
  if (threadIdx.x == 0) {
    st[4] = sp;
    st[5] = sq;
    for (int k = 0; k < ddr::kStats; ++k) stats[r * ddr::kStats + k] = st[k];
    row_loss[r] = static_cast<double>(loss);
  }
}

template <typename S, typename T = at::opmath_type<S>>
__global__ void backward_kernel(const T* __restrict__ grad, const S* __restrict__ P, const S* __restrict__ Y,
                                const T* __restrict__ stats, int64_t B, int64_t T_, int64_t D, T inv_tau, T eps,
                                T scale_no_grad, S* __restrict__ gp, S* __restrict__ gy) {
  const T scale = scale_no_grad * grad[0];
  const int64_t n = B * T_ * D;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t f = i / D, b = f / T_, t = f % T_;
    const T* st = stats + b * (T_ - 1) * ddr::kStats;
    T ga = 0, gb = 0, a_, b_;
    if (t > 0) {
      ddr::grad_logits<T>(logit<T>(P + i, P + i - D, 0, inv_tau), logit<T>(Y + i, Y + i - D, 0, inv_tau),
                          st + (t - 1) * ddr::kStats, eps, a_, b_);
      ga += a_;
      gb += b_;
    }
    if (t < T_ - 1) {
      ddr::grad_logits<T>(logit<T>(P + i + D, P + i, 0, inv_tau), logit<T>(Y + i + D, Y + i, 0, inv_tau),
                          st + t * ddr::kStats, eps, a_, b_);
      ga -= a_;
      gb -= b_;
    }
    gp[i] = static_cast<S>(scale * ga);
    if (gy) gy[i] = static_cast<S>(scale * gb);
  }
}

std::tuple<at::Tensor, at::Tensor> ddr_loss_forward_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                          double tau, double eps) {
  ddr::check_inputs("vpfast::ddr_loss_forward", pred, target);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto P = pred.contiguous(), Y = target.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_), rows = B * (T_ - 1);
  auto stats = at::empty({B, T_ - 1, ddr::kStats}, P.options().dtype(at::toOpMathType(P.scalar_type())));
  auto row_loss = at::empty({rows}, P.options().dtype(at::kDouble));
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "vpfast::ddr_loss_forward: B * (T - 1) exceeds the grid");
  auto stream = at::cuda::getCurrentCUDAStream();
  // B = 0: no launch; the loss is then 0 / 0 = NaN, the mean over no elements, as on the CPU
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, P.scalar_type(),
                                    "ddr_loss_forward_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      forward_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          P.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), T_, D, static_cast<T>(1.0 / tau), static_cast<T>(eps),
          stats.data_ptr<T>(), row_loss.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto loss = (row_loss.sum() / static_cast<double>(rows * D)).to(P.scalar_type());
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> ddr_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred,
                                                           const at::Tensor& target, const at::Tensor& stats,
                                                           double tau, double eps, bool need_target) {
  ddr::check_inputs("vpfast::ddr_loss_backward", pred, target);
  ddr::check_stats("vpfast::ddr_loss_backward", stats, pred);
  const auto acc = at::toOpMathType(pred.scalar_type());
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto P = pred.contiguous(), Y = target.contiguous(), S = stats.contiguous();
  const int64_t B = P.size(0), T_ = P.size(1), D = P.numel() / std::max<int64_t>(1, B * T_);
  // the incoming gradient is read in the arithmetic type (a float32 grad is not rounded to bf16 first)
  const auto G = grad.to(acc).contiguous();
  auto gp = at::empty_like(P);
  auto gy = need_target ? at::empty_like(Y) : at::empty({0}, P.options());
  const int64_t n = P.numel();
  if (n == 0) return {gp, gy};
  // grid-stride loop: 65535 blocks of 256 threads cover 16.7M elements per sweep, plenty to fill the GPU
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, P.scalar_type(),
                                  "ddr_loss_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        G.data_ptr<T>(), P.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), S.data_ptr<T>(), B, T_, D,
        static_cast<T>(1.0 / tau), static_cast<T>(eps),
        static_cast<T>(1.0 / (tau * static_cast<double>(B * (T_ - 1) * D))), gp.data_ptr<scalar_t>(),
        need_target ? gy.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gp, gy};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("ddr_loss_forward", &vpfast::ddr_loss_forward_cuda);
  m.impl("ddr_loss_backward", &vpfast::ddr_loss_backward_cuda);
}
