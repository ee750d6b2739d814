// Fused ConvLSTM pointwise step, CPU. One task per (b, channel) plane row of H*W elements, operands read in
// place (strided batch/channel axes, contiguous H*W), vectorised inner loops. Arithmetic: common/stlstm.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

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

// in: h_g i f g o | x_g i f g o (HAS_X) | c_prev;  out: h, c_new | act i f o
template <typename T, bool HAS_X, bool TANH_C>
VPFAST_CPU_CLONES void fwd_row(const T* const* in, T* const* out, T fb, int64_t n) {
  const T *hi = in[0], *hf = in[1], *hg = in[2], *ho = in[3], *xi = in[4], *xf = in[5], *xg = in[6],
          *xo = in[7], *cp = in[8];
  T *h = out[0], *cn = out[1], *ai = out[2], *af = out[3], *ao = out[4];
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T pi = hi[p], pf = hf[p], pg = hg[p], po = ho[p];
    if constexpr (HAS_X) {
      pi = xi[p] + pi;
      pf = xf[p] + pf;
      pg = xg[p] + pg;
      po = xo[p] + po;
    }
    T i, f, g, c;
    lstm::cell_forward<T>(pi, pf, pg, cp[p], fb, i, f, g, c);
    const T o = fast_sigmoid<T>(po);
    h[p] = o * (TANH_C ? fast_tanh<T>(c) : g);
    cn[p] = c;
    ai[p] = i;
    af[p] = f;
    ao[p] = o;
  }
}

// in: grad h, grad c_new (either may be null) | act i f o | c_prev, c_new, h;  out: grad h_g (4) | grad c_prev
// | grad x_g (4, HAS_X)
template <typename T, bool HAS_X, bool TANH_C>
VPFAST_CPU_CLONES void bwd_row(const T* const* in, T* const* out, int64_t n) {
  const T *gh = in[0], *gc = in[1], *ai = in[2], *af = in[3], *ao = in[4], *cp = in[5], *cn = in[6], *hv = in[7];
  T *hi = out[0], *hf = out[1], *hg = out[2], *ho = out[3], *gcp = out[4], *xi = out[5], *xf = out[6],
    *xg = out[7], *xo = out[8];
  const bool has_gh = gh != nullptr, has_gc = gc != nullptr;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    T pi, pf, pg, po, c_;
    lstm::convlstm_backward<T>(ai[p], af[p], ao[p], cp[p], cn[p], hv[p], has_gh ? gh[p] : T(0),
                               has_gc ? gc[p] : T(0), TANH_C, pi, pf, pg, po, c_);
    hi[p] = pi;
    hf[p] = pf;
    hg[p] = pg;
    ho[p] = po;
    gcp[p] = c_;
    if constexpr (HAS_X) {
      xi[p] = pi;
      xf[p] = pf;
      xg[p] = pg;
      xo[p] = po;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convlstm_forward_cpu(const std::optional<at::Tensor>& x_g_,
                                                                    const at::Tensor& h_g_, const at::Tensor& c_,
                                                                    double forget_bias, bool tanh_c) {
  const auto a = lstm::convlstm_forward_args(x_g_, h_g_, c_, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "convlstm_forward_cpu", [&] {
    using T = scalar_t;
    const auto ph = planes<T>(a.h_g), pc = planes<T>(a.c), poh = planes<T>(a.h), pcn = planes<T>(a.cn),
               pa = planes<T>(a.act);
    const auto px = planes_opt<T>(a.has_x, a.x_g);
    const T fb = static_cast<T>(forget_bias);
    cpu::with_flags(a.has_x, tanh_c, [&](auto HX, auto TC) {
      cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t s, int64_t e) {
        for (int64_t r = s; r < e; ++r) {
          const int64_t b = r / a.C, ch = r % a.C;
          const T* in[9];
          for (int j = 0; j < 4; ++j) in[j] = ph.at(b, j * a.C + ch);
          for (int j = 0; j < 4; ++j) in[4 + j] = decltype(HX)::value ? px.at(b, j * a.C + ch) : nullptr;
          in[8] = pc.at(b, ch);
          T* out[5] = {poh.at(b, ch), pcn.at(b, ch), pa.at(b, ch), pa.at(b, a.C + ch), pa.at(b, 2 * a.C + ch)};
          fwd_row<T, decltype(HX)::value, decltype(TC)::value>(in, out, fb, a.HW);
        }
      });
    });
  });
  return {a.h, a.cn, a.act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convlstm_backward_cpu(const std::optional<at::Tensor>& gh_,
                                                                     const std::optional<at::Tensor>& gc_,
                                                                     const at::Tensor& act_, const at::Tensor& c_,
                                                                     const at::Tensor& cn_, const at::Tensor& h_,
                                                                     bool has_x, bool tanh_c) {
  const auto a = lstm::convlstm_backward_args(gh_, gc_, act_, c_, cn_, h_, has_x, cpu::lstm_alloc);
  AT_DISPATCH_FLOATING_TYPES(a.c.scalar_type(), "convlstm_backward_cpu", [&] {
    using T = scalar_t;
    const auto pa = planes<T>(a.act), pc = planes<T>(a.c), pcn = planes<T>(a.cn), pho = planes<T>(a.ho),
               pghg = planes<T>(a.ghg), pgcp = planes<T>(a.gcp);
    const auto pgh = planes_opt<T>(a.has_gh, a.gh);
    const auto pgc = planes_opt<T>(a.has_gc, a.gc);
    const auto pgx = planes_opt<T>(has_x, a.gx);
    cpu::with_flags(has_x, tanh_c, [&](auto HX, auto TC) {
      cpu::parallel_for(0, a.B * a.C, cpu::lstm_grain(a.HW), [&](int64_t s, int64_t e) {
        for (int64_t r = s; r < e; ++r) {
          const int64_t b = r / a.C, ch = r % a.C;
          const T* in[8] = {a.has_gh ? pgh.at(b, ch) : nullptr, a.has_gc ? pgc.at(b, ch) : nullptr, pa.at(b, ch),
                            pa.at(b, a.C + ch), pa.at(b, 2 * a.C + ch), pc.at(b, ch), pcn.at(b, ch), pho.at(b, ch)};
          T* out[9];
          for (int j = 0; j < 4; ++j) out[j] = pghg.at(b, j * a.C + ch);
          out[4] = pgcp.at(b, ch);
          for (int j = 0; j < 4; ++j) out[5 + j] = decltype(HX)::value ? pgx.at(b, j * a.C + ch) : nullptr;
          bwd_row<T, decltype(HX)::value, decltype(TC)::value>(in, out, a.HW);
        }
      });
    });
  });
  return {a.gx, a.ghg, a.gcp};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("convlstm_forward", &vpfast::convlstm_forward_cpu);
  m.impl("convlstm_backward", &vpfast::convlstm_backward_cpu);
}
