// Elementwise math for the fused kernels, usable on host and device.
//
// On the CPU, std::exp/std::log are opaque calls that stop GCC's vectoriser, so the kernels would run one
// element at a time. These versions are plain arithmetic (range reduction + polynomial), which GCC turns
// into AVX-512 code; their error is within about two ulp of libm in float32 and float64 (checked against the float64 reference by every op test).
// On the device the CUDA library functions are used instead.
#pragma once
#include <cstdint>
#include <cstring>
#include "common/macros.h"

namespace vpfast {

template <typename T> struct MathConst;
template <> struct MathConst<float> {
  using Int = int32_t;
  static constexpr int kMantBits = 23, kBias = 127;
  static constexpr float kMaxArg = 88.3762626647949f, kMinArg = -87.3365478515625f;
};
template <> struct MathConst<double> {
  using Int = int64_t;
  static constexpr int kMantBits = 52, kBias = 1023;
  static constexpr double kMaxArg = 709.782712893384, kMinArg = -708.39641853226408;
};

template <typename T> VPFAST_HD T bits_to(typename MathConst<T>::Int i) {
  T out;
  std::memcpy(&out, &i, sizeof(T));
  return out;
}
template <typename T> VPFAST_HD typename MathConst<T>::Int to_bits(T x) {
  typename MathConst<T>::Int out;
  std::memcpy(&out, &x, sizeof(T));
  return out;
}

template <typename T> VPFAST_HD T floor_t(T x);
template <> VPFAST_HD float floor_t<float>(float x) { return __builtin_floorf(x); }
template <> VPFAST_HD double floor_t<double>(double x) { return __builtin_floor(x); }

// exp(x), clamped to the finite range: exp(-inf) = 0 (well, the smallest normal), exp(+large) = max.
// Callers only evaluate it on arguments <= 0 (softmax after the max shift, sigmoid of -|x|), so the clamp
// never changes a result they use.
template <typename T> VPFAST_HD T fast_exp(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  using C = MathConst<T>;
  using I = typename C::Int;
  x = x < C::kMinArg ? C::kMinArg : x;
  x = x > C::kMaxArg ? C::kMaxArg : x;
  // x = n ln2 + r with |r| <= ln2/2; ln2 split in a high part with trailing zeros so n*ln2_hi is exact
  const T n = floor_t<T>(x * T(1.4426950408889634) + T(0.5));
  const T r = (x - n * T(0.693145751953125)) - n * T(1.42860682030941723212e-6);
  T p;
  if (sizeof(T) == 4) {
    p = T(1.0 / 5040);
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = T(1.0 / 6227020800.0);
    p = p * r + T(1.0 / 479001600.0);
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120.0);
    p = p * r + T(1.0 / 24.0);
    p = p * r + T(1.0 / 6.0);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  }
  // 2^n by building the exponent field; n + bias stays in [1, 2*bias] thanks to the clamp above,
  // except at the very bottom, where n = -bias - 1 for float; split the scale in two there.
  const I ni = static_cast<I>(n);
  const I half = ni >> 1;
  const T s1 = bits_to<T>((half + C::kBias) << C::kMantBits);
  const T s2 = bits_to<T>((ni - half + C::kBias) << C::kMantBits);
  return p * s1 * s2;
#endif
}

// log(x) for x > 0 (finite). log(0) gives a large negative number instead of -inf; callers add eps first.
template <typename T> VPFAST_HD T fast_log(T x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  using C = MathConst<T>;
  using I = typename C::Int;
  const I bits = to_bits<T>(x);
  I e = ((bits >> C::kMantBits) & ((I(1) << (sizeof(T) * 8 - 1 - C::kMantBits)) - 1)) - C::kBias;
  T m = bits_to<T>((bits & ((I(1) << C::kMantBits) - 1)) | (I(C::kBias) << C::kMantBits));  // [1, 2)
  // move m into [sqrt(1/2), sqrt(2)) so that s below stays small
  const bool big = m > T(1.4142135623730951);
  m = big ? m * T(0.5) : m;
  e = big ? e + 1 : e;
  // log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716
  const T s = (m - T(1)) / (m + T(1));
  const T z = s * s;
  T p;
  if (sizeof(T) == 4) {
    p = T(1.0 / 9);
    p = p * z + T(1.0 / 7);
    p = p * z + T(1.0 / 5);
    p = p * z + T(1.0 / 3);
    p = p * z + T(1);
  } else {
    p = T(1.0 / 19);
    p = p * z + T(1.0 / 17);
    p = p * z + T(1.0 / 15);
    p = p * z + T(1.0 / 13);
    p = p * z + T(1.0 / 11);
    p = p * z + T(1.0 / 9);
    p = p * z + T(1.0 / 7);
    p = p * z + T(1.0 / 5);
    p = p * z + T(1.0 / 3);
    p = p * z + T(1);
  }
  const T fe = static_cast<T>(e);
  return (fe * T(0.693145751953125) + T(2) * s * p) + fe * T(1.42860682030941723212e-6);
#endif
}

// sigmoid through exp(-|x|) <= 1, so it never overflows and keeps full relative precision for x << 0
template <typename T> VPFAST_HD T fast_sigmoid(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = fast_exp<T>(-ax);
  const T pos = T(1) / (T(1) + e);
  return x < T(0) ? e * pos : pos;
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); no overflow for any finite x
template <typename T> VPFAST_HD T fast_tanh(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = fast_exp<T>(T(-2) * ax);
  const T t = (T(1) - e) / (T(1) + e);
  return x < T(0) ? -t : t;
}

}  // namespace vpfast
