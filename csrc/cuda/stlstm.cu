// Fused ST-LSTM pointwise stages, CUDA: one thread per element of the [B, C, H, W] index space (grid-stride
// loop), operands addressed as strided planes exactly as on the CPU. Arithmetic: common/stlstm.h.
//
// Storage type T (float, double, Half, BFloat16) and arithmetic type A = at::opmath_type<T> (float for the
// half types): every element is loaded, widened to A, run through the shared csrc/common functions and
// rounded to T once on store, so a half-precision step rounds each output once (as PyTorch's own pointwise
// kernels do) rather than after every intermediate.
//
// Launch limits: a 1-D grid of at most 65535 blocks of 256 threads; the loop strides over the rest, and the
// index and the plane offsets are 64-bit, so any element count fits.
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

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

// element p of plane (b, ch), widened to the arithmetic type
template <typename A, typename T>
__device__ __forceinline__ A ld(const Planes<T>& t, int64_t b, int64_t ch, int64_t p) {
  return static_cast<A>(t.at(b, ch)[p]);
}

template <typename T, typename A>
__device__ __forceinline__ void st(const Planes<T>& t, int64_t b, int64_t ch, int64_t p, A v) {
  t.at(b, ch)[p] = static_cast<T>(v);
}

template <typename T>
__global__ void gates_fwd_kernel(Planes<T> x, Planes<T> hg, Planes<T> mg, Planes<T> c, Planes<T> m, Planes<T> cm,
                                 Planes<T> op, Planes<T> act, Planes<T> d, int64_t C, int64_t HW, int64_t n,
                                 at::opmath_type<T> fb) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    A pi = ld<A>(hg, b, ch, p), pf = ld<A>(hg, b, C + ch, p), pg = ld<A>(hg, b, 2 * C + ch, p),
      po = ld<A>(hg, b, 3 * C + ch, p);
    A qi = ld<A>(mg, b, ch, p), qf = ld<A>(mg, b, C + ch, p), qg = ld<A>(mg, b, 2 * C + ch, p);
    if (x.ptr) {
      pi = ld<A>(x, b, ch, p) + pi;
      pf = ld<A>(x, b, C + ch, p) + pf;
      pg = ld<A>(x, b, 2 * C + ch, p) + pg;
      qi = ld<A>(x, b, 3 * C + ch, p) + qi;
      qf = ld<A>(x, b, 4 * C + ch, p) + qf;
      qg = ld<A>(x, b, 5 * C + ch, p) + qg;
      po = ld<A>(x, b, 6 * C + ch, p) + po;
    }
    A i, f, g, cn, i2, f2, g2, mn;
    lstm::cell_forward<A>(pi, pf, pg, ld<A>(c, b, ch, p), fb, i, f, g, cn);
    lstm::cell_forward<A>(qi, qf, qg, ld<A>(m, b, ch, p), fb, i2, f2, g2, mn);
    st(cm, b, ch, p, cn);
    st(cm, b, C + ch, p, mn);
    st(op, b, ch, p, po);
    st(act, b, ch, p, i);
    st(act, b, C + ch, p, f);
    st(act, b, 2 * C + ch, p, i2);
    st(act, b, 3 * C + ch, p, f2);
    if (d.ptr) {
      st(d, b, ch, p, i * g);
      st(d, b, C + ch, p, i2 * g2);
    }
  }
}

// Backward reads the saved gates and memories as stored (in T): g is recovered from the rounded c_t, so its
// error is about one rounding of c_t in T (csrc/common/stlstm.h), as for float32.
template <typename T>
__global__ void gates_bwd_kernel(Planes<T> gcm, Planes<T> gop, Planes<T> gd, Planes<T> act, Planes<T> cm,
                                 Planes<T> c, Planes<T> m, Planes<T> gx, Planes<T> gh, Planes<T> gm, Planes<T> gc,
                                 Planes<T> gmp, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    const A dc = gd.ptr ? ld<A>(gd, b, ch, p) : A(0), dm = gd.ptr ? ld<A>(gd, b, C + ch, p) : A(0);
    A pi, pf, pg, qi, qf, qg, c_, m_;
    lstm::stlstm_cell_backward<A>(ld<A>(act, b, ch, p), ld<A>(act, b, C + ch, p), ld<A>(c, b, ch, p),
                                  ld<A>(cm, b, ch, p), ld<A>(gcm, b, ch, p), dc, pi, pf, pg, c_);
    lstm::stlstm_cell_backward<A>(ld<A>(act, b, 2 * C + ch, p), ld<A>(act, b, 3 * C + ch, p), ld<A>(m, b, ch, p),
                                  ld<A>(cm, b, C + ch, p), ld<A>(gcm, b, C + ch, p), dm, qi, qf, qg, m_);
    const A po = ld<A>(gop, b, ch, p);
    st(gh, b, ch, p, pi);
    st(gh, b, C + ch, p, pf);
    st(gh, b, 2 * C + ch, p, pg);
    st(gh, b, 3 * C + ch, p, po);
    st(gm, b, ch, p, qi);
    st(gm, b, C + ch, p, qf);
    st(gm, b, 2 * C + ch, p, qg);
    st(gc, b, ch, p, c_);
    st(gmp, b, ch, p, m_);
    if (gx.ptr) {
      st(gx, b, ch, p, pi);
      st(gx, b, C + ch, p, pf);
      st(gx, b, 2 * C + ch, p, pg);
      st(gx, b, 3 * C + ch, p, qi);
      st(gx, b, 4 * C + ch, p, qf);
      st(gx, b, 5 * C + ch, p, qg);
      st(gx, b, 6 * C + ch, p, po);
    }
  }
}

template <typename T>
__global__ void output_fwd_kernel(Planes<T> op, Planes<T> om, Planes<T> last, Planes<T> hw, Planes<T> h,
                                  Planes<T> o, Planes<T> tl, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    A o_, tl_, h_;
    lstm::output_forward<A>(ld<A>(op, b, ch, p) + ld<A>(om, b, ch, p), ld<A>(last, b, ch, p),
                            hw.ptr ? ld<A>(hw, b, ch, p) : A(0), o_, tl_, h_);
    st(h, b, ch, p, h_);
    st(o, b, ch, p, o_);
    if (tl.ptr) st(tl, b, ch, p, tl_);
  }
}

template <typename T>
__global__ void output_bwd_kernel(Planes<T> gh, Planes<T> o, Planes<T> ht, Planes<T> hw, Planes<T> gpre,
                                  Planes<T> glast, Planes<T> ghw, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    const A o_ = ld<A>(o, b, ch, p);
    const A tl = hw.ptr ? ld<A>(ht, b, ch, p) : lstm::tl_from_h<A>(ld<A>(ht, b, ch, p), o_);
    A a, g, e;
    lstm::output_backward<A>(ld<A>(gh, b, ch, p), o_, tl, hw.ptr ? ld<A>(hw, b, ch, p) : A(0), a, g, e);
    st(gpre, b, ch, p, a);
    st(glast, b, ch, p, g);
    if (ghw.ptr) st(ghw, b, ch, p, e);
  }
}

// float, double, and the half types (computed in float)
#define VPFAST_DISPATCH_LSTM(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stlstm_gates_forward_cuda(
    const std::optional<at::Tensor>& x_g_, const at::Tensor& h_g_, const at::Tensor& m_g_, const at::Tensor& c_,
    const at::Tensor& m_, double forget_bias, bool with_delta) {
  const c10::cuda::CUDAGuard guard(c_.device());
  const auto a = lstm::stlstm_gates_forward_args(x_g_, h_g_, m_g_, c_, m_, with_delta, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.cm, a.o_part, a.act, a.delta};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.c.scalar_type(), "stlstm_gates_forward_cuda", [&] {
    using T = scalar_t;
    gates_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes_opt<T>(a.has_x, a.x_g), planes<T>(a.h_g), planes<T>(a.m_g), planes<T>(a.c), planes<T>(a.m),
        planes<T>(a.cm), planes<T>(a.o_part), planes<T>(a.act), planes_opt<T>(with_delta, a.delta), a.C, a.HW, n,
        static_cast<at::opmath_type<T>>(forget_bias));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.cm, a.o_part, a.act, a.delta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stlstm_gates_backward_cuda(
    const at::Tensor& grad_cm_, const at::Tensor& grad_op_, const std::optional<at::Tensor>& grad_delta_,
    const at::Tensor& act_, const at::Tensor& cm_, const at::Tensor& c_, const at::Tensor& m_, bool has_x) {
  const c10::cuda::CUDAGuard guard(c_.device());
  const auto a =
      lstm::stlstm_gates_backward_args(grad_cm_, grad_op_, grad_delta_, act_, cm_, c_, m_, has_x, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gx, a.gh, a.gm, a.gc, a.gmp};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.c.scalar_type(), "stlstm_gates_backward_cuda", [&] {
    using T = scalar_t;
    gates_bwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(a.gcm), planes<T>(a.gop), planes_opt<T>(a.with_delta, a.gd), planes<T>(a.act), planes<T>(a.cm),
        planes<T>(a.c), planes<T>(a.m), planes_opt<T>(has_x, a.gx), planes<T>(a.gh), planes<T>(a.gm), planes<T>(a.gc),
        planes<T>(a.gmp), a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gx, a.gh, a.gm, a.gc, a.gmp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_forward_cuda(const at::Tensor& op_,
                                                                          const at::Tensor& om_,
                                                                          const at::Tensor& last_,
                                                                          const std::optional<at::Tensor>& hw_) {
  const c10::cuda::CUDAGuard guard(op_.device());
  const auto a = lstm::stlstm_output_forward_args(op_, om_, last_, hw_, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.h, a.o, a.tl};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.op.scalar_type(), "stlstm_output_forward_cuda", [&] {
    using T = scalar_t;
    output_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(a.op), planes<T>(a.om), planes<T>(a.last), planes_opt<T>(a.has_hw, a.hw), planes<T>(a.h),
        planes<T>(a.o), planes_opt<T>(a.has_hw, a.tl), a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.h, a.o, a.tl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_backward_cuda(const at::Tensor& gh_,
                                                                           const at::Tensor& o_,
                                                                           const at::Tensor& ht_,
                                                                           const std::optional<at::Tensor>& hw_) {
  const c10::cuda::CUDAGuard guard(o_.device());
  const auto a = lstm::stlstm_output_backward_args(gh_, o_, ht_, hw_, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gpre, a.glast, a.ghw};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(a.o.scalar_type(), "stlstm_output_backward_cuda", [&] {
    using T = scalar_t;
    output_bwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(a.gh), planes<T>(a.o), planes<T>(a.ht), planes_opt<T>(a.has_hw, a.hw), planes<T>(a.gpre),
        planes<T>(a.glast), planes_opt<T>(a.has_hw, a.ghw), a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gpre, a.glast, a.ghw};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("stlstm_gates_forward", &vpfast::stlstm_gates_forward_cuda);
  m.impl("stlstm_gates_backward", &vpfast::stlstm_gates_backward_cuda);
  m.impl("stlstm_output_forward", &vpfast::stlstm_output_forward_cuda);
  m.impl("stlstm_output_backward", &vpfast::stlstm_output_backward_cuda);
}
