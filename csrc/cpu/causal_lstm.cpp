// Fused Causal LSTM pointwise stages, CPU. The operands are walked as rows of contiguous elements (planar
// layout: (b, channel) planes of H*W; channels_last: (b, pixel) runs of C channels; common/causal_lstm.h), read
// in place, the inner loops vectorised with common/math.h.
// Arithmetic: common/causal_lstm.h (shared with CUDA). Outputs that are plain copies of another output or of
// an operand (the carried x slots, the gradients every summand of a pre-activation shares) are written by
// memcpy after the row's arithmetic: few output streams per loop (see cpu/stlstm.cpp's backward).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/causal_lstm.h"
#include "cpu/denormals.h"
#include "cpu/lstm_cpu.h"

namespace vpfast {
namespace {

using causal::Rows;

// fn(b, o) for every row (b, o) of the call, in parallel tasks of about 16K elements
template <typename F>
void for_rows(const causal::Call& s, const F& fn) {
  const int64_t outer = s.outer();
  cpu::parallel_for(0, s.B * outer, cpu::lstm_grain(s.width()), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r / outer, r % outer);
  });
}

// out[j] = row (b, o) of slot first + j, j < n
template <typename T, typename P>
void slot_rows(const Rows<T>& t, int64_t b, int64_t o, int first, int n, P* out) {
  for (int j = 0; j < n; ++j) out[j] = t.row(b, o, first + j);
}

// the CPU allocator of the shared host code: the output cache, in the call's layout
at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return cpu::empty_output(sizes, options, format);
}

template <typename T>
void copy_row(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, n * static_cast<int64_t>(sizeof(T)));
}

template <typename F>
void with_flags(bool a, bool b, const F& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

// ---- stage 1: cell -------------------------------------------------------------------------------------
// in: h_g i f g o | x_g i f g i' f' g' o (HAS_X) | c_g i f g (HAS_C) | c_prev;  out: c_new, i, f, carry[o]
template <typename T, bool HAS_X, bool HAS_C>
VPFAST_CPU_CLONES void cell_fwd_row(const T* const* in, T* const* out, T fb, int64_t n) {
  const T *hi = in[0], *hf = in[1], *hg = in[2], *ho = in[3];
  const T *xi = in[4], *xf = in[5], *xg = in[6], *xo = in[10], *ci = in[11], *cf = in[12], *cg = in[13];
  const T* cp = in[14];
  T *cn = out[0], *ai = out[1], *af = out[2], *co = out[3];
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T pi = hi[p], pf = hf[p], pg = hg[p], po = ho[p];
    if constexpr (HAS_X) {  // the reference's order of summation: (x + h) + c
      pi = xi[p] + pi;
      pf = xf[p] + pf;
      pg = xg[p] + pg;
      po = xo[p] + po;
    }
    if constexpr (HAS_C) {
      pi += ci[p];
      pf += cf[p];
      pg += cg[p];
    }
    T i, f, g, c;
    lstm::cell_forward<T>(pi, pf, pg, cp[p], fb, i, f, g, c);
    cn[p] = c;
    ai[p] = i;
    af[p] = f;
    co[p] = po;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_cell_forward_cpu(const std::optional<at::Tensor>& x_g,
                                                                            const at::Tensor& h_g,
                                                                            const std::optional<at::Tensor>& c_g,
                                                                            const at::Tensor& c, double forget_bias) {
  const auto a = causal::cell_forward_args(x_g, h_g, c_g, c, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "causal_lstm_cell_forward_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const auto ph = R(a.h_g), pc = R(a.c), pcn = R(a.c_new), pcar = R(a.carry), pa = R(a.act), px = R(a.x_g),
               pcg = R(a.c_g);
    const T fb = static_cast<T>(forget_bias);
    const int ko = a.has_x ? 3 : 0;  // the carry's o slot
    with_flags(a.has_x, a.has_c, [&](auto HX, auto HC) {
      for_rows(a, [&](int64_t b, int64_t o) {
        const T* in[15] = {};
        slot_rows(ph, b, o, 0, 4, in);
        if (decltype(HX)::value) slot_rows(px, b, o, 0, 7, in + 4);
        if (decltype(HC)::value) slot_rows(pcg, b, o, 0, 3, in + 11);
        in[14] = pc.row(b, o, 0);
        T* out[4] = {pcn.row(b, o, 0), pa.row(b, o, 0), pa.row(b, o, 1), pcar.row(b, o, ko)};
        cell_fwd_row<T, decltype(HX)::value, decltype(HC)::value>(in, out, fb, a.width());
        if (decltype(HX)::value)  // carry i'_x, f'_x, g'_x for the memory stage
          for (int j = 0; j < 3; ++j) copy_row(pcar.row(b, o, j), in[7 + j], a.width());
      });
    });
  });
  return {a.c_new, a.carry, a.act};
}

// in: grad c_new, i, f, c_prev, c_new;  out: grad of the i, f, g pre-activations, grad c_prev
template <typename T>
VPFAST_CPU_CLONES void cell_bwd_row(const T* __restrict__ gcn, const T* __restrict__ ai, const T* __restrict__ af,
                                    const T* __restrict__ cp, const T* __restrict__ cn, T* __restrict__ gi,
                                    T* __restrict__ gf, T* __restrict__ gg, T* __restrict__ gc, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T a, b, c, d;
    lstm::stlstm_cell_backward<T>(ai[p], af[p], cp[p], cn[p], gcn[p], T(0), a, b, c, d);
    gi[p] = a;
    gf[p] = b;
    gg[p] = c;
    gc[p] = d;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_lstm_cell_backward_cpu(
    const at::Tensor& grad_c_new, const at::Tensor& grad_carry, const at::Tensor& act, const at::Tensor& c_new,
    const at::Tensor& c, bool has_x, bool has_c) {
  const auto a = causal::cell_backward_args(grad_c_new, grad_carry, act, c_new, c, has_x, has_c, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "causal_lstm_cell_backward_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const auto pgcn = R(a.gcn), pgcar = R(a.gcar), pa = R(a.act), pcn = R(a.cn), pc = R(a.c), pgh = R(a.gh),
               pgc = R(a.gc), pgx = R(a.gx), pgcg = R(a.gcg);
    const int ko = has_x ? 3 : 0;
    for_rows(a, [&](int64_t b, int64_t o) {
      const int64_t n = a.width();
      T* gh[4];
      slot_rows(pgh, b, o, 0, 4, gh);
      cell_bwd_row<T>(pgcn.row(b, o, 0), pa.row(b, o, 0), pa.row(b, o, 1), pc.row(b, o, 0), pcn.row(b, o, 0), gh[0],
                      gh[1], gh[2], pgc.row(b, o, 0), n);
      const T* go = pgcar.row(b, o, ko);
      copy_row(gh[3], go, n);  // o_h's gradient is o_part's
      for (int j = 0; has_c && j < 3; ++j) copy_row(pgcg.row(b, o, j), gh[j], n);
      if (has_x) {
        for (int j = 0; j < 3; ++j) copy_row(pgx.row(b, o, j), gh[j], n);
        for (int j = 0; j < 3; ++j) copy_row(pgx.row(b, o, 3 + j), pgcar.row(b, o, j), n);
        copy_row(pgx.row(b, o, 6), go, n);
      }
    });
  });
  return {a.gx, a.gh, a.gcg, a.gc};
}

// ---- stage 2: memory -----------------------------------------------------------------------------------
// in: carry i' f' g' (CX) | carry o | m_g i' f' m̂ | c2m_g i' g' f' o;  out: m_new, o_part, i', f', t
template <typename T, bool CX>
VPFAST_CPU_CLONES void memory_fwd_row(const T* const* in, T* const* out, T fb, int64_t n) {
  const T *xi = in[0], *xf = in[1], *xg = in[2], *xo = in[3], *mi = in[4], *mf = in[5], *mh = in[6];
  const T *ki = in[7], *kg = in[8], *kf = in[9], *ko = in[10];
  T *mn = out[0], *op = out[1], *ai = out[2], *af = out[3], *at = out[4];
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T qi = mi[p], qf = mf[p], qg = kg[p];
    if constexpr (CX) {  // (x + m) + c2m, as the reference sums
      qi = xi[p] + qi;
      qf = xf[p] + qf;
      qg = xg[p] + qg;
    }
    qi += ki[p];
    qf += kf[p];
    T i, f, g, m;
    const T t = fast_tanh<T>(mh[p]);
    lstm::cell_forward<T>(qi, qf, qg, t, fb, i, f, g, m);
    mn[p] = m;
    op[p] = xo[p] + ko[p];
    ai[p] = i;
    af[p] = f;
    at[p] = t;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_memory_forward_cpu(const at::Tensor& carry,
                                                                              const at::Tensor& m_g,
                                                                              const at::Tensor& c2m_g,
                                                                              double forget_bias) {
  const auto a = causal::memory_forward_args(carry, m_g, c2m_g, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.m_g.scalar_type(), "causal_lstm_memory_forward_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const auto pcar = R(a.carry), pm = R(a.m_g), pk = R(a.c2m_g), pmn = R(a.m_new), pop = R(a.o_part),
               pa = R(a.act);
    const T fb = static_cast<T>(forget_bias);
    const auto run = [&](auto CX) {
      constexpr bool cx = decltype(CX)::value;
      for_rows(a, [&](int64_t b, int64_t o) {
        const T* in[11] = {};
        if (cx) slot_rows(pcar, b, o, 0, 3, in);
        in[3] = pcar.row(b, o, cx ? 3 : 0);
        slot_rows(pm, b, o, 0, 3, in + 4);
        slot_rows(pk, b, o, 0, 4, in + 7);
        T* out[5] = {pmn.row(b, o, 0), pop.row(b, o, 0)};
        slot_rows(pa, b, o, 0, 3, out + 2);
        memory_fwd_row<T, cx>(in, out, fb, a.width());
      });
    };
    if (a.carry_x) run(std::true_type{});
    else run(std::false_type{});
  });
  return {a.m_new, a.o_part, a.act};
}

// in: grad m_new, i', f', t, m_new;  out: grad of the i', f', g' pre-activations and of m̂
template <typename T>
VPFAST_CPU_CLONES void memory_bwd_row(const T* __restrict__ gm, const T* __restrict__ ai, const T* __restrict__ af,
                                      const T* __restrict__ at, const T* __restrict__ mn, T* __restrict__ gi,
                                      T* __restrict__ gf, T* __restrict__ gg, T* __restrict__ gh, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T a, b, c, d;
    causal::memory_backward<T>(ai[p], af[p], at[p], mn[p], gm[p], a, b, c, d);
    gi[p] = a;
    gf[p] = b;
    gg[p] = c;
    gh[p] = d;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_memory_backward_cpu(const at::Tensor& grad_m_new,
                                                                               const at::Tensor& grad_o_part,
                                                                               const at::Tensor& act,
                                                                               const at::Tensor& m_new,
                                                                               bool carry_x) {
  const auto a = causal::memory_backward_args(grad_m_new, grad_o_part, act, m_new, carry_x, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.mn.scalar_type(), "causal_lstm_memory_backward_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const auto pgm = R(a.gm), pgop = R(a.gop), pa = R(a.act), pmn = R(a.mn), pgcar = R(a.gcar), pgmg = R(a.gmg),
               pgk = R(a.gc2m);
    for_rows(a, [&](int64_t b, int64_t o) {
      const int64_t n = a.width();
      T* gmg[3];
      slot_rows(pgmg, b, o, 0, 3, gmg);
      T* gk[4];  // c2m order: i', g', f', o
      slot_rows(pgk, b, o, 0, 4, gk);
      memory_bwd_row<T>(pgm.row(b, o, 0), pa.row(b, o, 0), pa.row(b, o, 1), pa.row(b, o, 2), pmn.row(b, o, 0),
                        gmg[0], gmg[1], gk[1], gmg[2], n);
      const T* gop = pgop.row(b, o, 0);
      copy_row(gk[0], gmg[0], n);
      copy_row(gk[2], gmg[1], n);
      copy_row(gk[3], gop, n);
      if (carry_x) {
        copy_row(pgcar.row(b, o, 0), gmg[0], n);
        copy_row(pgcar.row(b, o, 1), gmg[1], n);
        copy_row(pgcar.row(b, o, 2), gk[1], n);
      }
      copy_row(pgcar.row(b, o, carry_x ? 3 : 0), gop, n);
    });
  });
  return {a.gcar, a.gmg, a.gc2m};
}

// ---- stage 3: output -----------------------------------------------------------------------------------
template <typename T>
VPFAST_CPU_CLONES void output_fwd_row(const T* __restrict__ op, const T* __restrict__ om, const T* __restrict__ last,
                                      T* __restrict__ h, T* __restrict__ o, T* __restrict__ tl, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T o_, tl_, h_;
    causal::output_forward<T>(op[p] + om[p], last[p], o_, tl_, h_);
    h[p] = h_;
    o[p] = o_;
    tl[p] = tl_;
  }
}

template <typename T>
VPFAST_CPU_CLONES void output_bwd_row(const T* __restrict__ gh, const T* __restrict__ o, const T* __restrict__ tl,
                                      T* __restrict__ gpre, T* __restrict__ glast, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T a, b;
    causal::output_backward<T>(gh[p], o[p], tl[p], a, b);
    gpre[p] = a;
    glast[p] = b;
  }
}

// the output stage's forward (3 outputs) or backward (2), row by row
template <typename Row>
std::vector<at::Tensor> output_stage(const char* op, const at::Tensor& a_, const char* an, const at::Tensor& b_,
                                     const char* bn, const at::Tensor& c_, const char* cn, int outs, const Row& row) {
  const auto a = causal::output_args(op, a_, an, b_, bn, c_, cn, outs, outs == 3, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.a.scalar_type(), "causal_lstm_output_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const auto pa = R(a.a), pb = R(a.b), pc = R(a.c), p0 = R(a.out[0]), p1 = R(a.out[1]), p2 = R(a.out[2]);
    for_rows(a, [&](int64_t b, int64_t o) {
      row(pa.row(b, o, 0), pb.row(b, o, 0), pc.row(b, o, 0), p0.row(b, o, 0), p1.row(b, o, 0),
          outs > 2 ? p2.row(b, o, 0) : nullptr, a.width());
    });
  });
  return {a.out[0], a.out[1], a.out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_output_forward_cpu(const at::Tensor& o_part,
                                                                              const at::Tensor& o_m,
                                                                              const at::Tensor& last) {
  const auto r = output_stage("vpfast::causal_lstm_output_forward", o_part, "o_part", o_m, "o_m", last, "last", 3,
                              [](const auto* x, const auto* y, const auto* z, auto* h, auto* o, auto* t, int64_t n) {
                                using T = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
                                output_fwd_row<T>(x, y, z, h, o, t, n);
                              });
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> causal_lstm_output_backward_cpu(const at::Tensor& grad_h, const at::Tensor& o,
                                                                   const at::Tensor& tl) {
  const auto r = output_stage("vpfast::causal_lstm_output_backward", grad_h, "grad_h", o, "o", tl, "tl", 2,
                              [](const auto* x, const auto* y, const auto* z, auto* gp, auto* gl, auto*, int64_t n) {
                                using T = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
                                output_bwd_row<T>(x, y, z, gp, gl, n);
                              });
  return {r[0], r[1]};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("causal_lstm_cell_forward", &vpfast::causal_lstm_cell_forward_cpu);
  m.impl("causal_lstm_cell_backward", &vpfast::causal_lstm_cell_backward_cpu);
  m.impl("causal_lstm_memory_forward", &vpfast::causal_lstm_memory_forward_cpu);
  m.impl("causal_lstm_memory_backward", &vpfast::causal_lstm_memory_backward_cpu);
  m.impl("causal_lstm_output_forward", &vpfast::causal_lstm_output_forward_cpu);
  m.impl("causal_lstm_output_backward", &vpfast::causal_lstm_output_backward_cpu);
}
