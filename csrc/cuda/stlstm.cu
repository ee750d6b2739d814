// Fused ST-LSTM pointwise stages, CUDA: one thread per element of the [B, C, H, W] index space (grid-stride
// loop), operands addressed as strided planes exactly as on the CPU. Arithmetic: common/stlstm.h.
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

template <typename T>
__global__ void gates_fwd_kernel(Planes<T> x, Planes<T> hg, Planes<T> mg, Planes<T> c, Planes<T> m, Planes<T> cm,
                                 Planes<T> op, Planes<T> act, Planes<T> d, int64_t C, int64_t HW, int64_t n,
                                 T fb) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    T pi = hg.at(b, ch)[p], pf = hg.at(b, C + ch)[p], pg = hg.at(b, 2 * C + ch)[p], po = hg.at(b, 3 * C + ch)[p];
    T qi = mg.at(b, ch)[p], qf = mg.at(b, C + ch)[p], qg = mg.at(b, 2 * C + ch)[p];
    if (x.ptr) {
      pi = x.at(b, ch)[p] + pi;
      pf = x.at(b, C + ch)[p] + pf;
      pg = x.at(b, 2 * C + ch)[p] + pg;
      qi = x.at(b, 3 * C + ch)[p] + qi;
      qf = x.at(b, 4 * C + ch)[p] + qf;
      qg = x.at(b, 5 * C + ch)[p] + qg;
      po = x.at(b, 6 * C + ch)[p] + po;
    }
    T i, f, g, cn, i2, f2, g2, mn;
    lstm::cell_forward<T>(pi, pf, pg, c.at(b, ch)[p], fb, i, f, g, cn);
    lstm::cell_forward<T>(qi, qf, qg, m.at(b, ch)[p], fb, i2, f2, g2, mn);
    cm.at(b, ch)[p] = cn;
    cm.at(b, C + ch)[p] = mn;
    op.at(b, ch)[p] = po;
    act.at(b, ch)[p] = i;
    act.at(b, C + ch)[p] = f;
    act.at(b, 2 * C + ch)[p] = i2;
    act.at(b, 3 * C + ch)[p] = f2;
    if (d.ptr) {
      d.at(b, ch)[p] = i * g;
      d.at(b, C + ch)[p] = i2 * g2;
    }
  }
}

template <typename T>
__global__ void gates_bwd_kernel(Planes<T> gcm, Planes<T> gop, Planes<T> gd, Planes<T> act, Planes<T> cm,
                                 Planes<T> c, Planes<T> m, Planes<T> gx, Planes<T> gh, Planes<T> gm, Planes<T> gc,
                                 Planes<T> gmp, int64_t C, int64_t HW, int64_t n) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    const T dc = gd.ptr ? gd.at(b, ch)[p] : T(0), dm = gd.ptr ? gd.at(b, C + ch)[p] : T(0);
    T pi, pf, pg, qi, qf, qg, c_, m_;
    lstm::stlstm_cell_backward<T>(act.at(b, ch)[p], act.at(b, C + ch)[p], c.at(b, ch)[p], cm.at(b, ch)[p],
                                  gcm.at(b, ch)[p], dc, pi, pf, pg, c_);
    lstm::stlstm_cell_backward<T>(act.at(b, 2 * C + ch)[p], act.at(b, 3 * C + ch)[p], m.at(b, ch)[p],
                                  cm.at(b, C + ch)[p], gcm.at(b, C + ch)[p], dm, qi, qf, qg, m_);
    const T po = gop.at(b, ch)[p];
    gh.at(b, ch)[p] = pi;
    gh.at(b, C + ch)[p] = pf;
    gh.at(b, 2 * C + ch)[p] = pg;
    gh.at(b, 3 * C + ch)[p] = po;
    gm.at(b, ch)[p] = qi;
    gm.at(b, C + ch)[p] = qf;
    gm.at(b, 2 * C + ch)[p] = qg;
    gc.at(b, ch)[p] = c_;
    gmp.at(b, ch)[p] = m_;
    if (gx.ptr) {
      gx.at(b, ch)[p] = pi;
      gx.at(b, C + ch)[p] = pf;
      gx.at(b, 2 * C + ch)[p] = pg;
      gx.at(b, 3 * C + ch)[p] = qi;
      gx.at(b, 4 * C + ch)[p] = qf;
      gx.at(b, 5 * C + ch)[p] = qg;
      gx.at(b, 6 * C + ch)[p] = po;
    }
  }
}

template <typename T>
__global__ void output_fwd_kernel(Planes<T> op, Planes<T> om, Planes<T> last, Planes<T> hw, Planes<T> h,
                                  Planes<T> o, Planes<T> tl, int64_t C, int64_t HW, int64_t n) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    T o_, tl_, h_;
    lstm::output_forward<T>(op.at(b, ch)[p] + om.at(b, ch)[p], last.at(b, ch)[p], hw.ptr ? hw.at(b, ch)[p] : T(0),
                            o_, tl_, h_);
    h.at(b, ch)[p] = h_;
    o.at(b, ch)[p] = o_;
    if (tl.ptr) tl.at(b, ch)[p] = tl_;
  }
}

template <typename T>
__global__ void output_bwd_kernel(Planes<T> gh, Planes<T> o, Planes<T> ht, Planes<T> hw, Planes<T> gpre,
                                  Planes<T> glast, Planes<T> ghw, int64_t C, int64_t HW, int64_t n) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % HW, r = idx / HW, ch = r % C, b = r / C;
    const T o_ = o.at(b, ch)[p];
    const T tl = hw.ptr ? ht.at(b, ch)[p] : lstm::tl_from_h<T>(ht.at(b, ch)[p], o_);
    T a, g, e;
    lstm::output_backward<T>(gh.at(b, ch)[p], o_, tl, hw.ptr ? hw.at(b, ch)[p] : T(0), a, g, e);
    gpre.at(b, ch)[p] = a;
    glast.at(b, ch)[p] = g;
    if (ghw.ptr) ghw.at(b, ch)[p] = e;
  }
}

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
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "stlstm_gates_forward_cuda", [&] {
    using T = scalar_t;
    gates_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        planes_opt<T>(has_x, x_g), planes<T>(h_g), planes<T>(m_g), planes<T>(c), planes<T>(m), planes<T>(cm),
        planes<T>(o_part), planes<T>(act), planes_opt<T>(with_delta, delta), C, HW, n, static_cast<T>(forget_bias));
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
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "stlstm_gates_backward_cuda", [&] {
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
  AT_DISPATCH_FLOATING_TYPES(op.scalar_type(), "stlstm_output_forward_cuda", [&] {
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
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "stlstm_output_backward_cuda", [&] {
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
