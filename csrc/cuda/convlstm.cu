// Fused ConvLSTM pointwise step, CUDA: one thread per element (grid-stride loop), strided planes as on the
// CPU. Arithmetic: common/stlstm.h, run in A = at::opmath_type<T> (float for Half/BFloat16 storage: widen on
// load, round once on store). Launch: a 1-D grid of at most 65535 blocks, grid-stride loop, 64-bit indices.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

#include "common/lstm_planes.h"

namespace vpfast {
namespace {

using lstm::Planes;
using lstm::planar;
using lstm::planes;
using lstm::planes_opt;
constexpr int kThreads = 256;

template <typename A, typename T>
__device__ __forceinline__ A ld(const Planes<T>& t, int64_t b, int64_t ch, int64_t p) {
  return static_cast<A>(t.at(b, ch)[p]);
}

template <typename T, typename A>
__device__ __forceinline__ void st(const Planes<T>& t, int64_t b, int64_t ch, int64_t p, A v) {
  t.at(b, ch)[p] = static_cast<T>(v);
}

template <typename T>
__global__ void fwd_kernel(Planes<T> x, Planes<T> hg, Planes<T> c, Planes<T> h, Planes<T> cn, Planes<T> act,
                           int64_t C, int64_t HW, int64_t n, at::opmath_type<T> fb, bool tanh_c) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    A pi = ld<A>(hg, b, ch, p), pf = ld<A>(hg, b, C + ch, p), pg = ld<A>(hg, b, 2 * C + ch, p),
      po = ld<A>(hg, b, 3 * C + ch, p);
    if (x.ptr) {
      pi = ld<A>(x, b, ch, p) + pi;
      pf = ld<A>(x, b, C + ch, p) + pf;
      pg = ld<A>(x, b, 2 * C + ch, p) + pg;
      po = ld<A>(x, b, 3 * C + ch, p) + po;
    }
    A i, f, g, c_new;
    lstm::cell_forward<A>(pi, pf, pg, ld<A>(c, b, ch, p), fb, i, f, g, c_new);
    const A o = fast_sigmoid<A>(po);
    st(h, b, ch, p, o * (tanh_c ? fast_tanh<A>(c_new) : g));
    st(cn, b, ch, p, c_new);
    st(act, b, ch, p, i);
    st(act, b, C + ch, p, f);
    st(act, b, 2 * C + ch, p, o);
  }
}

// reads the saved gates, c_t and h as stored (in T); g's recovery is as in float32 (csrc/common/stlstm.h)
template <typename T>
__global__ void bwd_kernel(Planes<T> gh, Planes<T> gc, Planes<T> act, Planes<T> c, Planes<T> cn, Planes<T> ho,
                           Planes<T> gx, Planes<T> ghg, Planes<T> gcp, int64_t C, int64_t HW, int64_t n,
                           bool tanh_c) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    A pi, pf, pg, po, c_;
    lstm::convlstm_backward<A>(ld<A>(act, b, ch, p), ld<A>(act, b, C + ch, p), ld<A>(act, b, 2 * C + ch, p),
                               ld<A>(c, b, ch, p), ld<A>(cn, b, ch, p), ld<A>(ho, b, ch, p),
                               gh.ptr ? ld<A>(gh, b, ch, p) : A(0), gc.ptr ? ld<A>(gc, b, ch, p) : A(0), tanh_c, pi,
                               pf, pg, po, c_);
    st(ghg, b, ch, p, pi);
    st(ghg, b, C + ch, p, pf);
    st(ghg, b, 2 * C + ch, p, pg);
    st(ghg, b, 3 * C + ch, p, po);
    st(gcp, b, ch, p, c_);
    if (gx.ptr) {
      st(gx, b, ch, p, pi);
      st(gx, b, C + ch, p, pf);
      st(gx, b, 2 * C + ch, p, pg);
      st(gx, b, 3 * C + ch, p, po);
    }
  }
}

// float, double, and the half types (computed in float)
#define VPFAST_DISPATCH_LSTM(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> convlstm_forward_cuda(const std::optional<at::Tensor>& x_g_,
                                                                     const at::Tensor& h_g_, const at::Tensor& c_,
                                                                     double forget_bias, bool tanh_c) {
  const c10::cuda::CUDAGuard guard(c_.device());
  const auto a = lstm::convlstm_forward_args(x_g_, h_g_, c_, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.h, a.cn, a.act};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.c.scalar_type(), "convlstm_forward_cuda", [&] {
    using T = scalar_t;
    fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes_opt<T>(a.has_x, a.x_g), planes<T>(a.h_g), planes<T>(a.c), planes<T>(a.h), planes<T>(a.cn),
        planes<T>(a.act), a.C, a.HW, n, static_cast<at::opmath_type<T>>(forget_bias), tanh_c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.h, a.cn, a.act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convlstm_backward_cuda(const std::optional<at::Tensor>& gh_,
                                                                      const std::optional<at::Tensor>& gc_,
                                                                      const at::Tensor& act_, const at::Tensor& c_,
                                                                      const at::Tensor& cn_, const at::Tensor& h_,
                                                                      bool has_x, bool tanh_c) {
  const c10::cuda::CUDAGuard guard(c_.device());
  const auto a = lstm::convlstm_backward_args(gh_, gc_, act_, c_, cn_, h_, has_x, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gx, a.ghg, a.gcp};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.c.scalar_type(), "convlstm_backward_cuda", [&] {
    using T = scalar_t;
    bwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes_opt<T>(a.has_gh, a.gh), planes_opt<T>(a.has_gc, a.gc), planes<T>(a.act), planes<T>(a.c), planes<T>(a.cn),
        planes<T>(a.ho), planes_opt<T>(has_x, a.gx), planes<T>(a.ghg), planes<T>(a.gcp), a.C, a.HW, n, tanh_c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gx, a.ghg, a.gcp};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("convlstm_forward", &vpfast::convlstm_forward_cuda);
  m.impl("convlstm_backward", &vpfast::convlstm_backward_cuda);
}
