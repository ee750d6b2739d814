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
  const bool has_x = x_g_.has_value() && x_g_->defined();
  lstm::check_stlstm_gates_forward(c_, h_g_, m_g_, m_, has_x ? &*x_g_ : nullptr);
  const c10::cuda::CUDAGuard guard(c_.device());
  const int64_t B = c_.size(0), C = c_.size(1), H = c_.size(2), W = c_.size(3), HW = H * W, n = B * C * HW;
  const auto h_g = planar(h_g_), m_g = planar(m_g_), c = planar(c_), m = planar(m_);
  const auto x_g = has_x ? planar(*x_g_) : at::Tensor();
  auto cm = at::empty({B, 2 * C, H, W}, c.options());
  auto o_part = at::empty({B, C, H, W}, c.options());
  auto act = at::empty({B, 4 * C, H, W}, c.options());
  auto delta = with_delta ? at::empty({B, 2 * C, H, W}, c.options()) : at::empty({0}, c.options());
  if (n == 0) return {cm, o_part, act, delta};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(c.scalar_type(), "stlstm_gates_forward_cuda", [&] {
    using T = scalar_t;
    gates_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes_opt<T>(has_x, x_g), planes<T>(h_g), planes<T>(m_g), planes<T>(c), planes<T>(m), planes<T>(cm),
        planes<T>(o_part), planes<T>(act), planes_opt<T>(with_delta, delta), C, HW, n,
        static_cast<at::opmath_type<T>>(forget_bias));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cm, o_part, act, delta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stlstm_gates_backward_cuda(
    const at::Tensor& grad_cm_, const at::Tensor& grad_op_, const std::optional<at::Tensor>& grad_delta_,
    const at::Tensor& act_, const at::Tensor& cm_, const at::Tensor& c_, const at::Tensor& m_, bool has_x) {
  const bool with_delta = grad_delta_.has_value() && grad_delta_->defined();
  lstm::check_stlstm_gates_backward(c_, grad_cm_, grad_op_, act_, cm_, m_, with_delta ? &*grad_delta_ : nullptr);
  const c10::cuda::CUDAGuard guard(c_.device());
  const int64_t B = c_.size(0), C = c_.size(1), H = c_.size(2), W = c_.size(3), HW = H * W, n = B * C * HW;
  const auto gcm = planar(grad_cm_), gop = planar(grad_op_), act = planar(act_), cm = planar(cm_), c = planar(c_),
             m = planar(m_);
  const auto gd = with_delta ? planar(*grad_delta_) : at::Tensor();
  auto gx = has_x ? at::empty({B, 7 * C, H, W}, c.options()) : at::empty({0}, c.options());
  auto gh = at::empty({B, 4 * C, H, W}, c.options());
  auto gm = at::empty({B, 3 * C, H, W}, c.options());
  auto gc = at::empty({B, C, H, W}, c.options());
  auto gmp = at::empty({B, C, H, W}, c.options());
  if (n == 0) return {gx, gh, gm, gc, gmp};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(c.scalar_type(), "stlstm_gates_backward_cuda", [&] {
    using T = scalar_t;
    gates_bwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(gcm), planes<T>(gop), planes_opt<T>(with_delta, gd), planes<T>(act), planes<T>(cm), planes<T>(c),
        planes<T>(m), planes_opt<T>(has_x, gx), planes<T>(gh), planes<T>(gm), planes<T>(gc), planes<T>(gmp), C, HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gh, gm, gc, gmp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_forward_cuda(const at::Tensor& op_,
                                                                          const at::Tensor& om_,
                                                                          const at::Tensor& last_,
                                                                          const std::optional<at::Tensor>& hw_) {
  const bool has_hw = hw_.has_value() && hw_->defined();
  lstm::check_stlstm_output("vpfast::stlstm_output_forward", op_, "o_part", om_, "o_m", last_, "last",
                            has_hw ? &*hw_ : nullptr);
  const c10::cuda::CUDAGuard guard(op_.device());
  const int64_t B = op_.size(0), C = op_.size(1), H = op_.size(2), W = op_.size(3), HW = H * W, n = B * C * HW;
  const auto op = planar(op_), om = planar(om_), last = planar(last_);
  const auto hw = has_hw ? planar(*hw_) : at::Tensor();
  auto h = at::empty({B, C, H, W}, op.options());
  auto o = at::empty({B, C, H, W}, op.options());
  auto tl = has_hw ? at::empty({B, C, H, W}, op.options()) : at::empty({0}, op.options());
  if (n == 0) return {h, o, tl};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(op.scalar_type(), "stlstm_output_forward_cuda", [&] {
    using T = scalar_t;
    output_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(op), planes<T>(om), planes<T>(last), planes_opt<T>(has_hw, hw), planes<T>(h), planes<T>(o),
        planes_opt<T>(has_hw, tl), C, HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {h, o, tl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_backward_cuda(const at::Tensor& gh_,
                                                                           const at::Tensor& o_,
                                                                           const at::Tensor& ht_,
                                                                           const std::optional<at::Tensor>& hw_) {
  const bool has_hw = hw_.has_value() && hw_->defined();
  lstm::check_stlstm_output("vpfast::stlstm_output_backward", o_, "o", gh_, "grad_h", ht_, "h_or_tl",
                            has_hw ? &*hw_ : nullptr);
  const c10::cuda::CUDAGuard guard(o_.device());
  const int64_t B = o_.size(0), C = o_.size(1), H = o_.size(2), W = o_.size(3), HW = H * W, n = B * C * HW;
  const auto gh = planar(gh_), o = planar(o_), ht = planar(ht_);
  const auto hw = has_hw ? planar(*hw_) : at::Tensor();
  auto gpre = at::empty({B, C, H, W}, o.options());
  auto glast = at::empty({B, C, H, W}, o.options());
  auto ghw = has_hw ? at::empty({B, C, H, W}, o.options()) : at::empty({0}, o.options());
  if (n == 0) return {gpre, glast, ghw};
  auto stream = at::cuda::getCurrentCUDAStream();
  VPFAST_DISPATCH_LSTM(o.scalar_type(), "stlstm_output_backward_cuda", [&] {
    using T = scalar_t;
    output_bwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes<T>(gh), planes<T>(o), planes<T>(ht), planes_opt<T>(has_hw, hw), planes<T>(gpre), planes<T>(glast),
        planes_opt<T>(has_hw, ghw), C, HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gpre, glast, ghw};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("stlstm_gates_forward", &vpfast::stlstm_gates_forward_cuda);
  m.impl("stlstm_gates_backward", &vpfast::stlstm_gates_backward_cuda);
  m.impl("stlstm_output_forward", &vpfast::stlstm_output_forward_cuda);
  m.impl("stlstm_output_backward", &vpfast::stlstm_output_backward_cuda);
}
