// GroupNorm + SiLU, CUDA. Forward: one block per (sample, group): a block reduction for the statistics, then
// an elementwise sweep. Backward: one block per (sample, group): per-channel block reductions of dL/da and
// dL/da * xhat (written as per-(sample, channel) partials), then the input gradient, recomputing dL/da from
// grad and x (rather than parking it in grad_x: one full-size write less, and never rounded to a half type);
// a second kernel sums the partials over the batch in order (deterministic, no atomics).
// Both NCHW-contiguous and 4-D channels_last inputs are read in place. Arithmetic from
// common/group_norm_silu.h, as on the CPU, in at::opmath_type<scalar_t> (float for float/half/bfloat16,
// double for double; statistics and partial sums in double); mean/rstd are kept in that type.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>

#include "common/group_norm_silu.h"

namespace vpfast {
namespace {

using gns::check_param;
using gns::dense;
using gns::Geometry;
using gns::geometry;

constexpr int kThreads = 256;

// deterministic tree sum over the block; every thread gets the result
__device__ double block_sum(double v, double* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const double out = smem[0];
  __syncthreads();
  return out;
}

struct Geo {
  int64_t C, HW, G, Cg;
  bool cl;  // channels_last
  // memory offset of element (n, c, pixel p)
  __device__ int64_t at(int64_t n, int64_t c, int64_t p) const { return cl ? (n * HW + p) * C + c : (n * C + c) * HW + p; }
  // the e-th element of group slice (n, g), in an order that keeps neighbouring threads on neighbouring addresses
  __device__ void split(int64_t e, int64_t& cl_, int64_t& p) const {
    if (cl) {
      cl_ = e % Cg;
      p = e / Cg;
    } else {
      cl_ = e / HW;
      p = e % HW;
    }
  }
};

template <typename S, typename T = at::opmath_type<S>>
__global__ void forward_kernel(const S* __restrict__ x, const S* __restrict__ w, const S* __restrict__ b,
                               S* __restrict__ y, T* __restrict__ mean, T* __restrict__ rstd, Geo geo, double eps) {
  __shared__ double smem[kThreads];
  const int64_t t = blockIdx.x, n = t / geo.G, g = t % geo.G, M = geo.Cg * geo.HW;
  const double K = static_cast<double>(x[geo.at(n, g * geo.Cg, 0)]);
  double s1 = 0, s2 = 0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    int64_t cl, p;
    geo.split(e, cl, p);
    const double d = static_cast<double>(x[geo.at(n, g * geo.Cg + cl, p)]) - K;
    s1 += d;
    s2 += d * d;
  }
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  double m, r;
  gns::finish_stats(s1, s2, K, static_cast<double>(M), eps, m, r);
  const T mT = static_cast<T>(m), rT = static_cast<T>(r);
  if (threadIdx.x == 0) {
    mean[t] = mT;
    rstd[t] = rT;
  }
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    int64_t cl, p;
    geo.split(e, cl, p);
    const int64_t c = g * geo.Cg + cl, o = geo.at(n, c, p);
    const T wc = w ? static_cast<T>(w[c]) : T(1), bc = b ? static_cast<T>(b[c]) : T(0);
    y[o] = static_cast<S>(gns::silu<T>(gns::affine<T>(static_cast<T>(x[o]), mT, rT * wc, bc)));
  }
}

template <typename S, typename T = at::opmath_type<S>>
__global__ void backward_kernel(const S* __restrict__ grad, const S* __restrict__ x, const S* __restrict__ w,
                                const S* __restrict__ b, const T* __restrict__ mean, const T* __restrict__ rstd,
                                S* __restrict__ gx, double* __restrict__ partA, double* __restrict__ partB, Geo geo,
                                bool need_x) {
  __shared__ double smem[kThreads];
  const int64_t t = blockIdx.x, n = t / geo.G, g = t % geo.G;
  const T mT = mean[t], rT = rstd[t];
  double S1 = 0, S2 = 0;
  for (int64_t cl = 0; cl < geo.Cg; ++cl) {
    const int64_t c = g * geo.Cg + cl;
    const T wc = w ? static_cast<T>(w[c]) : T(1), bc = b ? static_cast<T>(b[c]) : T(0), rw = rT * wc;
    double A = 0, B = 0;
    for (int64_t p = threadIdx.x; p < geo.HW; p += blockDim.x) {
      const int64_t o = geo.at(n, c, p);
      const T xc = static_cast<T>(x[o]) - mT;
      const T dy = gns::silu_backward<T>(static_cast<T>(grad[o]), xc * rw + bc);
      A += static_cast<double>(dy);
      B += static_cast<double>(dy) * static_cast<double>(xc);
    }
    A = block_sum(A, smem);
    B = block_sum(B, smem) * static_cast<double>(rT);
    if (threadIdx.x == 0) {
      partA[n * geo.C + c] = A;
      partB[n * geo.C + c] = B;
    }
    S1 += static_cast<double>(wc) * A;
    S2 += static_cast<double>(wc) * B;
  }
  if (!need_x) return;
  const int64_t M = geo.Cg * geo.HW;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    int64_t cl, p;
    geo.split(e, cl, p);
    const int64_t c = g * geo.Cg + cl, o = geo.at(n, c, p);
    const T wc = w ? static_cast<T>(w[c]) : T(1), bc = b ? static_cast<T>(b[c]) : T(0), rw = rT * wc;
    const T xv = static_cast<T>(x[o]);
    const T dy = gns::silu_backward<T>(static_cast<T>(grad[o]), (xv - mT) * rw + bc);
    const auto k = gns::input_grad_coef(static_cast<double>(rT), static_cast<double>(wc), S1, S2,
                                        static_cast<double>(M));
    gx[o] = static_cast<S>(
        gns::input_grad<T>(dy, xv, mT, static_cast<T>(k.cdy), static_cast<T>(k.cx), static_cast<T>(k.c0)));
  }
}

// grad_weight[c] = sum_n partB[n, c], grad_bias[c] = sum_n partA[n, c], in order of n
template <typename S>
__global__ void param_grad_kernel(const double* __restrict__ partA, const double* __restrict__ partB, int64_t N,
                                  int64_t C, S* __restrict__ gw, S* __restrict__ gb) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sa = 0, sb = 0;
  for (int64_t n = 0; n < N; ++n) {
    sa += partA[n * C + c];
    sb += partB[n * C + c];
  }
  if (gw) gw[c] = static_cast<S>(sb);
  if (gb) gb[c] = static_cast<S>(sa);
}

// the backward's operands besides x: grad like x, mean and rstd [N, groups] in x's arithmetic type (what the
// forward returned; gns::check_backward, used on the CPU, asks for x's dtype, which is the same there)
void check_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                         const Geometry& g) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "vpfast::group_norm_silu_backward: grad must match x");
  TORCH_CHECK(mean.numel() == g.N * g.G && rstd.numel() == g.N * g.G && mean.scalar_type() == acc &&
                  rstd.scalar_type() == acc,
              "vpfast::group_norm_silu_backward: mean and rstd must be [N, groups] in x's arithmetic type");
}

// the kernels' view of a gns::Geometry
Geo device_geo(const Geometry& g) { return Geo{g.C, g.HW, g.G, g.Cg, g.channels_last}; }

template <typename T>
const T* param_ptr(const c10::optional<at::Tensor>& p, at::Tensor& keep) {
  if (!p.has_value() || !p->defined()) return nullptr;
  keep = p->contiguous();
  return keep.data_ptr<T>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cuda(
    const at::Tensor& x_, int64_t groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const Geometry gm = geometry(x_, groups, "vpfast::group_norm_silu_forward");
  check_param(weight, x_, gm.C, "weight");
  check_param(bias, x_, gm.C, "bias");
  const Geo geo = device_geo(gm);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense(x_, geo.cl);
  const int64_t N = x.size(0);
  auto y = at::empty_like(x);
  const auto stat_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto mean = at::empty({N, geo.G}, stat_opts);
  auto rstd = at::empty({N, geo.G}, stat_opts);
  if (N == 0) return {y, mean, rstd};
  TORCH_CHECK(N * geo.G <= std::numeric_limits<int32_t>::max(), "vpfast::group_norm_silu_forward: N * groups "
              "exceeds the grid");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "group_norm_silu_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor wk, bk;
    const scalar_t* w = param_ptr<scalar_t>(weight, wk);
    const scalar_t* b = param_ptr<scalar_t>(bias, bk);
    forward_kernel<scalar_t><<<static_cast<unsigned>(N * geo.G), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w, b, y.data_ptr<scalar_t>(), mean.data_ptr<T>(), rstd.data_ptr<T>(), geo, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_, const at::Tensor& rstd_, int64_t groups,
    std::array<bool, 3> output_mask) {
  const Geometry gm = geometry(x_, groups, "vpfast::group_norm_silu_backward");
  check_param(weight, x_, gm.C, "weight");
  check_param(bias, x_, gm.C, "bias");
  check_backward_cuda(grad, x_, mean_, rstd_, gm);
  const Geo geo = device_geo(gm);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense(x_, geo.cl), g_ = dense(grad, geo.cl);
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t N = x.size(0), C = geo.C;
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  const bool need_x = output_mask[0], need_w = output_mask[1] && has_w, need_b = output_mask[2] && has_b;
  TORCH_CHECK(N * geo.G <= std::numeric_limits<int32_t>::max(), "vpfast::group_norm_silu_backward: N * groups "
              "exceeds the grid");
  auto gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  auto partA = at::zeros({N, C}, x.options().dtype(at::kDouble));
  auto partB = at::zeros({N, C}, x.options().dtype(at::kDouble));
  auto gw = need_w ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  auto gb = need_b ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "group_norm_silu_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor wk, bk;
    const scalar_t* w = param_ptr<scalar_t>(weight, wk);
    const scalar_t* b = param_ptr<scalar_t>(bias, bk);
    if (N > 0) {
      backward_kernel<scalar_t><<<static_cast<unsigned>(N * geo.G), kThreads, 0, stream>>>(
          g_.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w, b, mean.data_ptr<T>(), rstd.data_ptr<T>(),
          need_x ? gx.data_ptr<scalar_t>() : nullptr, partA.data_ptr<double>(), partB.data_ptr<double>(), geo,
          need_x);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_w || need_b) {
      param_grad_kernel<scalar_t><<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          partA.data_ptr<double>(), partB.data_ptr<double>(), N, C, need_w ? gw.data_ptr<scalar_t>() : nullptr,
          need_b ? gb.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw, gb};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("group_norm_silu_forward", &vpfast::group_norm_silu_forward_cuda);
  m.impl("group_norm_silu_backward", &vpfast::group_norm_silu_backward_cuda);
}
