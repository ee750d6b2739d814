// Fused ST-LSTM pointwise stages, CPU. One task per (b, channel) plane row of H*W elements; the inner loop
// reads every operand's plane in place (strided batch/channel axes, contiguous H*W) and is vectorised with
// the csrc/common/math.h functions. Arithmetic: common/stlstm.h (shared with CUDA).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstring>
#include <optional>

#include "cpu/denormals.h"
#include "common/stlstm.h"
#include "common/lstm_planes.h"
#include "cpu/lstm_cpu.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

using lstm::Planes;
using lstm::planar;
using lstm::planes;
using lstm::planes_opt;

// ---- stage 1 --------------------------------------------------------------------------------------------
// in: h_g i f g o | m_g i' f' g' | x_g i f g i' f' g' o (HAS_X) | c_prev m_prev
// out: c_new m_new o_part | act i f i' f' | delta_c delta_m (DELTA)
template <typename T, bool HAS_X, bool DELTA>
VPFAST_CPU_CLONES void gates_fwd_row(const T* const* in, T* const* out, T fb, int64_t n) {
  const T *hi = in[0], *hf = in[1], *hg = in[2], *ho = in[3], *mi = in[4], *mf = in[5], *mg = in[6];
  const T *xi = in[7], *xf = in[8], *xg = in[9], *xi2 = in[10], *xf2 = in[11], *xg2 = in[12], *xo = in[13];
  const T *cp = in[14], *mp = in[15];
  T *cn = out[0], *mn = out[1], *op = out[2], *ai = out[3], *af = out[4], *ai2 = out[5], *af2 = out[6],
    *dc = out[7], *dm = out[8];
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T pi = hi[p], pf = hf[p], pg = hg[p], po = ho[p], qi = mi[p], qf = mf[p], qg = mg[p];
    if constexpr (HAS_X) {
      pi = xi[p] + pi;
      pf = xf[p] + pf;
      pg = xg[p] + pg;
      po = xo[p] + po;
      qi = xi2[p] + qi;
      qf = xf2[p] + qf;
      qg = xg2[p] + qg;
    }
    T i, f, g, c, i2, f2, g2, m2;
    lstm::cell_forward<T>(pi, pf, pg, cp[p], fb, i, f, g, c);
    lstm::cell_forward<T>(qi, qf, qg, mp[p], fb, i2, f2, g2, m2);
    cn[p] = c;
    mn[p] = m2;
    op[p] = po;
    ai[p] = i;
    af[p] = f;
    ai2[p] = i2;
    af2[p] = f2;
    if constexpr (DELTA) {
      dc[p] = i * g;
      dm[p] = i2 * g2;
    }
  }
}

// in: grad c_new, grad m_new, grad o_part | grad delta_c, delta_m (DELTA) | act i f i' f' | c_prev m_prev |
//     c_new m_new
// out: grad h_g (4) | grad m_g (3) | grad c_prev, grad m_prev | grad x_g (7, HAS_X)
template <typename T, bool HAS_X, bool DELTA>
VPFAST_CPU_CLONES void gates_bwd_row(const T* const* in, T* const* out, int64_t n) {
  const T *gcn = in[0], *gmn = in[1], *gop = in[2], *gdc = in[3], *gdm = in[4];
  const T *ai = in[5], *af = in[6], *ai2 = in[7], *af2 = in[8], *cp = in[9], *mp = in[10], *cn = in[11],
          *mn = in[12];
  T *hi = out[0], *hf = out[1], *hg = out[2], *ho = out[3], *mi = out[4], *mf = out[5], *mg = out[6],
    *gc = out[7], *gm = out[8];
  T *xi = out[9], *xf = out[10], *xg = out[11], *xi2 = out[12], *xf2 = out[13], *xg2 = out[14], *xo = out[15];
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T d_c = T(0), d_m = T(0);
    if constexpr (DELTA) {
      d_c = gdc[p];
      d_m = gdm[p];
    }
    T pi, pf, pg, qi, qf, qg, c_, m_;
    lstm::stlstm_cell_backward<T>(ai[p], af[p], cp[p], cn[p], gcn[p], d_c, pi, pf, pg, c_);
    lstm::stlstm_cell_backward<T>(ai2[p], af2[p], mp[p], mn[p], gmn[p], d_m, qi, qf, qg, m_);
    const T po = gop[p];
    hi[p] = pi;
    hf[p] = pf;
    hg[p] = pg;
    ho[p] = po;
    mi[p] = qi;
    mf[p] = qf;
    mg[p] = qg;
    gc[p] = c_;
    gm[p] = m_;
  }
  if constexpr (HAS_X) {
    // x_g's gradient equals the h_g / m_g gradients slot by slot. Copied in a second pass over the row (still
    // in L1): writing 16 output streams in one loop ran 14x slower here than 9 streams + these copies.
    const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
    std::memcpy(xi, hi, bytes);
    std::memcpy(xf, hf, bytes);
    std::memcpy(xg, hg, bytes);
    std::memcpy(xi2, mi, bytes);
    std::memcpy(xf2, mf, bytes);
    std::memcpy(xg2, mg, bytes);
    std::memcpy(xo, ho, bytes);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stlstm_gates_forward_cpu(
    const std::optional<at::Tensor>& x_g_, const at::Tensor& h_g_, const at::Tensor& m_g_, const at::Tensor& c_,
    const at::Tensor& m_, double forget_bias, bool with_delta) {
  const auto a = lstm::stlstm_gates_forward_args(x_g_, h_g_, m_g_, c_, m_, with_delta, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "stlstm_gates_forward_cpu", [&] {
    using T = scalar_t;
    const auto ph = planes<T>(a.h_g), pm = planes<T>(a.m_g), pc = planes<T>(a.c), pmm = planes<T>(a.m);
    const auto px = planes_opt<T>(a.has_x, a.x_g);
    const auto pcm = planes<T>(a.cm), pop = planes<T>(a.o_part), pa = planes<T>(a.act);
    const auto pd = planes_opt<T>(with_delta, a.delta);
    const T fb = static_cast<T>(forget_bias);
    cpu::with_flags(a.has_x, with_delta, [&](auto HX, auto DL) {
      cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / a.C, ch = r % a.C;
          const T* in[16];
          for (int j = 0; j < 4; ++j) in[j] = ph.at(b, j * a.C + ch);
          for (int j = 0; j < 3; ++j) in[4 + j] = pm.at(b, j * a.C + ch);
          for (int j = 0; j < 7; ++j) in[7 + j] = decltype(HX)::value ? px.at(b, j * a.C + ch) : nullptr;
          in[14] = pc.at(b, ch);
          in[15] = pmm.at(b, ch);
          T* out[9];
          out[0] = pcm.at(b, ch);
          out[1] = pcm.at(b, a.C + ch);
          out[2] = pop.at(b, ch);
          for (int j = 0; j < 4; ++j) out[3 + j] = pa.at(b, j * a.C + ch);
          out[7] = decltype(DL)::value ? pd.at(b, ch) : nullptr;
          out[8] = decltype(DL)::value ? pd.at(b, a.C + ch) : nullptr;
          gates_fwd_row<T, decltype(HX)::value, decltype(DL)::value>(in, out, fb, a.HW);
        }
      });
    });
  });
  return {a.cm, a.o_part, a.act, a.delta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stlstm_gates_backward_cpu(
    const at::Tensor& grad_cm_, const at::Tensor& grad_op_, const std::optional<at::Tensor>& grad_delta_,
    const at::Tensor& act_, const at::Tensor& cm_, const at::Tensor& c_, const at::Tensor& m_, bool has_x) {
  const auto a =
      lstm::stlstm_gates_backward_args(grad_cm_, grad_op_, grad_delta_, act_, cm_, c_, m_, has_x, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "stlstm_gates_backward_cpu", [&] {
    using T = scalar_t;
    const auto pgcm = planes<T>(a.gcm), pgop = planes<T>(a.gop), pa = planes<T>(a.act), pcm = planes<T>(a.cm),
               pc = planes<T>(a.c), pm = planes<T>(a.m);
    const auto pgd = planes_opt<T>(a.with_delta, a.gd);
    const auto pgx = planes_opt<T>(has_x, a.gx);
    const auto pgh = planes<T>(a.gh), pgm = planes<T>(a.gm), pgc = planes<T>(a.gc), pgmm = planes<T>(a.gmp);
    cpu::with_flags(has_x, a.with_delta, [&](auto HX, auto DL) {
      cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / a.C, ch = r % a.C;
          const T* in[13];
          in[0] = pgcm.at(b, ch);
          in[1] = pgcm.at(b, a.C + ch);
          in[2] = pgop.at(b, ch);
          in[3] = decltype(DL)::value ? pgd.at(b, ch) : nullptr;
          in[4] = decltype(DL)::value ? pgd.at(b, a.C + ch) : nullptr;
          for (int j = 0; j < 4; ++j) in[5 + j] = pa.at(b, j * a.C + ch);
          in[9] = pc.at(b, ch);
          in[10] = pm.at(b, ch);
          in[11] = pcm.at(b, ch);
          in[12] = pcm.at(b, a.C + ch);
          T* out[16];
          for (int j = 0; j < 4; ++j) out[j] = pgh.at(b, j * a.C + ch);
          for (int j = 0; j < 3; ++j) out[4 + j] = pgm.at(b, j * a.C + ch);
          out[7] = pgc.at(b, ch);
          out[8] = pgmm.at(b, ch);
          for (int j = 0; j < 7; ++j) out[9 + j] = decltype(HX)::value ? pgx.at(b, j * a.C + ch) : nullptr;
          gates_bwd_row<T, decltype(HX)::value, decltype(DL)::value>(in, out, a.HW);
        }
      });
    });
  });
  return {a.gx, a.gh, a.gm, a.gc, a.gmp};
}

// ---- stage 2 --------------------------------------------------------------------------------------------
template <typename T, bool HW_>
VPFAST_CPU_CLONES void output_fwd_row(const T* __restrict__ opart, const T* __restrict__ om,
                                      const T* __restrict__ last, const T* __restrict__ hw, T* __restrict__ h,
                                      T* __restrict__ o, T* __restrict__ tl, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T o_, tl_, h_;
    lstm::output_forward<T>(opart[p] + om[p], last[p], HW_ ? hw[p] : T(0), o_, tl_, h_);
    h[p] = h_;
    o[p] = o_;
    if constexpr (HW_) tl[p] = tl_;
  }
}

template <typename T, bool HW_>
VPFAST_CPU_CLONES void output_bwd_row(const T* __restrict__ gh, const T* __restrict__ o,
                                      const T* __restrict__ h_or_tl, const T* __restrict__ hw, T* __restrict__ gpre,
                                      T* __restrict__ glast, T* __restrict__ ghw, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const T o_ = o[p];
    const T tl = HW_ ? h_or_tl[p] : lstm::tl_from_h<T>(h_or_tl[p], o_);
    T a, b, c;
    lstm::output_backward<T>(gh[p], o_, tl, HW_ ? hw[p] : T(0), a, b, c);
    gpre[p] = a;
    glast[p] = b;
    if constexpr (HW_) ghw[p] = c;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_forward_cpu(const at::Tensor& o_part_,
                                                                         const at::Tensor& o_m_,
                                                                         const at::Tensor& last_,
                                                                         const std::optional<at::Tensor>& hw_) {
  const auto a = lstm::stlstm_output_forward_args(o_part_, o_m_, last_, hw_, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.op.scalar_type(), "stlstm_output_forward_cpu", [&] {
    using T = scalar_t;
    const auto pop = planes<T>(a.op), pom = planes<T>(a.om), pl = planes<T>(a.last), ph = planes<T>(a.h),
               po = planes<T>(a.o);
    const auto phw = planes_opt<T>(a.has_hw, a.hw);
    const auto ptl = planes_opt<T>(a.has_hw, a.tl);
    cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / a.C, ch = r % a.C;
        if (a.has_hw)
          output_fwd_row<T, true>(pop.at(b, ch), pom.at(b, ch), pl.at(b, ch), phw.at(b, ch), ph.at(b, ch),
                                  po.at(b, ch), ptl.at(b, ch), a.HW);
        else
          output_fwd_row<T, false>(pop.at(b, ch), pom.at(b, ch), pl.at(b, ch), nullptr, ph.at(b, ch),
                                   po.at(b, ch), nullptr, a.HW);
      }
    });
  });
  return {a.h, a.o, a.tl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stlstm_output_backward_cpu(const at::Tensor& gh_,
                                                                          const at::Tensor& o_,
                                                                          const at::Tensor& h_or_tl_,
                                                                          const std::optional<at::Tensor>& hw_) {
  const auto a = lstm::stlstm_output_backward_args(gh_, o_, h_or_tl_, hw_, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.o.scalar_type(), "stlstm_output_backward_cpu", [&] {
    using T = scalar_t;
    const auto pgh = planes<T>(a.gh), po = planes<T>(a.o), pht = planes<T>(a.ht), pgp = planes<T>(a.gpre),
               pgl = planes<T>(a.glast);
    const auto phw = planes_opt<T>(a.has_hw, a.hw);
    const auto pghw = planes_opt<T>(a.has_hw, a.ghw);
    cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / a.C, ch = r % a.C;
        if (a.has_hw)
          output_bwd_row<T, true>(pgh.at(b, ch), po.at(b, ch), pht.at(b, ch), phw.at(b, ch), pgp.at(b, ch),
                                  pgl.at(b, ch), pghw.at(b, ch), a.HW);
        else
          output_bwd_row<T, false>(pgh.at(b, ch), po.at(b, ch), pht.at(b, ch), nullptr, pgp.at(b, ch),
                                   pgl.at(b, ch), nullptr, a.HW);
      }
    });
  });
  return {a.gpre, a.glast, a.ghw};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("stlstm_gates_forward", &vpfast::stlstm_gates_forward_cpu);
  m.impl("stlstm_gates_backward", &vpfast::stlstm_gates_backward_cpu);
  m.impl("stlstm_output_forward", &vpfast::stlstm_output_forward_cpu);
  m.impl("stlstm_output_backward", &vpfast::stlstm_output_backward_cpu);
}
