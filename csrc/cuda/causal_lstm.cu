// Fused Causal LSTM pointwise stages, CUDA: one thread per element of the [B, C, H, W] index space (grid-stride
// loop), operands addressed as strided planes exactly as on the CPU. Arithmetic: common/causal_lstm.h.
//
// Storage type T (float, double, Half, BFloat16), arithmetic type A = at::opmath_type<T> (float for the half
// types): each element is loaded, widened, run through the shared functions and rounded to T once on store.
// Launch limits: a 1-D grid of at most 65535 blocks of 256 threads, the loop strides over the rest, with 64-bit
// index and plane offsets.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

#include "common/causal_lstm.h"

namespace vpfast {
namespace {

using lstm::Planes;
using lstm::planes;
using lstm::planes_opt;
constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

// element p of plane (b, ch) of slot j of a [B, K*C, H, W] operand, widened / stored
template <typename A, typename T>
__device__ __forceinline__ A ld(const Planes<T>& t, int64_t b, int64_t j, int64_t C, int64_t ch, int64_t p) {
  return static_cast<A>(t.at(b, j * C + ch)[p]);
}

template <typename T, typename A>
__device__ __forceinline__ void st(const Planes<T>& t, int64_t b, int64_t j, int64_t C, int64_t ch, int64_t p, A v) {
  t.at(b, j * C + ch)[p] = static_cast<T>(v);
}

// the grid-stride loop over the n = B*C*HW elements: body(b, ch, p)
#define VPFAST_CAUSAL_LOOP(n, C, HW)                                                       \
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < (n);            \
       idx += (int64_t)gridDim.x * blockDim.x)                                             \
    if (const int64_t p = idx % (HW), r = idx / (HW), ch = r % (C), b = r / (C); true)

template <typename T>
__global__ void cell_fwd_kernel(Planes<T> x, Planes<T> hg, Planes<T> cg, Planes<T> c, Planes<T> cn, Planes<T> car,
                                Planes<T> act, int64_t C, int64_t HW, int64_t n, at::opmath_type<T> fb) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A pi = ld<A>(hg, b, 0, C, ch, p), pf = ld<A>(hg, b, 1, C, ch, p), pg = ld<A>(hg, b, 2, C, ch, p),
      po = ld<A>(hg, b, 3, C, ch, p);
    if (x.ptr) {
      pi = ld<A>(x, b, 0, C, ch, p) + pi;
      pf = ld<A>(x, b, 1, C, ch, p) + pf;
      pg = ld<A>(x, b, 2, C, ch, p) + pg;
      po = ld<A>(x, b, 6, C, ch, p) + po;
      for (int j = 0; j < 3; ++j) st(car, b, j, C, ch, p, ld<A>(x, b, 3 + j, C, ch, p));
    }
    if (cg.ptr) {
      pi += ld<A>(cg, b, 0, C, ch, p);
      pf += ld<A>(cg, b, 1, C, ch, p);
      pg += ld<A>(cg, b, 2, C, ch, p);
    }
    A i, f, g, c_;
    lstm::cell_forward<A>(pi, pf, pg, ld<A>(c, b, 0, C, ch, p), fb, i, f, g, c_);
    st(cn, b, 0, C, ch, p, c_);
    st(act, b, 0, C, ch, p, i);
    st(act, b, 1, C, ch, p, f);
    st(car, b, x.ptr ? 3 : 0, C, ch, p, po);
  }
}

// Backward reads the saved gates and memories as stored (in T): g is recovered from the rounded c_t, so its error
// is about one rounding of c_t in T (common/stlstm.h).
template <typename T>
__global__ void cell_bwd_kernel(Planes<T> gcn, Planes<T> gcar, Planes<T> act, Planes<T> cn, Planes<T> c,
                                Planes<T> gx, Planes<T> gh, Planes<T> gcg, Planes<T> gc, int64_t C, int64_t HW,
                                int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A g[3], gcp;
    lstm::stlstm_cell_backward<A>(ld<A>(act, b, 0, C, ch, p), ld<A>(act, b, 1, C, ch, p), ld<A>(c, b, 0, C, ch, p),
                                  ld<A>(cn, b, 0, C, ch, p), ld<A>(gcn, b, 0, C, ch, p), A(0), g[0], g[1], g[2],
                                  gcp);
    const A go = ld<A>(gcar, b, gx.ptr ? 3 : 0, C, ch, p);
    for (int j = 0; j < 3; ++j) {
      st(gh, b, j, C, ch, p, g[j]);
      if (gcg.ptr) st(gcg, b, j, C, ch, p, g[j]);
      if (gx.ptr) {
        st(gx, b, j, C, ch, p, g[j]);
        st(gx, b, 3 + j, C, ch, p, ld<A>(gcar, b, j, C, ch, p));
      }
    }
    st(gh, b, 3, C, ch, p, go);
    if (gx.ptr) st(gx, b, 6, C, ch, p, go);
    st(gc, b, 0, C, ch, p, gcp);
  }
}

template <typename T>
__global__ void memory_fwd_kernel(Planes<T> car, Planes<T> mg, Planes<T> k, Planes<T> mn, Planes<T> op,
                                  Planes<T> act, bool carry_x, int64_t C, int64_t HW, int64_t n,
                                  at::opmath_type<T> fb) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A qi = ld<A>(mg, b, 0, C, ch, p), qf = ld<A>(mg, b, 1, C, ch, p), qg = ld<A>(k, b, 1, C, ch, p);
    if (carry_x) {  // (x + m) + c2m, as the reference sums
      qi = ld<A>(car, b, 0, C, ch, p) + qi;
      qf = ld<A>(car, b, 1, C, ch, p) + qf;
      qg = ld<A>(car, b, 2, C, ch, p) + qg;
    }
    qi += ld<A>(k, b, 0, C, ch, p);
    qf += ld<A>(k, b, 2, C, ch, p);
    const A t = fast_tanh<A>(ld<A>(mg, b, 2, C, ch, p));
    A i, f, g, m_;
    lstm::cell_forward<A>(qi, qf, qg, t, fb, i, f, g, m_);
    st(mn, b, 0, C, ch, p, m_);
    st(op, b, 0, C, ch, p, ld<A>(car, b, carry_x ? 3 : 0, C, ch, p) + ld<A>(k, b, 3, C, ch, p));
    st(act, b, 0, C, ch, p, i);
    st(act, b, 1, C, ch, p, f);
    st(act, b, 2, C, ch, p, t);
  }
}

template <typename T>
__global__ void memory_bwd_kernel(Planes<T> gm, Planes<T> gop, Planes<T> act, Planes<T> mn, Planes<T> gcar,
                                  Planes<T> gmg, Planes<T> gk, bool carry_x, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A gi, gf, gg, gmh;
    causal::memory_backward<A>(ld<A>(act, b, 0, C, ch, p), ld<A>(act, b, 1, C, ch, p), ld<A>(act, b, 2, C, ch, p),
                               ld<A>(mn, b, 0, C, ch, p), ld<A>(gm, b, 0, C, ch, p), gi, gf, gg, gmh);
    const A go = ld<A>(gop, b, 0, C, ch, p);
    st(gmg, b, 0, C, ch, p, gi);
    st(gmg, b, 1, C, ch, p, gf);
    st(gmg, b, 2, C, ch, p, gmh);
    st(gk, b, 0, C, ch, p, gi);
    st(gk, b, 1, C, ch, p, gg);
    st(gk, b, 2, C, ch, p, gf);
    st(gk, b, 3, C, ch, p, go);
    if (carry_x) {
      st(gcar, b, 0, C, ch, p, gi);
      st(gcar, b, 1, C, ch, p, gf);
      st(gcar, b, 2, C, ch, p, gg);
    }
    st(gcar, b, carry_x ? 3 : 0, C, ch, p, go);
  }
}

// forward: (a, b, c) = (o_part, o_m, last) -> (h, o, tl); backward: (grad_h, o, tl) -> (grad_pre, grad_last)
template <typename T, bool FWD>
__global__ void output_kernel(Planes<T> x, Planes<T> y, Planes<T> z, Planes<T> o0, Planes<T> o1, Planes<T> o2,
                              int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    const A a = ld<A>(x, b, 0, C, ch, p), bb = ld<A>(y, b, 0, C, ch, p), c = ld<A>(z, b, 0, C, ch, p);
    if constexpr (FWD) {
      A o, tl, h;
      causal::output_forward<A>(a + bb, c, o, tl, h);
      st(o0, b, 0, C, ch, p, h);
      st(o1, b, 0, C, ch, p, o);
      st(o2, b, 0, C, ch, p, tl);
    } else {
      A gp, gl;
      causal::output_backward<A>(a, bb, c, gp, gl);
      st(o0, b, 0, C, ch, p, gp);
      st(o1, b, 0, C, ch, p, gl);
    }
  }
}

// float, double, and the half types (computed in float)
#define VPFAST_DISPATCH_CAUSAL(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_cell_forward_cuda(const std::optional<at::Tensor>& x_g,
                                                                             const at::Tensor& h_g,
                                                                             const std::optional<at::Tensor>& c_g,
                                                                             const at::Tensor& c, double forget_bias) {
  const c10::cuda::CUDAGuard guard(c.device());
  const auto a = causal::cell_forward_args(x_g, h_g, c_g, c, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.c_new, a.carry, a.act};
  VPFAST_DISPATCH_CAUSAL(a.c.scalar_type(), "causal_lstm_cell_forward_cuda", [&] {
    using T = scalar_t;
    cell_fwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        planes_opt<T>(a.has_x, a.x_g), planes<T>(a.h_g), planes_opt<T>(a.has_c, a.c_g), planes<T>(a.c),
        planes<T>(a.c_new), planes<T>(a.carry), planes<T>(a.act), a.C, a.HW, n,
        static_cast<at::opmath_type<T>>(forget_bias));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.c_new, a.carry, a.act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_lstm_cell_backward_cuda(
    const at::Tensor& grad_c_new, const at::Tensor& grad_carry, const at::Tensor& act, const at::Tensor& c_new,
    const at::Tensor& c, bool has_x, bool has_c) {
  const c10::cuda::CUDAGuard guard(c.device());
  const auto a =
      causal::cell_backward_args(grad_c_new, grad_carry, act, c_new, c, has_x, has_c, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gx, a.gh, a.gcg, a.gc};
  VPFAST_DISPATCH_CAUSAL(a.c.scalar_type(), "causal_lstm_cell_backward_cuda", [&] {
    using T = scalar_t;
    cell_bwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        planes<T>(a.gcn), planes<T>(a.gcar), planes<T>(a.act), planes<T>(a.cn), planes<T>(a.c),
        planes_opt<T>(has_x, a.gx), planes<T>(a.gh), planes_opt<T>(has_c, a.gcg), planes<T>(a.gc), a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gx, a.gh, a.gcg, a.gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_memory_forward_cuda(const at::Tensor& carry,
                                                                               const at::Tensor& m_g,
                                                                               const at::Tensor& c2m_g,
                                                                               double forget_bias) {
  const c10::cuda::CUDAGuard guard(m_g.device());
  const auto a = causal::memory_forward_args(carry, m_g, c2m_g, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.m_new, a.o_part, a.act};
  VPFAST_DISPATCH_CAUSAL(a.m_g.scalar_type(), "causal_lstm_memory_forward_cuda", [&] {
    using T = scalar_t;
    memory_fwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        planes<T>(a.carry), planes<T>(a.m_g), planes<T>(a.c2m_g), planes<T>(a.m_new), planes<T>(a.o_part),
        planes<T>(a.act), a.carry_x, a.C, a.HW, n, static_cast<at::opmath_type<T>>(forget_bias));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.m_new, a.o_part, a.act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_memory_backward_cuda(const at::Tensor& grad_m_new,
                                                                                const at::Tensor& grad_o_part,
                                                                                const at::Tensor& act,
                                                                                const at::Tensor& m_new,
                                                                                bool carry_x) {
  const c10::cuda::CUDAGuard guard(m_new.device());
  const auto a = causal::memory_backward_args(grad_m_new, grad_o_part, act, m_new, carry_x, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gcar, a.gmg, a.gc2m};
  VPFAST_DISPATCH_CAUSAL(a.mn.scalar_type(), "causal_lstm_memory_backward_cuda", [&] {
    using T = scalar_t;
    memory_bwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        planes<T>(a.gm), planes<T>(a.gop), planes<T>(a.act), planes<T>(a.mn), planes<T>(a.gcar), planes<T>(a.gmg),
        planes<T>(a.gc2m), carry_x, a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gcar, a.gmg, a.gc2m};
}

template <bool FWD>
causal::Output output_stage(const char* op, const at::Tensor& x, const char* xn, const at::Tensor& y, const char* yn,
                            const at::Tensor& z, const char* zn) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = causal::output_args(op, x, xn, y, yn, z, zn, FWD ? 3 : 2, lstm::empty_alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return a;
  VPFAST_DISPATCH_CAUSAL(a.a.scalar_type(), "causal_lstm_output_cuda", [&] {
    using T = scalar_t;
    output_kernel<T, FWD><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        planes<T>(a.a), planes<T>(a.b), planes<T>(a.c), planes<T>(a.out[0]), planes<T>(a.out[1]),
        planes_opt<T>(FWD, a.out[2]), a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_output_forward_cuda(const at::Tensor& o_part,
                                                                               const at::Tensor& o_m,
                                                                               const at::Tensor& last) {
  const auto a = output_stage<true>("vpfast::causal_lstm_output_forward", o_part, "o_part", o_m, "o_m", last, "last");
  return {a.out[0], a.out[1], a.out[2]};
}

std::tuple<at::Tensor, at::Tensor> causal_lstm_output_backward_cuda(const at::Tensor& grad_h, const at::Tensor& o,
                                                                    const at::Tensor& tl) {
  const auto a = output_stage<false>("vpfast::causal_lstm_output_backward", grad_h, "grad_h", o, "o", tl, "tl");
  return {a.out[0], a.out[1]};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("causal_lstm_cell_forward", &vpfast::causal_lstm_cell_forward_cuda);
  m.impl("causal_lstm_cell_backward", &vpfast::causal_lstm_cell_backward_cuda);
  m.impl("causal_lstm_memory_forward", &vpfast::causal_lstm_memory_forward_cuda);
  m.impl("causal_lstm_memory_backward", &vpfast::causal_lstm_memory_backward_cuda);
  m.impl("causal_lstm_output_forward", &vpfast::causal_lstm_output_forward_cuda);
  m.impl("causal_lstm_output_backward", &vpfast::causal_lstm_output_backward_cuda);
}
