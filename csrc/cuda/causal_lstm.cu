// Fused Causal LSTM pointwise stages, CUDA: one thread per element of the [B, C, H, W] index space (grid-stride
// loop), operands addressed in the call's layout (planar or channels_last rows, common/causal_lstm.h) exactly
// as on the CPU. Arithmetic: common/causal_lstm.h.
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

using causal::Rows;
constexpr int kThreads = 256;

// the allocator of the shared host code
at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return at::empty(sizes, options.memory_format(format));
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

// element (b, ch, p) of slot j of a [B, K*C, H, W] operand in layout cl, widened / stored
template <typename A, typename T>
__device__ __forceinline__ A ld(bool cl, const Rows<T>& t, int64_t b, int64_t j, int64_t ch, int64_t p) {
  return static_cast<A>(*t.at(cl, b, j, ch, p));
}

template <typename T, typename A>
__device__ __forceinline__ void st(bool cl, const Rows<T>& t, int64_t b, int64_t j, int64_t ch, int64_t p, A v) {
  *t.at(cl, b, j, ch, p) = static_cast<T>(v);
}

// the grid-stride loop over the n = B*C*HW elements: body(b, ch, p), in the layout's order (consecutive threads
// on consecutive addresses: pixels in planar operands, channels in channels_last ones)
#define VPFAST_CAUSAL_LOOP(n, C, HW)                                                                      \
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < (n);                           \
       idx += (int64_t)gridDim.x * blockDim.x)                                                            \
    if (const int64_t in_ = cl ? (C) : (HW), r = idx / in_, p = cl ? r % (HW) : idx % in_,                \
        ch = cl ? idx % in_ : r % (C), b = cl ? r / (HW) : r / (C);                                       \
        true)

template <typename T>
__global__ void cell_fwd_kernel(Rows<T> x, Rows<T> hg, Rows<T> cg, Rows<T> c, Rows<T> cn, Rows<T> car,
                                Rows<T> act, bool cl, int64_t C, int64_t HW, int64_t n, at::opmath_type<T> fb) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A pi = ld<A>(cl, hg, b, 0, ch, p), pf = ld<A>(cl, hg, b, 1, ch, p), pg = ld<A>(cl, hg, b, 2, ch, p),
      po = ld<A>(cl, hg, b, 3, ch, p);
    if (x.ptr) {
      pi = ld<A>(cl, x, b, 0, ch, p) + pi;
      pf = ld<A>(cl, x, b, 1, ch, p) + pf;
      pg = ld<A>(cl, x, b, 2, ch, p) + pg;
      po = ld<A>(cl, x, b, 6, ch, p) + po;
      for (int j = 0; j < 3; ++j) st(cl, car, b, j, ch, p, ld<A>(cl, x, b, 3 + j, ch, p));
    }
    if (cg.ptr) {
      pi += ld<A>(cl, cg, b, 0, ch, p);
      pf += ld<A>(cl, cg, b, 1, ch, p);
      pg += ld<A>(cl, cg, b, 2, ch, p);
    }
    A i, f, g, c_;
    lstm::cell_forward<A>(pi, pf, pg, ld<A>(cl, c, b, 0, ch, p), fb, i, f, g, c_);
    st(cl, cn, b, 0, ch, p, c_);
    st(cl, act, b, 0, ch, p, i);
    st(cl, act, b, 1, ch, p, f);
    st(cl, car, b, x.ptr ? 3 : 0, ch, p, po);
  }
}

// Backward reads the saved gates and memories as stored (in T): g is recovered from the rounded c_t, so its error
// is about one rounding of c_t in T (common/stlstm.h).
template <typename T>
__global__ void cell_bwd_kernel(Rows<T> gcn, Rows<T> gcar, Rows<T> act, Rows<T> cn, Rows<T> c,
                                Rows<T> gx, Rows<T> gh, Rows<T> gcg, Rows<T> gc, bool cl, int64_t C,
                                int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A g[3], gcp;
    lstm::stlstm_cell_backward<A>(ld<A>(cl, act, b, 0, ch, p), ld<A>(cl, act, b, 1, ch, p), ld<A>(cl, c, b, 0, ch, p),
                                  ld<A>(cl, cn, b, 0, ch, p), ld<A>(cl, gcn, b, 0, ch, p), A(0), g[0], g[1], g[2],
                                  gcp);
    const A go = ld<A>(cl, gcar, b, gx.ptr ? 3 : 0, ch, p);
    for (int j = 0; j < 3; ++j) {
      st(cl, gh, b, j, ch, p, g[j]);
      if (gcg.ptr) st(cl, gcg, b, j, ch, p, g[j]);
      if (gx.ptr) {
        st(cl, gx, b, j, ch, p, g[j]);
        st(cl, gx, b, 3 + j, ch, p, ld<A>(cl, gcar, b, j, ch, p));
      }
    }
    st(cl, gh, b, 3, ch, p, go);
    if (gx.ptr) st(cl, gx, b, 6, ch, p, go);
    st(cl, gc, b, 0, ch, p, gcp);
  }
}

template <typename T>
__global__ void memory_fwd_kernel(Rows<T> car, Rows<T> mg, Rows<T> k, Rows<T> mn, Rows<T> op,
                                  Rows<T> act, bool carry_x, bool cl, int64_t C, int64_t HW, int64_t n,
                                  at::opmath_type<T> fb) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A qi = ld<A>(cl, mg, b, 0, ch, p), qf = ld<A>(cl, mg, b, 1, ch, p), qg = ld<A>(cl, k, b, 1, ch, p);
    if (carry_x) {  // (x + m) + c2m, as the reference sums
      qi = ld<A>(cl, car, b, 0, ch, p) + qi;
      qf = ld<A>(cl, car, b, 1, ch, p) + qf;
      qg = ld<A>(cl, car, b, 2, ch, p) + qg;
    }
    qi += ld<A>(cl, k, b, 0, ch, p);
    qf += ld<A>(cl, k, b, 2, ch, p);
    const A t = fast_tanh<A>(ld<A>(cl, mg, b, 2, ch, p));
    A i, f, g, m_;
    lstm::cell_forward<A>(qi, qf, qg, t, fb, i, f, g, m_);
    st(cl, mn, b, 0, ch, p, m_);
    st(cl, op, b, 0, ch, p, ld<A>(cl, car, b, carry_x ? 3 : 0, ch, p) + ld<A>(cl, k, b, 3, ch, p));
    st(cl, act, b, 0, ch, p, i);
    st(cl, act, b, 1, ch, p, f);
    st(cl, act, b, 2, ch, p, t);
  }
}

template <typename T>
__global__ void memory_bwd_kernel(Rows<T> gm, Rows<T> gop, Rows<T> act, Rows<T> mn, Rows<T> gcar,
                                  Rows<T> gmg, Rows<T> gk, bool carry_x, bool cl, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    A gi, gf, gg, gmh;
    causal::memory_backward<A>(ld<A>(cl, act, b, 0, ch, p), ld<A>(cl, act, b, 1, ch, p), ld<A>(cl, act, b, 2, ch, p),
                               ld<A>(cl, mn, b, 0, ch, p), ld<A>(cl, gm, b, 0, ch, p), gi, gf, gg, gmh);
    const A go = ld<A>(cl, gop, b, 0, ch, p);
    st(cl, gmg, b, 0, ch, p, gi);
    st(cl, gmg, b, 1, ch, p, gf);
    st(cl, gmg, b, 2, ch, p, gmh);
    st(cl, gk, b, 0, ch, p, gi);
    st(cl, gk, b, 1, ch, p, gg);
    st(cl, gk, b, 2, ch, p, gf);
    st(cl, gk, b, 3, ch, p, go);
    if (carry_x) {
      st(cl, gcar, b, 0, ch, p, gi);
      st(cl, gcar, b, 1, ch, p, gf);
      st(cl, gcar, b, 2, ch, p, gg);
    }
    st(cl, gcar, b, carry_x ? 3 : 0, ch, p, go);
  }
}

// forward: (a, b, c) = (o_part, o_m, last) -> (h, o, tl); backward: (grad_h, o, tl) -> (grad_pre, grad_last)
template <typename T, bool FWD>
__global__ void output_kernel(Rows<T> x, Rows<T> y, Rows<T> z, Rows<T> o0, Rows<T> o1, Rows<T> o2,
                              bool cl, int64_t C, int64_t HW, int64_t n) {
  using A = at::opmath_type<T>;
  VPFAST_CAUSAL_LOOP(n, C, HW) {
    const A a = ld<A>(cl, x, b, 0, ch, p), bb = ld<A>(cl, y, b, 0, ch, p), c = ld<A>(cl, z, b, 0, ch, p);
    if constexpr (FWD) {
      A o, tl, h;
      causal::output_forward<A>(a + bb, c, o, tl, h);
      st(cl, o0, b, 0, ch, p, h);
      st(cl, o1, b, 0, ch, p, o);
      st(cl, o2, b, 0, ch, p, tl);
    } else {
      A gp, gl;
      causal::output_backward<A>(a, bb, c, gp, gl);
      st(cl, o0, b, 0, ch, p, gp);
      st(cl, o1, b, 0, ch, p, gl);
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
  const auto a = causal::cell_forward_args(x_g, h_g, c_g, c, alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.c_new, a.carry, a.act};
  VPFAST_DISPATCH_CAUSAL(a.c.scalar_type(), "causal_lstm_cell_forward_cuda", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    cell_fwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        R(a.x_g), R(a.h_g), R(a.c_g), R(a.c),
        R(a.c_new), R(a.carry), R(a.act), a.cl, a.C, a.HW, n,
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
      causal::cell_backward_args(grad_c_new, grad_carry, act, c_new, c, has_x, has_c, alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gx, a.gh, a.gcg, a.gc};
  VPFAST_DISPATCH_CAUSAL(a.c.scalar_type(), "causal_lstm_cell_backward_cuda", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    cell_bwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        R(a.gcn), R(a.gcar), R(a.act), R(a.cn), R(a.c),
        R(a.gx), R(a.gh), R(a.gcg), R(a.gc), a.cl, a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gx, a.gh, a.gcg, a.gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_memory_forward_cuda(const at::Tensor& carry,
                                                                               const at::Tensor& m_g,
                                                                               const at::Tensor& c2m_g,
                                                                               double forget_bias) {
  const c10::cuda::CUDAGuard guard(m_g.device());
  const auto a = causal::memory_forward_args(carry, m_g, c2m_g, alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.m_new, a.o_part, a.act};
  VPFAST_DISPATCH_CAUSAL(a.m_g.scalar_type(), "causal_lstm_memory_forward_cuda", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    memory_fwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        R(a.carry), R(a.m_g), R(a.c2m_g), R(a.m_new), R(a.o_part),
        R(a.act), a.carry_x, a.cl, a.C, a.HW, n, static_cast<at::opmath_type<T>>(forget_bias));
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
  const auto a = causal::memory_backward_args(grad_m_new, grad_o_part, act, m_new, carry_x, alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return {a.gcar, a.gmg, a.gc2m};
  VPFAST_DISPATCH_CAUSAL(a.mn.scalar_type(), "causal_lstm_memory_backward_cuda", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    memory_bwd_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        R(a.gm), R(a.gop), R(a.act), R(a.mn), R(a.gcar), R(a.gmg),
        R(a.gc2m), carry_x, a.cl, a.C, a.HW, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.gcar, a.gmg, a.gc2m};
}

template <bool FWD>
causal::Output output_stage(const char* op, const at::Tensor& x, const char* xn, const at::Tensor& y, const char* yn,
                            const at::Tensor& z, const char* zn) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = causal::output_args(op, x, xn, y, yn, z, zn, FWD ? 3 : 2, FWD, alloc);
  const int64_t n = a.B * a.C * a.HW;
  if (n == 0) return a;
  VPFAST_DISPATCH_CAUSAL(a.a.scalar_type(), "causal_lstm_output_cuda", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    output_kernel<T, FWD><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        R(a.a), R(a.b), R(a.c), R(a.out[0]), R(a.out[1]),
        R(a.out[2]), a.cl, a.C, a.HW, n);
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
