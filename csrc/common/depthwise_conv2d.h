// Index arithmetic of depthwise convolution, shared by the CPU and CUDA kernels.
//
// Conventions (cross-correlation, as nn.Conv2d): for output (oh, ow) and tap (i, j), the input position is
// (oh*sh - ph + i*dh, ow*sw - pw + j*dw); positions outside the map read zero. The input gradient is the
// same correlation over the zero-upsampled output gradient with the taps flipped.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace vpfast {
namespace dw {

VPFAST_HD int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Taps t in [t0, t1) of a k-tap filter with dilation d for which some output position of the range whose
// first tap-0 input is `first` and last is `last` reads inside [lo, hi); the other taps only read padding.
VPFAST_HD void tap_range(int64_t first, int64_t last, int64_t d, int k, int64_t lo, int64_t hi, int& t0, int& t1) {
  t0 = 0;
  while (t0 < k && last + t0 * d < lo) ++t0;
  t1 = k;
  while (t1 > t0 && first + (t1 - 1) * d >= hi) --t1;
}

// Output gradient position feeding input position h through tap i, or -1: oh*s - p + i*d == h.
VPFAST_HD int64_t grad_source(int64_t h, int64_t i, int64_t s, int64_t p, int64_t d, int64_t out) {
  const int64_t t = h + p - i * d;
  if (t < 0 || t % s != 0) return -1;
  const int64_t o = t / s;
  return o < out ? o : -1;
}

}  // namespace dw
}  // namespace vpfast
