// CPU building blocks of depthwise convolution on one (sample, channel) plane, shared by
// cpu/depthwise_conv2d.cpp and cpu/large_kernel_attention.cpp.
//
// Every plane is first copied into a zero-padded scratch buffer that stays in the core's L1/L2 cache, so the
// inner loops never test bounds. The hot loops work on whole 64-byte vectors along W (GCC vector extensions;
// the VPFAST_CPU_CLONES functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time) and keep a block of R output rows in registers: each weight is broadcast once per block and feeds R
// fused multiply-adds whose input rows stream from the cache. On AVX-512 machines, filters of 3, 5 or 7 tap
// rows take the row kernels (each shifted input row loaded once and used by every output row it reaches),
// every path broadcasts scalar taps, and the weight gradient keeps vector partial sums per channel
// (WeightGrad); VPFAST_CPU_PORTABLE=1 switches those paths off.
//
// Horizontal stride s is handled by storing a padded row de-interleaved into s phases (column c at
// (c % s) * PL + c / s), which makes every tap a contiguous read again.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/denormals.h"
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
// (written as vector + scalar: GCC 12 turns that into one broadcast, but expands `s - vec{}` or a braced list
// inside a target-attributed function into 16 masked inserts; -0 becomes +0, which no caller minds)
template <typename T>
VPFAST_HD vec_t<T> splat(T s) {
  return vec_t<T>{} + s;
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

// Copy n elements. Rows of small planes are a few vectors long, where a memcpy call costs more than the
// copy: whole vectors, the last one overlapping the previous (n >= V), never reading past the row.
template <typename T>
VPFAST_HD void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  constexpr int V = Vec<T>::N;
  if (n < V) {
    std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  int64_t e = 0;
  for (; e + V <= n; e += V) storeu<T>(dst + e, loadu<T>(src + e));
  if (e < n) storeu<T>(dst + n - V, loadu<T>(src + n - V));
}

// Ask for a plane's cache lines ahead of use (at most the first 16 KiB): the kernels stream planes from
// memory one after another, and the copy into the scratch plane otherwise waits on each miss in turn.
inline void prefetch_plane(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  bytes = std::min<int64_t>(bytes, 16384);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}
// likewise for a plane about to be written (fetches the lines for ownership)
inline void prefetch_plane_w(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  bytes = std::min<int64_t>(bytes, 16384);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
}

// Copy an Hd x Wd plane (row stride ldx) into the data region of a scratch plane (whose padding is zero).
// The fields of g are read into locals first: GCC otherwise assumes the stores may change them and reloads
// them for every row, which made this copy 2.5x slower than the plain loop on TAU's 16x16 planes (and it runs
// once per plane and pass).
template <typename T>
VPFAST_CPU_CLONES void fill_plane(const Geo& g, const T* __restrict__ x, int64_t ldx, T* __restrict__ buf) {
  constexpr int V = Vec<T>::N;
  const int64_t Hd = g.rhi - g.rlo, Wd = g.chi - g.clo, ld = g.ld, sw = g.sw, PL = g.PL, clo = g.clo;
  T* const dst = buf + g.rlo * ld;
  if (sw == 1) {
    if (Wd == V) {
      for (int64_t h = 0; h < Hd; ++h) storeu<T>(dst + h * ld + clo, loadu<T>(x + h * ldx));
      return;
    }
    for (int64_t h = 0; h < Hd; ++h) copy_row<T>(dst + h * ld + clo, x + h * ldx, Wd);
    return;
  }
  for (int64_t h = 0; h < Hd; ++h) {
    T* row = dst + h * ld;
    const T* src = x + h * ldx;
    for (int64_t w = 0; w < Wd; ++w) {
      const int64_t c = clo + w;
      row[(c % sw) * PL + c / sw] = src[w];
    }
  }
}

// The row kernels below and the scalar-tap variant of the general loops are compiled for AVX-512 only (other
// CPUs take the cloned general loops): they need the 32 vector registers and cheap broadcasts, and `pin` keeps a
// loaded row in a register. Without it GCC's register allocator, short of
// registers, re-reads the row from memory in every multiply-add that uses it, which brings back the
// one-split-load-per-FMA pattern these kernels exist to avoid. (The asm constraint cannot be met by the
// AVX2 and baseline clones, where a 64-byte vector spans several registers.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define VPFAST_AVX512 __attribute__((target("avx512f")))
// VPFAST_CPU_PORTABLE=1 in the environment turns them off, so that tests can run the portable loops (and
// their splatted tap tables) on an AVX-512 machine too.
inline bool row_kernels_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && !std::getenv("VPFAST_CPU_PORTABLE");
  return ok;
}
template <typename V>
VPFAST_HD void pin(V& v) {
  asm("" : "+v"(v));
}
// Keeps a row pointer that is bumped by a run-time stride in one register. Otherwise GCC, unrolling the rows,
// precomputes every row's offset into its own register and spills them to the stack: weight_grad_rows ran
// 1.3-1.5x slower that way (5x5 and 7x7 dilation 3 at 16x16, one plane in L1, rdtsc).
template <typename P>
VPFAST_HD void pin_ptr(P& p) {
  asm("" : "+r"(p));
}
#else
#define VPFAST_AVX512
inline bool row_kernels_available() { return false; }
template <typename V>
VPFAST_HD void pin(V&) {}
template <typename P>
VPFAST_HD void pin_ptr(P&) {}
#endif

// The filter taps of every channel, optionally flipped (the input gradient correlates with the flipped filter).
// With AVX-512 every kernel broadcasts scalar taps ([C, K]): a channel's filter fits in a few cache lines. The
// cloned AVX2/baseline loops read each tap as a whole vector of copies ([C, K, V]) instead, because GCC 12
// expands a broadcast inside a target_clones function into 16 masked inserts; that table is 16 times larger
// and, for large filters, no longer fits in L1 next to the plane.
template <typename T>
struct Taps {
  int64_t stride = 0;  // elements per channel: K taps, or K splatted vectors
  std::vector<T> w;
  const T* of(int64_t c) const { return w.data() + c * stride; }
};

template <typename T>
Taps<T> make_taps(const T* w, int64_t C, int kh, int kw, bool flip) {
  const int V = row_kernels_available() ? 1 : Vec<T>::N;
  const int64_t K = (int64_t)kh * kw;
  Taps<T> t;
  t.stride = K * V;
  t.w.resize(C * t.stride);
  for (int64_t c = 0; c < C; ++c)
    for (int i = 0; i < kh; ++i)
      for (int j = 0; j < kw; ++j) {
        const T v = flip ? w[c * K + (kh - 1 - i) * kw + (kw - 1 - j)] : w[c * K + i * kw + j];
        T* dst = &t.w[c * t.stride + (i * kw + j) * V];
        for (int e = 0; e < V; ++e) dst[e] = v;
      }
  return t;
}

// out[oh*ldo + ow] = init + sum_{i,j} w[i*kw + j] * plane(oh*sh + i*dh, ow*sw + j*dw), oh < Ho, ow < Wo,
// with the taps given as a table wtab [K, TS]: TS = V splatted copies per tap, or TS = 1 scalar taps (broadcast
// on use; AVX-512 builds only, see Taps). Taps that would only read padding for a whole block are skipped.
template <typename T, int TS>
VPFAST_HD void correlate_general_body(const T* __restrict__ in, const Geo& g, const T* __restrict__ wtab, T init,
                                      T* __restrict__ out, int64_t ldo, int64_t Ho, int64_t Wo) {
  constexpr int V = Vec<T>::N, R = kRows;
  // a tap as a scalar (vector * scalar compiles to a broadcast operand) or as its splatted vector
  auto tap = [](const T* p) {
    if constexpr (TS == 1) return *p; else return loadu<T>(p);
  };
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
        const int64_t wrow = (int64_t)g.kw * TS;
        for (int j = j0; j < j1; ++j) {
          const T* base = in + (oh0 + i0) * g.ld + ow0 + g.coff[j];
          const T* wj = wtab + (int64_t)i0 * wrow + (int64_t)j * TS;
#pragma GCC unroll 16
          for (int t = 0; t < R - 1; ++t) {
            vec x = loadu<T>(base + t * g.ld);
            if constexpr (TS == 1) pin(x);
#pragma GCC unroll 16
            for (int r = 0; r <= t; ++r) acc[r] += x * tap(wj + (t - r) * wrow);
          }
          for (int t = R - 1; t < kh; ++t) {
            vec x = loadu<T>(base + t * g.ld);
            if constexpr (TS == 1) pin(x);
            const T* wt = wj + (int64_t)t * wrow;
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r] += x * tap(wt - r * wrow);
          }
          const T* bt = base + (int64_t)kh * g.ld;
          const T* wt = wj + (int64_t)kh * wrow;
#pragma GCC unroll 16
          for (int t = 0; t < R - 1; ++t) {
            vec x = loadu<T>(bt + t * g.ld);
            if constexpr (TS == 1) pin(x);
#pragma GCC unroll 16
            for (int r = t + 1; r < R; ++r) acc[r] += x * tap(wt + (t - r) * wrow);
          }
        }
      } else {
        for (int i = i0; i < i1; ++i) {
          const T* rp = in + (oh0 * g.sh + (int64_t)i * g.dh) * g.ld + ow0;
          const T* wr = wtab + (int64_t)i * g.kw * TS;
          for (int j = j0; j < j1; ++j) {
            const auto wv = tap(wr + j * TS);
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

template <typename T>
VPFAST_CPU_CLONES void correlate_general(const T* __restrict__ in, const Geo& g, const T* __restrict__ wtab, T init,
                                         T* __restrict__ out, int64_t ldo, int64_t Ho, int64_t Wo) {
  correlate_general_body<T, Vec<T>::N>(in, g, wtab, init, out, ldo, Ho, Wo);
}

template <typename T>
VPFAST_AVX512 void correlate_general_scalar_taps(const T* __restrict__ in, const Geo& g, const T* __restrict__ taps,
                                                 T init, T* __restrict__ out, int64_t ldo, int64_t Ho, int64_t Wo) {
  correlate_general_body<T, 1>(in, g, taps, init, out, ldo, Ho, Wo);
}

constexpr int kTapsPerPass = 6;  // weight-gradient taps accumulated per sweep over the plane
constexpr int kTapRows = 8;      // weight-gradient tap rows per sweep in the stride-1 path (at most; see tall_sweep_rows)

// dw[i*kw + j] = sum_{oh < Ho, ow < Wo} gr[oh*ldg + ow] * plane(oh*sh + i*dh, ow*sw + j*dw).
// gr must read zero in columns [Wo, round_up(Wo, V)) of each row. If gpad is given (stride 1, dilation 1,
// Ho >= 32), it must point at row 0 of a copy of gr with kTapRows - 1 zero rows above and below: then one
// load of an input row feeds kTapRows tap rows at once.
template <typename T>
VPFAST_CPU_CLONES void weight_grad_general(const T* __restrict__ in, const Geo& g, const T* __restrict__ gr,
                                           int64_t ldg, int64_t Ho, int64_t Wo, T* __restrict__ dw,
                                           const T* __restrict__ gpad) {
  constexpr int V = Vec<T>::N, J = kTapsPerPass, I = kTapRows;
  using vec = vec_t<T>;
  const int64_t Wr = round_up(Wo, V);
  if (gpad != nullptr) {
    // input row r pairs with output row r - i for tap row i; gpad is zero outside [0, Ho)
    for (int i0 = 0; i0 < g.kh; i0 += I) {
      const int ni = std::min(I, g.kh - i0);
      const int64_t r_lo = std::max<int64_t>(i0, g.rlo), r_hi = std::min<int64_t>(i0 + ni - 1 + Ho, g.rhi);
      // two tap columns per sweep: the I gradient rows loaded for one input row serve both (an odd last
      // column is computed twice and stored once)
      for (int j = 0; j < g.kw; j += 2) {
        const int j1 = std::min(j + 1, g.kw - 1);
        vec acc0[I], acc1[I];
        for (int t = 0; t < I; ++t) acc0[t] = acc1[t] = splat<T>(T(0));
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const T* xr0 = in + r * g.ld + g.coff[j];
          const T* xr1 = in + r * g.ld + g.coff[j1];
          const T* gp = gpad + (r - i0) * ldg;
          for (int64_t ow0 = 0; ow0 < Wr; ow0 += V) {
            const vec x0 = loadu<T>(xr0 + ow0), x1 = loadu<T>(xr1 + ow0);
#pragma GCC unroll 16
            for (int t = 0; t < I; ++t) {
              const vec gv = loadu<T>(gp - t * ldg + ow0);
              acc0[t] += x0 * gv;
              acc1[t] += x1 * gv;
            }
          }
        }
        for (int t = 0; t < ni; ++t) dw[(i0 + t) * g.kw + j] = hsum<T>(acc0[t]);
        if (j1 != j)
          for (int t = 0; t < ni; ++t) dw[(i0 + t) * g.kw + j1] = hsum<T>(acc1[t]);
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

// ---- small filters at vertical stride 1: every loaded input row feeds every output row it reaches ----------
//
// The general loops above issue one unaligned load per multiply-add (the column shift of tap j rarely
// falls on a vector boundary, so most of those loads split across two cache lines). For the 3/5/7-tap filters
// of gSTA and TAU on small maps that load traffic, not arithmetic, set the speed. Here a block of R output
// rows lives in registers, the KH weights of one tap column are held in registers too, and each shifted input
// row is loaded once and multiplied into the up to KH output rows that read it (output row r reads input row
// r + i*DH through tap row i). The filter height, tap-row dilation and block height are compile-time constants
// so that every accumulator index is known and the blocks stay in registers (R + KH + 1 <= 24 of 32).


template <typename T, int KH, int DH, int R>
VPFAST_AVX512 void correlate_rows(const T* __restrict__ in, const Geo& g, const T* __restrict__ taps, T init,
                                  T* __restrict__ out, int64_t ldo, int64_t Ho, int64_t Wo) {
  constexpr int V = Vec<T>::N, NT = R + (KH - 1) * DH;
  using vec = vec_t<T>;
  const int64_t ld = g.ld;
  for (int64_t oh0 = 0; oh0 < Ho; oh0 += R) {
    const int64_t nr = std::min<int64_t>(R, Ho - oh0);
    for (int64_t ow0 = 0; ow0 < Wo; ow0 += V) {
      const int64_t nc = std::min<int64_t>(V, Wo - ow0);
      int j0, j1;
      dw::tap_range(ow0 * g.sw, (ow0 + nc - 1) * g.sw, g.dw, g.kw, g.clo, g.chi, j0, j1);
      vec acc[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = splat<T>(init);
      for (int j = j0; j < j1; ++j) {
        vec w[KH];
#pragma GCC unroll 8
        for (int i = 0; i < KH; ++i) w[i] = splat<T>(taps[i * g.kw + j]);
        const T* xp = in + oh0 * ld + ow0 + g.coff[j];
#pragma GCC unroll 64
        for (int t = 0; t < NT; ++t, xp += ld) {
          pin_ptr(xp);
          vec x = loadu<T>(xp);
          pin(x);
#pragma GCC unroll 8
          for (int i = 0; i < KH; ++i) {
            const int r = t - i * DH;
            if (r >= 0 && r < R) acc[r] += x * w[i];
          }
        }
      }
      if (nc == V && nr == R) {
        // whole block: stores straight from the registers (a run-time row count makes GCC spill the block)
        T* op = out + oh0 * ldo + ow0;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r, op += ldo) {
          pin_ptr(op);
          storeu<T>(op, acc[r]);
        }
      } else {
        T tmp[R][V];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) storeu<T>(tmp[r], acc[r]);
        for (int r = 0; r < nr; ++r)
          for (int64_t e = 0; e < nc; ++e) out[(oh0 + r) * ldo + ow0 + e] = tmp[r][e];
      }
    }
  }
}

// Adds this plane's weight gradient of a small filter at vertical stride 1 to vector partial sums
// acc[(i*kw + j)*V ...] (their horizontal sums are dw[i*kw + j]): a block of R gradient rows stays in registers
// and each shifted input row is loaded once per tap column and multiplied into the KH tap rows that pair it
// with a row of the block; S accumulators per tap take the rows in turn (r % S) and are added in a fixed order.
// gr must read zero in columns [Wo, round_up(Wo, V)). If bacc is given, the gradient rows loaded for the first
// tap column are also added to the vector partial sum bacc[0 .. V) of the bias gradient (the plane's sum).
template <typename T, int KH, int DH, int R, int S>
VPFAST_AVX512 void weight_grad_rows(const T* __restrict__ in, const Geo& g, const T* __restrict__ gr, int64_t ldg,
                                    int64_t Ho, int64_t Wo, T* __restrict__ accv, T* __restrict__ bacc) {
  constexpr int V = Vec<T>::N, NT = R + (KH - 1) * DH;
  using vec = vec_t<T>;
  const int64_t ld = g.ld, Wr = round_up(Wo, V);
  for (int j = 0; j < g.kw; ++j) {
    vec acc[S][KH];
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) {
      acc[0][i] = loadu<T>(accv + (int64_t)(i * g.kw + j) * V);
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) acc[s][i] = splat<T>(T(0));
    }
    for (int64_t oh0 = 0; oh0 < Ho; oh0 += R) {
      const int64_t nr = std::min<int64_t>(R, Ho - oh0);
      for (int64_t ow0 = 0; ow0 < Wr; ow0 += V) {
        vec gv[R];
        const T* gp = gr + oh0 * ldg + ow0;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r, gp += ldg) {
          pin_ptr(gp);
          gv[r] = r < nr ? loadu<T>(gp) : splat<T>(T(0));
        }
        if (bacc != nullptr && j == 0) {
          // summed into memory per block: a sum register kept across the kernel cost more than it saved
          vec bs = gv[0];
#pragma GCC unroll 16
          for (int r = 1; r < R; ++r) bs += gv[r];
          storeu<T>(bacc, loadu<T>(bacc) + bs);
        }
        const T* xp = in + oh0 * ld + ow0 + g.coff[j];
#pragma GCC unroll 64
        for (int t = 0; t < NT; ++t, xp += ld) {
          pin_ptr(xp);
          vec x = loadu<T>(xp);
          pin(x);
#pragma GCC unroll 8
          for (int i = 0; i < KH; ++i) {
            const int r = t - i * DH;
            if (r >= 0 && r < R) acc[r % S][i] += x * gv[r];
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) {
      vec a = acc[0][i];
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) a += acc[s][i];
      storeu<T>(accv + (int64_t)(i * g.kw + j) * V, a);
    }
  }
}

// The tap-row reuse path of weight_grad_general (tall filters, stride and dilation 1; gpad as described there)
// with vector partial sums added to accv [K, V], walking the plane in bands of input rows: every tap is
// accumulated over one band before the next band, so the band's input and gradient rows stay in L1 instead of
// the whole plane streaming from L2 once per block of taps (which bound the 21x21 weight gradient).
// I tap rows per sweep (at most kTapRows, the zero rows gpad has on each side).
template <typename T, int I>
VPFAST_AVX512 void weight_grad_tall_sweeps(const T* __restrict__ in, const Geo& g, const T* __restrict__ gpad,
                                           int64_t ldg, int64_t Ho, int64_t Wo, T* __restrict__ accv) {
  static_assert(I <= kTapRows, "gpad has kTapRows - 1 zero rows on each side");
  constexpr int V = Vec<T>::N;
  constexpr int64_t RB = 32;  // input rows per band
  using vec = vec_t<T>;
  const int64_t Wr = round_up(Wo, V);
  for (int64_t rb = g.rlo; rb < g.rhi; rb += RB) {
    const int64_t rb_end = std::min<int64_t>(rb + RB, g.rhi);
    for (int i0 = 0; i0 < g.kh; i0 += I) {
      const int ni = std::min(I, g.kh - i0);
      const int64_t r_lo = std::max<int64_t>({(int64_t)i0, g.rlo, rb});
      const int64_t r_hi = std::min<int64_t>({(int64_t)i0 + ni - 1 + Ho, g.rhi, rb_end});
      if (r_lo >= r_hi) continue;
      for (int j = 0; j < g.kw; j += 2) {
        const int j1 = std::min(j + 1, g.kw - 1);
        T* a0 = accv + ((int64_t)i0 * g.kw + j) * V;
        T* a1 = accv + ((int64_t)i0 * g.kw + j1) * V;
        const int64_t trow = (int64_t)g.kw * V;
        vec acc0[I], acc1[I];
#pragma GCC unroll 8
        for (int t = 0; t < I; ++t) {
          acc0[t] = t < ni ? loadu<T>(a0 + t * trow) : splat<T>(T(0));
          acc1[t] = t < ni && j1 != j ? loadu<T>(a1 + t * trow) : splat<T>(T(0));
        }
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const T* xr0 = in + r * g.ld + g.coff[j];
          const T* xr1 = in + r * g.ld + g.coff[j1];
          const T* gp = gpad + (r - i0) * ldg;
          for (int64_t ow0 = 0; ow0 < Wr; ow0 += V) {
            vec x0 = loadu<T>(xr0 + ow0), x1 = loadu<T>(xr1 + ow0);
            pin(x0);
            pin(x1);
#pragma GCC unroll 8
            for (int t = 0; t < I; ++t) {
              vec gv = loadu<T>(gp - t * ldg + ow0);
              pin(gv);
              acc0[t] += x0 * gv;
              acc1[t] += x1 * gv;
            }
          }
        }
        for (int t = 0; t < ni; ++t) storeu<T>(a0 + t * trow, acc0[t]);
        if (j1 != j)
          for (int t = 0; t < ni; ++t) storeu<T>(a1 + t * trow, acc1[t]);
      }
    }
  }
}

// The last sweep of tap rows computes all I rows, used or not, so I (6 to 8) is the one that leaves the fewest
// rows unused (ties to the larger): 21 tap rows as 3 x 7 instead of 3 x 8 made the 21x21 weight gradient ~12%
// faster, 9 and 11 as 6-row sweeps ~20% (rdtsc, one 64x64 plane, alternating); 31 stays 4 x 8.
inline int tall_sweep_rows(int kh) {
  int best = kTapRows;
  for (int I = kTapRows; I >= 6; --I)
    if ((kh + I - 1) / I * I - kh < (kh + best - 1) / best * best - kh) best = I;
  return best;
}

template <typename T>
void weight_grad_tall(const T* in, const Geo& g, const T* gpad, int64_t ldg, int64_t Ho, int64_t Wo, T* accv) {
  switch (tall_sweep_rows(g.kh)) {
    case 6: weight_grad_tall_sweeps<T, 6>(in, g, gpad, ldg, Ho, Wo, accv); break;
    case 7: weight_grad_tall_sweeps<T, 7>(in, g, gpad, ldg, Ho, Wo, accv); break;
    default: weight_grad_tall_sweeps<T, kTapRows>(in, g, gpad, ldg, Ho, Wo, accv); break;
  }
}

// Calls f(KH, DH) with compile-time constants when the row kernels cover the filter (3, 5 or 7 tap rows,
// tap-row dilation 1 to 3, vertical stride 1); returns false otherwise.
inline bool row_kernels_cover(const Geo& g) {
  return row_kernels_available() && g.sh == 1 && g.dh >= 1 && g.dh <= 3 && (g.kh == 3 || g.kh == 5 || g.kh == 7);
}

template <typename F>
bool with_small_filter(const Geo& g, F&& f) {
  if (!row_kernels_cover(g)) return false;
  auto pick_dh = [&](auto kh) {
    switch (g.dh) {
      case 1: f(kh, std::integral_constant<int, 1>{}); break;
      case 2: f(kh, std::integral_constant<int, 2>{}); break;
      default: f(kh, std::integral_constant<int, 3>{}); break;
    }
    return true;
  };
  switch (g.kh) {
    case 3: return pick_dh(std::integral_constant<int, 3>{});
    case 5: return pick_dh(std::integral_constant<int, 5>{});
    case 7: return pick_dh(std::integral_constant<int, 7>{});
    default: return false;
  }
}

// out = init + correlation of the scratch plane with channel c's filter (see correlate_general), picking the
// row kernels, the AVX-512 scalar-tap loops or the portable loops (the layout make_taps chose).
template <typename T>
void correlate_plane(const T* in, const Geo& g, const Taps<T>& taps, int64_t c, T init, T* out, int64_t ldo,
                     int64_t Ho, int64_t Wo) {
  const T* w = taps.of(c);
  const bool done = with_small_filter(g, [&](auto kh, auto dh) {
    if (Ho <= 8)
      correlate_rows<T, decltype(kh)::value, decltype(dh)::value, 8>(in, g, w, init, out, ldo, Ho, Wo);
    else
      correlate_rows<T, decltype(kh)::value, decltype(dh)::value, 16>(in, g, w, init, out, ldo, Ho, Wo);
  });
  if (done) return;
  if (row_kernels_available())
    correlate_general_scalar_taps<T>(in, g, w, init, out, ldo, Ho, Wo);
  else
    correlate_general<T>(in, g, w, init, out, ldo, Ho, Wo);
}

// Weight gradient of one channel summed over several planes, in the order they are added (deterministic).
// The row kernels keep vector partial sums, so a small plane costs one horizontal sum per tap for the whole
// channel rather than one per tap and plane; the general loops add per-plane scalars.
template <typename T>
struct WeightGrad {
  int64_t K = 0;
  std::vector<T> vsum, ssum, tmp, vbias;  // [K, V], [K], [K], [V]

  explicit WeightGrad(int64_t taps) : K(taps), vsum(taps * Vec<T>::N), ssum(taps), tmp(taps), vbias(Vec<T>::N) {}
  void reset() {
    std::fill(vsum.begin(), vsum.end(), T(0));
    std::fill(ssum.begin(), ssum.end(), T(0));
    std::fill(vbias.begin(), vbias.end(), T(0));
  }
  // Add one plane (gpad: see weight_grad_general's tap-row reuse path). With bias, the row kernels also sum the
  // gradient plane into the bias partial (bias_result()) while its rows are in registers; returns whether
  // they did (the same for every plane of one geometry), else the caller sums the plane itself.
  bool add(const T* in, const Geo& g, const T* gr, int64_t ldg, int64_t Ho, int64_t Wo, const T* gpad = nullptr,
           bool bias = false) {
    T* bacc = bias ? vbias.data() : nullptr;
    const bool done = with_small_filter(g, [&](auto kh, auto dh) {
      constexpr int KH = decltype(kh)::value, DH = decltype(dh)::value;
      // 16-row blocks of 3x3 and 5x5 filters split each tap's sum over even and odd rows: 5 dependent FMA
      // chains left one thread latency-bound (TAU's 5x5 at 16x16, one thread: 7% faster split; no change
      // with two threads on this 2-core VM). 7 tap rows would not fit both halves in registers.
      if (Ho <= 8)
        weight_grad_rows<T, KH, DH, 8, 1>(in, g, gr, ldg, Ho, Wo, vsum.data(), bacc);
      else
        weight_grad_rows<T, KH, DH, 16, (KH <= 5 ? 2 : 1)>(in, g, gr, ldg, Ho, Wo, vsum.data(), bacc);
    });
    if (done) return bias;
    if (gpad != nullptr && row_kernels_available()) {
      weight_grad_tall<T>(in, g, gpad, ldg, Ho, Wo, vsum.data());
      return false;
    }
    weight_grad_general<T>(in, g, gr, ldg, Ho, Wo, tmp.data(), gpad);
    for (int64_t k = 0; k < K; ++k) ssum[k] += tmp[k];
    return false;
  }
  void result(T* dw) const {
    for (int64_t k = 0; k < K; ++k) dw[k] = ssum[k] + hsum<T>(loadu<T>(&vsum[k * Vec<T>::N]));
  }
  T bias_result() const { return hsum<T>(loadu<T>(vbias.data())); }
};

// Batch chunks of the backward passes: tasks are (channel, chunk of samples), each summing its weight and
// bias gradients over its samples in order; chunks are then reduced in order. The split depends on the shape
// only (never on the thread count), so the gradients are the same bits on every run and machine. Enough chunks
// to give every thread work when there are few channels, one per channel otherwise.
inline int64_t batch_chunks(int64_t B, int64_t C) { return std::max<int64_t>(1, std::min<int64_t>(B, (64 + C - 1) / C)); }
// at most this many channels per backward task (their visiting order never changes a sum)
constexpr int64_t kMaxChanBlock = 16;


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
  cpu::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
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
