// Gathers for the bilinear warps on the CPU (deform_warp, flow_warp).
//
// GCC vectorises `x[idx[p]]` loops only with emulated gathers (one scalar load and insert per lane) under
// its generic tuning, which made sampling the bottleneck; these helpers use AVX-512 gather instructions
// when the CPU has them (checked once at run time) and plain loops otherwise.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
#include <immintrin.h>
#define VPFAST_X86_GATHER 1
#endif

namespace vpfast {
namespace warp {

inline bool cpu_has_avx512() {
#ifdef VPFAST_X86_GATHER
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

#ifdef VPFAST_X86_GATHER
// out[p] = sum_k w[k][p] * x[idx[k][p]], k = 0..3
__attribute__((target("avx512f"))) inline void gather4_avx512(const float* x, const int32_t* const* idx,
                                                             const float* const* w, float* out, int64_t n) {
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(w[0] + p),
                               _mm512_i32gather_ps(_mm512_loadu_si512(idx[0] + p), x, 4));
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w[1] + p), _mm512_i32gather_ps(_mm512_loadu_si512(idx[1] + p), x, 4), acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w[2] + p), _mm512_i32gather_ps(_mm512_loadu_si512(idx[2] + p), x, 4), acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w[3] + p), _mm512_i32gather_ps(_mm512_loadu_si512(idx[3] + p), x, 4), acc);
    _mm512_storeu_ps(out + p, acc);
  }
  for (; p < n; ++p)
    out[p] = w[0][p] * x[idx[0][p]] + w[1][p] * x[idx[1][p]] + w[2][p] * x[idx[2][p]] + w[3][p] * x[idx[3][p]];
}

__attribute__((target("avx512f"))) inline void gather4_avx512(const double* x, const int32_t* const* idx,
                                                             const double* const* w, double* out, int64_t n) {
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
#define VPFAST_LD(k) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[k] + p))
    __m512d acc = _mm512_mul_pd(_mm512_loadu_pd(w[0] + p), _mm512_i32gather_pd(VPFAST_LD(0), x, 8));
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(w[1] + p), _mm512_i32gather_pd(VPFAST_LD(1), x, 8), acc);
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(w[2] + p), _mm512_i32gather_pd(VPFAST_LD(2), x, 8), acc);
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(w[3] + p), _mm512_i32gather_pd(VPFAST_LD(3), x, 8), acc);
#undef VPFAST_LD
    _mm512_storeu_pd(out + p, acc);
  }
  for (; p < n; ++p)
    out[p] = w[0][p] * x[idx[0][p]] + w[1][p] * x[idx[1][p]] + w[2][p] * x[idx[2][p]] + w[3][p] * x[idx[3][p]];
}

// v[k][p] = x[idx[k][p]], k = 0..3
__attribute__((target("avx512f"))) inline void gather_planes_avx512(const float* x, const int32_t* const* idx,
                                                                   float* const* v, int64_t n) {
  int64_t p = 0;
  for (; p + 16 <= n; p += 16)
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(v[k] + p, _mm512_i32gather_ps(_mm512_loadu_si512(idx[k] + p), x, 4));
  for (; p < n; ++p)
    for (int k = 0; k < 4; ++k) v[k][p] = x[idx[k][p]];
}

__attribute__((target("avx512f"))) inline void gather_planes_avx512(const double* x, const int32_t* const* idx,
                                                                   double* const* v, int64_t n) {
  int64_t p = 0;
  for (; p + 8 <= n; p += 8)
    for (int k = 0; k < 4; ++k)
      _mm512_storeu_pd(v[k] + p,
                       _mm512_i32gather_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[k] + p)), x, 8));
  for (; p < n; ++p)
    for (int k = 0; k < 4; ++k) v[k][p] = x[idx[k][p]];
}

// Channel loop of the bilinear-sample backward for pixels [p0, p1), float, AVX-512. Pixels go in chunks of
// kChunk (their sums stay in L1) and, within a chunk, channel after channel (rows are read and written as
// contiguous pieces, which the prefetchers follow): the four corner values are gathered (u_k = m_k x_c[idx_k]),
// the sample s and its derivatives dy, dx formed (common/deform_warp.h's sample_grad), the optional column
// entry mask*s stored, and g_c*s, g_c*dy, g_c*dx summed over the channels in order. am may be null (no mask
// gradient), col and mask may be null (no column buffer).
__attribute__((target("avx512f"))) inline void grad_channels_f32(
    const float* x, int64_t x_cs, const float* g, int64_t g_cs, float* col, int64_t col_cs, const float* mask,
    int64_t C, const int32_t* const* idx, const float* const* m, const float* ly, const float* lx, float* am,
    float* ay, float* ax, int64_t p0, int64_t p1) {
  constexpr int64_t kChunk = 512;
  alignas(64) float acc[3][kChunk];
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t q0 = p0; q0 < p1; q0 += kChunk) {
    const int64_t q1 = q0 + kChunk < p1 ? q0 + kChunk : p1;
    for (int64_t p = q0; p < q1; p += 16)
      for (int a = 0; a < 3; ++a) _mm512_store_ps(acc[a] + (p - q0), zero);
    for (int64_t ch = 0; ch < C; ++ch) {
      const float* xc = x + ch * x_cs;
      const float* gc = g + ch * g_cs;
      float* cc = col ? col + ch * col_cs : nullptr;
      for (int64_t p = q0; p < q1; p += 16) {
        const __mmask16 k = p + 16 <= q1 ? (__mmask16)0xFFFF : (__mmask16)((1u << (q1 - p)) - 1);
        const __m512 vly = _mm512_maskz_loadu_ps(k, ly + p), vlx = _mm512_maskz_loadu_ps(k, lx + p);
        const __m512 hy = _mm512_sub_ps(one, vly), hx = _mm512_sub_ps(one, vlx);
        const __m512 u0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m[0] + p),
                                        _mm512_mask_i32gather_ps(zero, k, _mm512_maskz_loadu_epi32(k, idx[0] + p), xc, 4));
        const __m512 u1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m[1] + p),
                                        _mm512_mask_i32gather_ps(zero, k, _mm512_maskz_loadu_epi32(k, idx[1] + p), xc, 4));
        const __m512 u2 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m[2] + p),
                                        _mm512_mask_i32gather_ps(zero, k, _mm512_maskz_loadu_epi32(k, idx[2] + p), xc, 4));
        const __m512 u3 = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, m[3] + p),
                                        _mm512_mask_i32gather_ps(zero, k, _mm512_maskz_loadu_epi32(k, idx[3] + p), xc, 4));
        const __m512 top = _mm512_fmadd_ps(vlx, u1, _mm512_mul_ps(hx, u0));
        const __m512 bot = _mm512_fmadd_ps(vlx, u3, _mm512_mul_ps(hx, u2));
        const __m512 sv = _mm512_fmadd_ps(vly, bot, _mm512_mul_ps(hy, top));
        const __m512 dy = _mm512_sub_ps(bot, top);
        const __m512 dx = _mm512_fmadd_ps(vly, _mm512_sub_ps(u3, u2), _mm512_mul_ps(hy, _mm512_sub_ps(u1, u0)));
        if (cc) _mm512_mask_storeu_ps(cc + p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, mask + p), sv));
        const __m512 gv = _mm512_maskz_loadu_ps(k, gc + p);
        float* a0 = acc[0] + (p - q0);
        float* a1 = acc[1] + (p - q0);
        float* a2 = acc[2] + (p - q0);
        _mm512_store_ps(a0, _mm512_fmadd_ps(gv, sv, _mm512_load_ps(a0)));
        _mm512_store_ps(a1, _mm512_fmadd_ps(gv, dy, _mm512_load_ps(a1)));
        _mm512_store_ps(a2, _mm512_fmadd_ps(gv, dx, _mm512_load_ps(a2)));
      }
    }
    for (int64_t p = q0; p < q1; p += 16) {
      const __mmask16 k = p + 16 <= q1 ? (__mmask16)0xFFFF : (__mmask16)((1u << (q1 - p)) - 1);
      if (am) _mm512_mask_storeu_ps(am + p, k, _mm512_load_ps(acc[0] + (p - q0)));
      _mm512_mask_storeu_ps(ay + p, k, _mm512_load_ps(acc[1] + (p - q0)));
      _mm512_mask_storeu_ps(ax + p, k, _mm512_load_ps(acc[2] + (p - q0)));
    }
  }
}
#endif

template <typename T>
inline void gather4(const T* x, const int32_t* const* idx, const T* const* w, T* out, int64_t n) {
#ifdef VPFAST_X86_GATHER
  if (cpu_has_avx512()) return gather4_avx512(x, idx, w, out, n);
#endif
  for (int64_t p = 0; p < n; ++p)
    out[p] = w[0][p] * x[idx[0][p]] + w[1][p] * x[idx[1][p]] + w[2][p] * x[idx[2][p]] + w[3][p] * x[idx[3][p]];
}

// gx[idx[k][p]] += w[k][p] * g[p], pixels in order, corners k = 0..3 (a fixed order: deterministic). Scalar:
// with per-pixel offsets neighbouring lanes often hit the same corner, and a conflict-checked AVX-512
// gather/scatter measured slower than this loop.
template <typename T> inline void scatter4(T* gx, const int32_t* const* idx, const T* const* w, const T* g, int64_t n) {
  const int32_t *i0 = idx[0], *i1 = idx[1], *i2 = idx[2], *i3 = idx[3];
  const T *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  for (int64_t p = 0; p < n; ++p) {
    const T v = g[p];
    gx[i0[p]] += w0[p] * v;
    gx[i1[p]] += w1[p] * v;
    gx[i2[p]] += w2[p] * v;
    gx[i3[p]] += w3[p] * v;
  }
}

template <typename T> inline void gather_planes(const T* x, const int32_t* const* idx, T* const* v, int64_t n) {
#ifdef VPFAST_X86_GATHER
  if (cpu_has_avx512()) return gather_planes_avx512(x, idx, v, n);
#endif
  for (int64_t p = 0; p < n; ++p)
    for (int k = 0; k < 4; ++k) v[k][p] = x[idx[k][p]];
}

}  // namespace warp
}  // namespace vpfast
