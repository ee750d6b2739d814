// MotionGRU pointwise steps, CUDA: one thread per element, arithmetic from common/motion_gru.h run in
// A = at::opmath_type<T> (float for Half/BFloat16 storage: widen on load, round once on store).
// Launch: a 1-D grid of at most 2^20 blocks of 256 threads (gridDim.x allows 2^31 - 1), grid-stride loop,
// 64-bit indices, so any element count fits.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/motion_gru.h"

namespace vpfast {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

#define VPFAST_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// Element i of an [B, M, H, W] tensor sits at gates[b*2L + j] (update) and gates[b*2L + L + j] (reset).
template <typename T>
__global__ void reset_kernel(const T* __restrict__ gates, const T* __restrict__ f, int64_t n, int64_t L,
                             T* __restrict__ out) {
  using A = at::opmath_type<T>;
  VPFAST_GRID_LOOP(i, n) {
    const int64_t b = i / L, j = i % L;
    out[i] = static_cast<T>(mgru::reset_fwd<A>(static_cast<A>(gates[b * 2 * L + L + j]), static_cast<A>(f[i])));
  }
}

template <typename T>
__global__ void reset_bwd_kernel(const T* __restrict__ g, const T* __restrict__ gates, const T* __restrict__ f,
                                 int64_t n, int64_t L, T* __restrict__ d_gates, T* __restrict__ d_f) {
  using A = at::opmath_type<T>;
  VPFAST_GRID_LOOP(i, n) {
    const int64_t b = i / L, j = i % L;
    A a, c;
    mgru::reset_bwd<A>(static_cast<A>(g[i]), static_cast<A>(gates[b * 2 * L + L + j]), static_cast<A>(f[i]), a, c);
    d_gates[b * 2 * L + j] = static_cast<T>(0);
    d_gates[b * 2 * L + L + j] = static_cast<T>(a);
    d_f[i] = static_cast<T>(c);
  }
}

template <typename T>
__global__ void update_kernel(const T* __restrict__ gates, const T* __restrict__ o, const T* __restrict__ f,
                              const T* __restrict__ d, int64_t n, int64_t L, T* __restrict__ f_out,
                              T* __restrict__ d_out) {
  using A = at::opmath_type<T>;
  VPFAST_GRID_LOOP(i, n) {
    const int64_t b = i / L, j = i % L;
    A a, c;
    mgru::update_fwd<A>(static_cast<A>(gates[b * 2 * L + j]), static_cast<A>(o[i]), static_cast<A>(f[i]),
                        static_cast<A>(d[i]), a, c);
    f_out[i] = static_cast<T>(a);
    d_out[i] = static_cast<T>(c);
  }
}

template <typename T>
__global__ void update_bwd_kernel(const T* __restrict__ g_f, const T* __restrict__ g_d, const T* __restrict__ gates,
                                  const T* __restrict__ o, const T* __restrict__ f, int64_t n, int64_t L,
                                  T* __restrict__ d_gates, T* __restrict__ d_o, T* __restrict__ d_f,
                                  T* __restrict__ d_d) {
  using A = at::opmath_type<T>;
  VPFAST_GRID_LOOP(i, n) {
    const int64_t b = i / L, j = i % L;
    A a, c, e, h;
    mgru::update_bwd<A>(static_cast<A>(g_f[i]), static_cast<A>(g_d[i]), static_cast<A>(gates[b * 2 * L + j]),
                        static_cast<A>(o[i]), static_cast<A>(f[i]), a, c, e, h);
    d_gates[b * 2 * L + j] = static_cast<T>(a);
    d_gates[b * 2 * L + L + j] = static_cast<T>(0);
    d_o[i] = static_cast<T>(c);
    d_f[i] = static_cast<T>(e);
    d_d[i] = static_cast<T>(h);
  }
}

// float, double, and the half types (computed in float)
#define VPFAST_DISPATCH_MGRU(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

int64_t per_image(const at::Tensor& f) { return f.numel() / std::max<int64_t>(1, f.size(0)); }

at::Tensor motion_gru_reset_cuda(const at::Tensor& gates, const at::Tensor& f_prev) {
  mgru::check_reset(gates, f_prev);
  const c10::cuda::CUDAGuard guard(f_prev.device());
  const auto Gt = gates.contiguous(), Fp = f_prev.contiguous();
  auto out = at::empty_like(Fp);
  const int64_t n = Fp.numel(), L = per_image(Fp);
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_MGRU(Fp.scalar_type(), "motion_gru_reset_cuda", [&] {
    reset_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(Gt.data_ptr<scalar_t>(), Fp.data_ptr<scalar_t>(), n,
                                                                  L, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> motion_gru_reset_backward_cuda(const at::Tensor& grad, const at::Tensor& gates,
                                                                  const at::Tensor& f_prev) {
  mgru::check_reset_backward(grad, gates, f_prev);
  const c10::cuda::CUDAGuard guard(f_prev.device());
  const auto G = grad.contiguous(), Gt = gates.contiguous(), Fp = f_prev.contiguous();
  auto d_gates = at::empty_like(Gt);
  auto d_f = at::empty_like(Fp);
  const int64_t n = Fp.numel(), L = per_image(Fp);
  if (n == 0) return {d_gates, d_f};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_MGRU(Fp.scalar_type(), "motion_gru_reset_backward_cuda", [&] {
    reset_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), Gt.data_ptr<scalar_t>(), Fp.data_ptr<scalar_t>(), n, L, d_gates.data_ptr<scalar_t>(),
        d_f.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d_gates, d_f};
}

std::tuple<at::Tensor, at::Tensor> motion_gru_update_cuda(const at::Tensor& gates, const at::Tensor& o,
                                                          const at::Tensor& f_prev, const at::Tensor& d_prev) {
  mgru::check_update(gates, o, f_prev, d_prev);
  const c10::cuda::CUDAGuard guard(f_prev.device());
  const auto Gt = gates.contiguous(), O = o.contiguous(), Fp = f_prev.contiguous(), Dp = d_prev.contiguous();
  auto f_out = at::empty_like(Fp);
  auto d_out = at::empty_like(Fp);
  const int64_t n = Fp.numel(), L = per_image(Fp);
  if (n == 0) return {f_out, d_out};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_MGRU(Fp.scalar_type(), "motion_gru_update_cuda", [&] {
    update_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        Gt.data_ptr<scalar_t>(), O.data_ptr<scalar_t>(), Fp.data_ptr<scalar_t>(), Dp.data_ptr<scalar_t>(), n, L,
        f_out.data_ptr<scalar_t>(), d_out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {f_out, d_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> motion_gru_update_backward_cuda(
    const at::Tensor& grad_f, const at::Tensor& grad_d, const at::Tensor& gates, const at::Tensor& o,
    const at::Tensor& f_prev) {
  mgru::check_update_backward(grad_f, grad_d, gates, o, f_prev);
  const c10::cuda::CUDAGuard guard(f_prev.device());
  const auto GF = grad_f.contiguous(), GD = grad_d.contiguous(), Gt = gates.contiguous(), O = o.contiguous(),
             Fp = f_prev.contiguous();
  auto d_gates = at::empty_like(Gt);
  auto d_o = at::empty_like(Fp);
  auto d_f = at::empty_like(Fp);
  auto d_d = at::empty_like(Fp);
  const int64_t n = Fp.numel(), L = per_image(Fp);
  if (n == 0) return {d_gates, d_o, d_f, d_d};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_MGRU(Fp.scalar_type(), "motion_gru_update_backward_cuda", [&] {
    update_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        GF.data_ptr<scalar_t>(), GD.data_ptr<scalar_t>(), Gt.data_ptr<scalar_t>(), O.data_ptr<scalar_t>(),
        Fp.data_ptr<scalar_t>(), n, L, d_gates.data_ptr<scalar_t>(), d_o.data_ptr<scalar_t>(),
        d_f.data_ptr<scalar_t>(), d_d.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {d_gates, d_o, d_f, d_d};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("motion_gru_reset", &vpfast::motion_gru_reset_cuda);
  m.impl("motion_gru_reset_backward", &vpfast::motion_gru_reset_backward_cuda);
  m.impl("motion_gru_update", &vpfast::motion_gru_update_cuda);
  m.impl("motion_gru_update_backward", &vpfast::motion_gru_update_backward_cuda);
}
