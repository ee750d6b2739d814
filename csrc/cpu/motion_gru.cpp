// MotionGRU pointwise steps, CPU: one vectorised sweep per op over each image's M*H*W elements (arithmetic
// in common/motion_gru.h), images and element blocks spread over threads.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>

#include "cpu/denormals.h"
#include "common/motion_gru.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

constexpr int64_t kBlock = 8192;

// Calls fn(b, begin, end) over blocks of every image's L elements.
template <typename Fn> void for_blocks(int64_t B, int64_t L, const Fn& fn) {
  const int64_t nblk = std::max<int64_t>(1, (L + kBlock - 1) / kBlock);
  cpu::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nblk, i0 = (t % nblk) * kBlock, i1 = std::min(L, i0 + kBlock);
      if (i0 < i1) fn(b, i0, i1);
    }
  });
}

template <typename T> VPFAST_CPU_CLONES void reset_loop(const T* gr, const T* f, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = mgru::reset_fwd<T>(gr[i], f[i]);
}

template <typename T>
VPFAST_CPU_CLONES void reset_bwd_loop(const T* g, const T* gr, const T* f, T* d_gu, T* d_gr, T* d_f, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a, c;
    mgru::reset_bwd<T>(g[i], gr[i], f[i], a, c);
    d_gu[i] = T(0);
    d_gr[i] = a;
    d_f[i] = c;
  }
}

template <typename T>
VPFAST_CPU_CLONES void update_loop(const T* gu, const T* o, const T* f, const T* d, T* f_out, T* d_out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a, c;
    mgru::update_fwd<T>(gu[i], o[i], f[i], d[i], a, c);
    f_out[i] = a;
    d_out[i] = c;
  }
}

template <typename T>
VPFAST_CPU_CLONES void update_bwd_loop(const T* g_f, const T* g_d, const T* gu, const T* o, const T* f, T* d_gu,
                                       T* d_gr, T* d_o, T* d_f, T* d_d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a, b, c, e;
    mgru::update_bwd<T>(g_f[i], g_d[i], gu[i], o[i], f[i], a, b, c, e);
    d_gu[i] = a;
    d_gr[i] = T(0);
    d_o[i] = b;
    d_f[i] = c;
    d_d[i] = e;
  }
}

at::Tensor motion_gru_reset_cpu(const at::Tensor& gates, const at::Tensor& f_prev) {
  mgru::check_reset(gates, f_prev);
  const auto Gt = gates.contiguous(), Fp = f_prev.contiguous();
  const int64_t B = Fp.size(0), L = Fp.numel() / std::max<int64_t>(1, B);
  auto out = cpu::empty_output(Fp.sizes(), Fp.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(Fp.scalar_type(), "motion_gru_reset_cpu", [&] {
    const scalar_t* g = Gt.data_ptr<scalar_t>();
    const scalar_t* f = Fp.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_blocks(B, L, [&](int64_t b, int64_t i0, int64_t i1) {
      reset_loop<scalar_t>(g + b * 2 * L + L + i0, f + b * L + i0, o + b * L + i0, i1 - i0);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> motion_gru_reset_backward_cpu(const at::Tensor& grad, const at::Tensor& gates,
                                                                 const at::Tensor& f_prev) {
  mgru::check_reset_backward(grad, gates, f_prev);
  const auto G = grad.contiguous(), Gt = gates.contiguous(), Fp = f_prev.contiguous();
  const int64_t B = Fp.size(0), L = Fp.numel() / std::max<int64_t>(1, B);
  auto d_gates = cpu::empty_output(Gt.sizes(), Gt.options());
  auto d_f = cpu::empty_output(Fp.sizes(), Fp.options());
  if (Fp.numel() == 0) return {d_gates, d_f};
  AT_DISPATCH_FLOATING_TYPES(Fp.scalar_type(), "motion_gru_reset_backward_cpu", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* gt = Gt.data_ptr<scalar_t>();
    const scalar_t* f = Fp.data_ptr<scalar_t>();
    scalar_t* dg = d_gates.data_ptr<scalar_t>();
    scalar_t* df = d_f.data_ptr<scalar_t>();
    for_blocks(B, L, [&](int64_t b, int64_t i0, int64_t i1) {
      reset_bwd_loop<scalar_t>(g + b * L + i0, gt + b * 2 * L + L + i0, f + b * L + i0, dg + b * 2 * L + i0,
                               dg + b * 2 * L + L + i0, df + b * L + i0, i1 - i0);
    });
  });
  return {d_gates, d_f};
}

std::tuple<at::Tensor, at::Tensor> motion_gru_update_cpu(const at::Tensor& gates, const at::Tensor& o,
                                                         const at::Tensor& f_prev, const at::Tensor& d_prev) {
  mgru::check_update(gates, o, f_prev, d_prev);
  const auto Gt = gates.contiguous(), O = o.contiguous(), Fp = f_prev.contiguous(), Dp = d_prev.contiguous();
  const int64_t B = Fp.size(0), L = Fp.numel() / std::max<int64_t>(1, B);
  auto f_out = cpu::empty_output(Fp.sizes(), Fp.options());
  auto d_out = cpu::empty_output(Fp.sizes(), Fp.options());
  if (Fp.numel() == 0) return {f_out, d_out};
  AT_DISPATCH_FLOATING_TYPES(Fp.scalar_type(), "motion_gru_update_cpu", [&] {
    const scalar_t* gt = Gt.data_ptr<scalar_t>();
    const scalar_t* op = O.data_ptr<scalar_t>();
    const scalar_t* f = Fp.data_ptr<scalar_t>();
    const scalar_t* d = Dp.data_ptr<scalar_t>();
    scalar_t* fo = f_out.data_ptr<scalar_t>();
    scalar_t* dout = d_out.data_ptr<scalar_t>();
    for_blocks(B, L, [&](int64_t b, int64_t i0, int64_t i1) {
      const int64_t j = b * L + i0;
      update_loop<scalar_t>(gt + b * 2 * L + i0, op + j, f + j, d + j, fo + j, dout + j, i1 - i0);
    });
  });
  return {f_out, d_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> motion_gru_update_backward_cpu(
    const at::Tensor& grad_f, const at::Tensor& grad_d, const at::Tensor& gates, const at::Tensor& o,
    const at::Tensor& f_prev) {
  mgru::check_update_backward(grad_f, grad_d, gates, o, f_prev);
  const auto GF = grad_f.contiguous(), GD = grad_d.contiguous(), Gt = gates.contiguous(), O = o.contiguous(),
             Fp = f_prev.contiguous();
  const int64_t B = Fp.size(0), L = Fp.numel() / std::max<int64_t>(1, B);
  auto d_gates = cpu::empty_output(Gt.sizes(), Gt.options());
  auto d_o = cpu::empty_output(Fp.sizes(), Fp.options());
  auto d_f = cpu::empty_output(Fp.sizes(), Fp.options());
  auto d_d = cpu::empty_output(Fp.sizes(), Fp.options());
  if (Fp.numel() == 0) return {d_gates, d_o, d_f, d_d};
  AT_DISPATCH_FLOATING_TYPES(Fp.scalar_type(), "motion_gru_update_backward_cpu", [&] {
    const scalar_t* gf = GF.data_ptr<scalar_t>();
    const scalar_t* gd = GD.data_ptr<scalar_t>();
    const scalar_t* gt = Gt.data_ptr<scalar_t>();
    const scalar_t* op = O.data_ptr<scalar_t>();
    const scalar_t* f = Fp.data_ptr<scalar_t>();
    scalar_t* dg = d_gates.data_ptr<scalar_t>();
    scalar_t* dop = d_o.data_ptr<scalar_t>();
    scalar_t* dfp = d_f.data_ptr<scalar_t>();
    scalar_t* ddp = d_d.data_ptr<scalar_t>();
    for_blocks(B, L, [&](int64_t b, int64_t i0, int64_t i1) {
      const int64_t j = b * L + i0;
      update_bwd_loop<scalar_t>(gf + j, gd + j, gt + b * 2 * L + i0, op + j, f + j, dg + b * 2 * L + i0,
                                dg + b * 2 * L + L + i0, dop + j, dfp + j, ddp + j, i1 - i0);
    });
  });
  return {d_gates, d_o, d_f, d_d};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("motion_gru_reset", &vpfast::motion_gru_reset_cpu);
  m.impl("motion_gru_reset_backward", &vpfast::motion_gru_reset_backward_cpu);
  m.impl("motion_gru_update", &vpfast::motion_gru_update_cpu);
  m.impl("motion_gru_update_backward", &vpfast::motion_gru_update_backward_cpu);
}
