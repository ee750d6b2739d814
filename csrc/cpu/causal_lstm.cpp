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

// fn(b, o, count) over blocks of `count` consecutive rows (b, o), ..., (b, o + count - 1) covering every row of
// the call, in parallel tasks of about 16K elements. Blocks keep the per-row overhead (pointer set-up, the call)
// off channels_last rows, which are only C elements long.
template <typename F>
void for_blocks(const causal::Call& s, const F& fn) {
  const int64_t outer = s.outer();
  cpu::parallel_for(0, s.B * outer, cpu::lstm_grain(s.width()), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / outer, o = r % outer, count = std::min(end - r, outer - o);
      fn(b, o, count);
      r += count;
    }
  });
}

// Rows of several operands for a row function: row r of operand k starts at p[k] + r * s[k]
template <typename T, int N>
struct Block {
  T* p[N] = {};
  int64_t s[N] = {};
  T* row(int k, int64_t r) const { return p[k] + r * s[k]; }
};

// operands k = at, at + 1, ... of blk: slots first, first + 1, ... (n of them) of t, from row (b, o)
template <typename T, typename B>
void slot_rows(const Rows<T>& t, int64_t b, int64_t o, int first, int n, B& blk, int at) {
  for (int j = 0; j < n; ++j) {
    blk.p[at + j] = t.row(b, o, first + j);
    blk.s[at + j] = t.so;
  }
}

// the CPU allocator of the shared host code: the output cache, in the call's layout
at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return cpu::empty_output(sizes, options, format);
}

// count rows of n elements, row r at dst + r * ds and src + r * ss. Short rows (channels_last: C elements) are
// copied by a vector loop: a memcpy call per 64-byte row cost more than the stage's arithmetic.
template <typename T>
VPFAST_CPU_CLONES void copy_rows(T* __restrict__ dst, int64_t ds, const T* __restrict__ src, int64_t ss, int64_t n,
                                 int64_t count) {
  if (n >= 256) {
    for (int64_t r = 0; r < count; ++r) std::memcpy(dst + r * ds, src + r * ss, n * static_cast<int64_t>(sizeof(T)));
    return;
  }
  for (int64_t r = 0; r < count; ++r) {
    T* d = dst + r * ds;
    const T* s = src + r * ss;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) d[p] = s[p];
  }
}

// ---- stage 1: cell -------------------------------------------------------------------------------------
// in: h_g i f g o | x_g i f g i' f' g' o (HAS_X) | c_g i f g (HAS_C) | c_prev;  out: c_new, i, f, carry[o]
template <typename T, bool HAS_X, bool HAS_C>
VPFAST_CPU_CLONES void cell_fwd_rows(const Block<const T, 15>& in, const Block<T, 4>& out, T fb, int64_t n,
                                     int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const T *hi = in.row(0, r), *hf = in.row(1, r), *hg = in.row(2, r), *ho = in.row(3, r);
    const T *xi = in.row(4, r), *xf = in.row(5, r), *xg = in.row(6, r), *xo = in.row(10, r), *ci = in.row(11, r),
            *cf = in.row(12, r), *cg = in.row(13, r);
    const T* cp = in.row(14, r);
    T *cn = out.row(0, r), *ai = out.row(1, r), *af = out.row(2, r), *co = out.row(3, r);
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
    cpu::with_flags(a.has_x, a.has_c, [&](auto HX, auto HC) {
      for_blocks(a, [&](int64_t b, int64_t o, int64_t count) {
        Block<const T, 15> in;
        slot_rows(ph, b, o, 0, 4, in, 0);
        if (decltype(HX)::value) slot_rows(px, b, o, 0, 7, in, 4);
        if (decltype(HC)::value) slot_rows(pcg, b, o, 0, 3, in, 11);
        slot_rows(pc, b, o, 0, 1, in, 14);
        Block<T, 4> out;
        slot_rows(pcn, b, o, 0, 1, out, 0);
        slot_rows(pa, b, o, 0, 2, out, 1);
        slot_rows(pcar, b, o, ko, 1, out, 3);
        cell_fwd_rows<T, decltype(HX)::value, decltype(HC)::value>(in, out, fb, a.width(), count);
        if (decltype(HX)::value)  // carry i'_x, f'_x, g'_x for the memory stage
          for (int j = 0; j < 3; ++j)
            copy_rows(pcar.row(b, o, j), pcar.so, in.p[7 + j], in.s[7 + j], a.width(), count);
      });
    });
  });
  return {a.c_new, a.carry, a.act};
}

// in: grad c_new, i, f, c_prev, c_new;  out: grad of the i, f, g pre-activations, grad c_prev
template <typename T>
VPFAST_CPU_CLONES void cell_bwd_rows(const Block<const T, 5>& in, const Block<T, 4>& out, int64_t n, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const T *gcn = in.row(0, r), *ai = in.row(1, r), *af = in.row(2, r), *cp = in.row(3, r), *cn = in.row(4, r);
    T *gi = out.row(0, r), *gf = out.row(1, r), *gg = out.row(2, r), *gc = out.row(3, r);
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
    for_blocks(a, [&](int64_t b, int64_t o, int64_t count) {
      const int64_t n = a.width();
      Block<const T, 5> in;
      slot_rows(pgcn, b, o, 0, 1, in, 0);
      slot_rows(pa, b, o, 0, 2, in, 1);
      slot_rows(pc, b, o, 0, 1, in, 3);
      slot_rows(pcn, b, o, 0, 1, in, 4);
      Block<T, 4> out;
      slot_rows(pgh, b, o, 0, 3, out, 0);
      slot_rows(pgc, b, o, 0, 1, out, 3);
      cell_bwd_rows<T>(in, out, n, count);
      // the gradients every summand of a pre-activation shares: copies, row block by row block
      const auto copy = [&](const Rows<T>& dst, int dj, const Rows<T>& src, int sj) {
        copy_rows(dst.row(b, o, dj), dst.so, src.row(b, o, sj), src.so, n, count);
      };
      copy(pgh, 3, pgcar, ko);  // o_h's gradient is o_part's
      for (int j = 0; has_c && j < 3; ++j) copy(pgcg, j, pgh, j);
      if (has_x) {
        for (int j = 0; j < 3; ++j) copy(pgx, j, pgh, j);
        for (int j = 0; j < 3; ++j) copy(pgx, 3 + j, pgcar, j);
        copy(pgx, 6, pgcar, ko);
      }
    });
  });
  return {a.gx, a.gh, a.gcg, a.gc};
}

// ---- stage 2: memory -----------------------------------------------------------------------------------
// in: carry i' f' g' (CX) | carry o | m_g i' f' m̂ | c2m_g i' g' f' o;  out: m_new, o_part, i', f', t
template <typename T, bool CX>
VPFAST_CPU_CLONES void memory_fwd_rows(const Block<const T, 11>& in, const Block<T, 5>& out, T fb, int64_t n,
                                       int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const T *xi = in.row(0, r), *xf = in.row(1, r), *xg = in.row(2, r), *xo = in.row(3, r), *mi = in.row(4, r),
            *mf = in.row(5, r), *mh = in.row(6, r);
    const T *ki = in.row(7, r), *kg = in.row(8, r), *kf = in.row(9, r), *ko = in.row(10, r);
    T *mn = out.row(0, r), *op = out.row(1, r), *ai = out.row(2, r), *af = out.row(3, r), *at = out.row(4, r);
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
      for_blocks(a, [&](int64_t b, int64_t o, int64_t count) {
        Block<const T, 11> in;
        if (cx) slot_rows(pcar, b, o, 0, 3, in, 0);
        slot_rows(pcar, b, o, cx ? 3 : 0, 1, in, 3);
        slot_rows(pm, b, o, 0, 3, in, 4);
        slot_rows(pk, b, o, 0, 4, in, 7);
        Block<T, 5> out;
        slot_rows(pmn, b, o, 0, 1, out, 0);
        slot_rows(pop, b, o, 0, 1, out, 1);
        slot_rows(pa, b, o, 0, 3, out, 2);
        memory_fwd_rows<T, cx>(in, out, fb, a.width(), count);
      });
    };
    if (a.carry_x) run(std::true_type{});
    else run(std::false_type{});
  });
  return {a.m_new, a.o_part, a.act};
}

// in: grad m_new, i', f', t, m_new;  out: grad of the i', f', g' pre-activations and of m̂
template <typename T>
VPFAST_CPU_CLONES void memory_bwd_rows(const Block<const T, 5>& in, const Block<T, 4>& out, int64_t n,
                                       int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const T *gm = in.row(0, r), *ai = in.row(1, r), *af = in.row(2, r), *at = in.row(3, r), *mn = in.row(4, r);
    T *gi = out.row(0, r), *gf = out.row(1, r), *gg = out.row(2, r), *gh = out.row(3, r);
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
    for_blocks(a, [&](int64_t b, int64_t o, int64_t count) {
      const int64_t n = a.width();
      Block<const T, 5> in;
      slot_rows(pgm, b, o, 0, 1, in, 0);
      slot_rows(pa, b, o, 0, 3, in, 1);
      slot_rows(pmn, b, o, 0, 1, in, 4);
      Block<T, 4> out;  // grad i', f' (m_g's slots 0, 1), grad g' (c2m's slot 1), grad m̂ (m_g's slot 2)
      slot_rows(pgmg, b, o, 0, 2, out, 0);
      slot_rows(pgk, b, o, 1, 1, out, 2);
      slot_rows(pgmg, b, o, 2, 1, out, 3);
      memory_bwd_rows<T>(in, out, n, count);
      const auto copy = [&](const Rows<T>& dst, int dj, const Rows<T>& src, int sj) {
        copy_rows(dst.row(b, o, dj), dst.so, src.row(b, o, sj), src.so, n, count);
      };
      copy(pgk, 0, pgmg, 0);  // c2m order: i', g', f', o
      copy(pgk, 2, pgmg, 1);
      copy(pgk, 3, pgop, 0);
      if (carry_x) {
        copy(pgcar, 0, pgmg, 0);
        copy(pgcar, 1, pgmg, 1);
        copy(pgcar, 2, pgk, 1);
      }
      copy(pgcar, carry_x ? 3 : 0, pgop, 0);
    });
  });
  return {a.gcar, a.gmg, a.gc2m};
}

// ---- stage 3: output -----------------------------------------------------------------------------------
// forward: in o_part, o_m, last; out h, o, tl. backward: in grad_h, o, tl; out grad_pre, grad_last
template <typename T, bool FWD>
VPFAST_CPU_CLONES void output_rows(const Block<const T, 3>& in, const Block<T, 3>& out, int64_t n, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const T *x = in.row(0, r), *y = in.row(1, r), *z = in.row(2, r);
    T *o0 = out.row(0, r), *o1 = out.row(1, r), *o2 = out.row(2, r);
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      if constexpr (FWD) {
        T o_, tl_, h_;
        causal::output_forward<T>(x[p] + y[p], z[p], o_, tl_, h_);
        o0[p] = h_;
        o1[p] = o_;
        o2[p] = tl_;
      } else {
        T a, b;
        causal::output_backward<T>(x[p], y[p], z[p], a, b);
        o0[p] = a;
        o1[p] = b;
      }
    }
  }
}

// the output stage's forward (3 outputs) or backward (2)
template <bool FWD>
std::vector<at::Tensor> output_stage(const char* op, const at::Tensor& a_, const char* an, const at::Tensor& b_,
                                     const char* bn, const at::Tensor& c_, const char* cn) {
  const int outs = FWD ? 3 : 2;
  const auto a = causal::output_args(op, a_, an, b_, bn, c_, cn, outs, FWD, alloc);
  AT_DISPATCH_FLOATING_TYPES(a.a.scalar_type(), "causal_lstm_output_cpu", [&] {
    using T = scalar_t;
    const auto R = [&](const at::Tensor& t) { return causal::rows<T>(t, a.C, a.cl); };
    const Rows<T> pin[3] = {R(a.a), R(a.b), R(a.c)}, pout[3] = {R(a.out[0]), R(a.out[1]), R(a.out[2])};
    for_blocks(a, [&](int64_t b, int64_t o, int64_t count) {
      Block<const T, 3> in;
      Block<T, 3> out;
      for (int k = 0; k < 3; ++k) slot_rows(pin[k], b, o, 0, 1, in, k);
      for (int k = 0; k < outs; ++k) slot_rows(pout[k], b, o, 0, 1, out, k);
      output_rows<T, FWD>(in, out, a.width(), count);
    });
  });
  return {a.out[0], a.out[1], a.out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_lstm_output_forward_cpu(const at::Tensor& o_part,
                                                                              const at::Tensor& o_m,
                                                                              const at::Tensor& last) {
  const auto r = output_stage<true>("vpfast::causal_lstm_output_forward", o_part, "o_part", o_m, "o_m", last, "last");
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> causal_lstm_output_backward_cpu(const at::Tensor& grad_h, const at::Tensor& o,
                                                                   const at::Tensor& tl) {
  const auto r = output_stage<false>("vpfast::causal_lstm_output_backward", grad_h, "grad_h", o, "o", tl, "tl");
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
