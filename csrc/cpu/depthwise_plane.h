// CPU building blocks of depthwise convolution on one (sample, channel) plane, shared by
// cpu/depthwise_conv2d.cpp and cpu/large_kernel_attention.cpp.
//
// Every plane is first copied into a zero-padded scratch buffer that stays in the core's L1/L2 cache, so the
// inner loops never test bounds. The hot loops work on whole 64-byte vectors along W (GCC vector extensions;
// the VPFAST_CPU_CLONES functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time) and keep a block of R output rows in registers: each weight is broadcast once per block and feeds R
// fused multiply-adds whose input rows stream from the cache.
//
// Horizontal stride s is handled by storing a padded row de-interleaved into s phases (column c at
// (c % s) * PL + c / s), which makes every tap a contiguous read again.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/depthwise_conv2d.h"
#include "common/macros.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vector types in always-inline helpers only

namespace vpfast {
namespace dwcpu {

template <typename T>
struct Vec {
  static constexpr int N = 64 / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
VPFAST_HD vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
VPFAST_HD void storeu(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
VPFAST_HD vec_t<T> splat(T s) {  // fine outside hot loops (see splat_table)
  return s - vec_t<T>{};
}
// horizontal sum as a fixed tree of half-vector adds (deterministic, and short: the weight gradient does one
// per tap and plane)
template <typename T>
VPFAST_HD T hsum(const vec_t<T>& v) {
  typedef T h8 __attribute__((vector_size(32)));
  typedef T h4 __attribute__((vector_size(16)));
  h8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a += b;
  h4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c += d;
  T s = c[0];
  for (int k = 1; k < (int)(16 / sizeof(T)); ++k) s += c[k];
  return s;
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

constexpr int kMaxTaps = 128;  // per axis; checked by the ops

// Geometry of one padded scratch plane and the filter that reads it.
struct Geo {
  int kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t ld = 0, rows = 0, PL = 0;  // row stride, rows, phase length (ld = sw * PL)
  int64_t rlo = 0, rhi = 0;          // rows [rlo, rhi) hold data; the rest is zero padding
  int64_t clo = 0, chi = 0;          // columns (before de-interleaving) likewise
  int64_t coff[kMaxTaps];            // tap j: offset of its first read in a de-interleaved row
  int64_t size() const { return ld * rows; }
};

constexpr int kRows = 8;  // output rows per register block

// A scratch plane for a filter kh x kw (stride, dilation) producing Ho x Wo outputs from a map whose data
// sits at padded rows [top, top+Hd) and columns [left, left+Wd).
inline Geo make_geo(int kh, int kw, int sh, int sw, int dh, int dw, int64_t Ho, int64_t Wo, int64_t top,
                    int64_t left, int64_t Hd, int64_t Wd, int vec_n) {
  Geo g;
  g.kh = kh; g.kw = kw; g.sh = sh; g.sw = sw; g.dh = dh; g.dw = dw;
  const int64_t Wr = round_up(Wo, vec_n);
  g.PL = round_up(std::max<int64_t>((left + Wd + sw - 1) / sw, Wr + (int64_t)(kw - 1) * dw / sw + 1), vec_n);
  g.ld = g.PL * sw;
  g.rows = std::max<int64_t>(top + Hd, (round_up(Ho, kRows) - 1) * sh + (int64_t)(kh - 1) * dh + 1) + kRows;
  g.rlo = top; g.rhi = top + Hd;
  g.clo = left; g.chi = left + Wd;
  for (int j = 0; j < kMaxTaps; ++j) {
    const int64_t c = (int64_t)std::min(j, kw - 1) * dw;
    g.coff[j] = (c % sw) * g.PL + c / sw;
  }
  return g;
}

// Copy an Hd x Wd plane (row stride ldx) into the data region of a scratch plane (whose padding is zero).
template <typename T>
void fill_plane(const Geo& g, const T* x, int64_t ldx, T* buf) {
  const int64_t Hd = g.rhi - g.rlo, Wd = g.chi - g.clo;
  if (g.sw == 1) {
    for (int64_t h = 0; h < Hd; ++h) std::memcpy(buf + (g.rlo + h) * g.ld + g.clo, x + h * ldx, Wd * sizeof(T));
    return;
  }
  for (int64_t h = 0; h < Hd; ++h) {
    T* row = buf + (g.rlo + h) * g.ld;
    const T* src = x + h * ldx;
    for (int64_t w = 0; w < Wd; ++w) {
      const int64_t c = g.clo + w;
      row[(c % g.sw) * g.PL + c / g.sw] = src[w];
    }
  }
}

// Each tap of each channel as a whole vector of copies ([C, K, V]), optionally with the taps flipped.
// The hot loop loads these instead of broadcasting: GCC 12 expands a broadcast inside a target_clones
// function into 16 masked inserts (with -mavx512f on the command line it is one vbroadcastss).
template <typename T>
std::vector<T> splat_table(const T* w, int64_t C, int kh, int kw, bool flip) {
  constexpr int V = Vec<T>::N;
  const int64_t K = (int64_t)kh * kw;
  std::vector<T> tab(C * K * V);
  for (int64_t c = 0; c < C; ++c)
    for (int i = 0; i < kh; ++i)
      for (int j = 0; j < kw; ++j) {
        const T v = flip ? w[c * K + (kh - 1 - i) * kw + (kw - 1 - j)] : w[c * K + i * kw + j];
        T* dst = &tab[((c * K) + i * kw + j) * V];
        for (int e = 0; e < V; ++e) dst[e] = v;
      }
  return tab;
}

// out[oh*ldo + ow] = init + sum_{i,j} w[i*kw + j] * plane(oh*sh + i*dh, ow*sw + j*dw), oh < Ho, ow < Wo,
// with the taps given as a splat table wtab [K, V]. Taps that would only read padding for a whole block
// are skipped.
template <typename T>
VPFAST_CPU_CLONES void correlate_plane(const T* __restrict__ in, const Geo& g, const T* __restrict__ wtab, T init,
                                       T* __restrict__ out, int64_t ldo, int64_t Ho, int64_t Wo) {
  constexpr int V = Vec<T>::N, R = kRows;
  using vec = vec_t<T>;
  const int64_t rstep = (int64_t)g.sh * g.ld;
  for (int64_t oh0 = 0; oh0 < Ho; oh0 += R) {
    const int64_t nr = std::min<int64_t>(R, Ho - oh0);
    int i0, i1;
    dw::tap_range(oh0 * g.sh, (oh0 + nr - 1) * g.sh, g.dh, g.kh, g.rlo, g.rhi, i0, i1);
    for (int64_t ow0 = 0; ow0 < Wo; ow0 += V) {
      const int64_t nc = std::min<int64_t>(V, Wo - ow0);
      int j0, j1;
      dw::tap_range(ow0 * g.sw, (ow0 + nc - 1) * g.sw, g.dw, g.kw, g.clo, g.chi, j0, j1);
      vec acc[R];
      for (int r = 0; r < R; ++r) acc[r] = splat<T>(init);
      if (g.sh == 1 && g.dh == 1 && i1 - i0 >= R) {
        // stride 1, no vertical dilation, tall filter: output row r reads input row t = r + i, so one load of
        // input row t feeds every output row of the block (R FMAs, weights from the aligned table) instead
        // of one; the first and last R-1 rows feed fewer (compile-time unrolled edges)
        const int kh = i1 - i0;
        const int64_t wrow = (int64_t)g.kw * V;
        for (int j = j0; j < j1; ++j) {
          const T* base = in + (oh0 + i0) * g.ld + ow0 + g.coff[j];
          const T* wj = wtab + (int64_t)i0 * wrow + (int64_t)j * V;
#pragma GCC unroll 16
          for (int t = 0; t < R - 1; ++t) {
            const vec x = loadu<T>(base + t * g.ld);
#pragma GCC unroll 16
            for (int r = 0; r <= t; ++r) acc[r] += x * loadu<T>(wj + (t - r) * wrow);
          }
          for (int t = R - 1; t < kh; ++t) {
            const vec x = loadu<T>(base + t * g.ld);
            const T* wt = wj + (int64_t)t * wrow;
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r] += x * loadu<T>(wt - r * wrow);
          }
          const T* bt = base + (int64_t)kh * g.ld;
          const T* wt = wj + (int64_t)kh * wrow;
#pragma GCC unroll 16
          for (int t = 0; t < R - 1; ++t) {
            const vec x = loadu<T>(bt + t * g.ld);
#pragma GCC unroll 16
            for (int r = t + 1; r < R; ++r) acc[r] += x * loadu<T>(wt + (t - r) * wrow);
          }
        }
      } else {
        for (int i = i0; i < i1; ++i) {
          const T* rp = in + (oh0 * g.sh + (int64_t)i * g.dh) * g.ld + ow0;
          const T* wr = wtab + (int64_t)i * g.kw * V;
          for (int j = j0; j < j1; ++j) {
            const vec wv = loadu<T>(wr + j * V);
            const T* p = rp + g.coff[j];
            for (int r = 0; r < R; ++r) acc[r] += wv * loadu<T>(p + r * rstep);
          }
        }
      }
      if (nc == V) {
        for (int r = 0; r < nr; ++r) storeu<T>(out + (oh0 + r) * ldo + ow0, acc[r]);
      } else {
        for (int r = 0; r < nr; ++r) {
          T tmp[V];
          storeu<T>(tmp, acc[r]);
          std::memcpy(out + (oh0 + r) * ldo + ow0, tmp, nc * sizeof(T));
        }
      }
    }
  }
}

constexpr int kTapsPerPass = 6;  // weight-gradient taps accumulated per sweep over the plane

// dw[i*kw + j] = sum_{oh < Ho, ow < Wo} gr[oh*ldg + ow] * plane(oh*sh + i*dh, ow*sw + j*dw).
// gr must read zero in columns [Wo, round_up(Wo, V)) of each row (true for the padded scratch planes).
constexpr int kTapRows = 8;  // weight-gradient tap rows per sweep in the stride-1 path

// dw[i*kw + j] = sum_{oh < Ho, ow < Wo} gr[oh*ldg + ow] * plane(oh*sh + i*dh, ow*sw + j*dw).
// gr must read zero in columns [Wo, round_up(Wo, V)) of each row. If gpad is given (stride 1, dilation 1,
// Ho >= 32), it must point at row 0 of a copy of gr with kTapRows - 1 zero rows above and below: then one
// load of an input row feeds kTapRows tap rows at once.
template <typename T>
VPFAST_CPU_CLONES void weight_grad_plane(const T* __restrict__ in, const Geo& g, const T* __restrict__ gr,
                                         int64_t ldg, int64_t Ho, int64_t Wo, T* __restrict__ dw,
                                         const T* __restrict__ gpad = nullptr) {
  constexpr int V = Vec<T>::N, J = kTapsPerPass, I = kTapRows;
  using vec = vec_t<T>;
  const int64_t Wr = round_up(Wo, V);
  if (gpad != nullptr) {
    // input row r pairs with output row r - i for tap row i; gpad is zero outside [0, Ho)
    for (int i0 = 0; i0 < g.kh; i0 += I) {
      const int ni = std::min(I, g.kh - i0);
      const int64_t r_lo = std::max<int64_t>(i0, g.rlo), r_hi = std::min<int64_t>(i0 + ni - 1 + Ho, g.rhi);
      for (int j = 0; j < g.kw; ++j) {
        vec acc[I];
        for (int t = 0; t < I; ++t) acc[t] = splat<T>(T(0));
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const T* xr = in + r * g.ld + g.coff[j];
          const T* gp = gpad + (r - i0) * ldg;
          for (int64_t ow0 = 0; ow0 < Wr; ow0 += V) {
            const vec x = loadu<T>(xr + ow0);
#pragma GCC unroll 16
            for (int t = 0; t < I; ++t) acc[t] += x * loadu<T>(gp - t * ldg + ow0);
          }
        }
        for (int t = 0; t < ni; ++t) dw[(i0 + t) * g.kw + j] = hsum<T>(acc[t]);
      }
    }
    return;
  }
  for (int i = 0; i < g.kh; ++i) {
    // rows whose input is real for this tap row; the others read padding and contribute zero
    int64_t oh_lo = 0, oh_hi = Ho;
    while (oh_lo < Ho && oh_lo * g.sh + (int64_t)i * g.dh < g.rlo) ++oh_lo;
    while (oh_hi > oh_lo && (oh_hi - 1) * g.sh + (int64_t)i * g.dh >= g.rhi) --oh_hi;
    for (int j0 = 0; j0 < g.kw; j0 += J) {
      const int nj = std::min(J, g.kw - j0);
      vec acc[J];
      for (int t = 0; t < J; ++t) acc[t] = splat<T>(T(0));
      for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
        const T* rp = in + (oh * g.sh + (int64_t)i * g.dh) * g.ld;
        const T* gp = gr + oh * ldg;
        for (int64_t ow0 = 0; ow0 < Wr; ow0 += V) {
          const vec gv = loadu<T>(gp + ow0);
          for (int t = 0; t < J; ++t) acc[t] += gv * loadu<T>(rp + g.coff[j0 + t] + ow0);
        }
      }
      for (int t = 0; t < nj; ++t) dw[i * g.kw + j0 + t] = hsum<T>(acc[t]);
    }
  }
}

// Whether weight_grad_plane's tap-row reuse path applies, and the padded gradient copy it needs.
inline bool wgrad_reuse(const Geo& g, int64_t Ho) { return g.sh == 1 && g.dh == 1 && Ho >= 32 && g.kh >= 4; }

template <typename T>
void fill_gpad(const T* gr, int64_t ldsrc, int64_t Ho, int64_t Wo, int64_t ldg, T* gpad_base) {
  // gpad_base: (Ho + 2*(kTapRows-1)) x ldg, zero outside the copied rows/columns
  for (int64_t oh = 0; oh < Ho; ++oh)
    std::memcpy(gpad_base + (oh + kTapRows - 1) * ldg, gr + oh * ldsrc, Wo * sizeof(T));
}

// sum of an Ho x Wo plane (row stride ldg), in a fixed order
template <typename T>
VPFAST_CPU_CLONES T plane_sum(const T* __restrict__ gr, int64_t ldg, int64_t Ho, int64_t Wo) {
  constexpr int V = Vec<T>::N;
  using vec = vec_t<T>;
  vec acc = splat<T>(T(0));
  T tail = 0;
  const int64_t Wv = Wo / V * V;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const T* gp = gr + oh * ldg;
    for (int64_t ow0 = 0; ow0 < Wv; ow0 += V) acc += loadu<T>(gp + ow0);
    for (int64_t ow = Wv; ow < Wo; ++ow) tail += gp[ow];
  }
  return hsum<T>(acc) + tail;
}

// Ordered reduction of per-plane partials [B, C, K] into [C, K]: out[c, k] = sum_b part[b, c, k], b = 0..B-1.
template <typename T>
void reduce_batch(const T* part, int64_t B, int64_t C, int64_t K, T* out) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* o = out + c * K;
      for (int64_t k = 0; k < K; ++k) o[k] = 0;
      for (int64_t b = 0; b < B; ++b) {
        const T* p = part + (b * C + c) * K;
        for (int64_t k = 0; k < K; ++k) o[k] += p[k];
      }
    }
  });
}

}  // namespace dwcpu
}  // namespace vpfast
