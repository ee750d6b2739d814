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

// ---- launch geometry of the CUDA kernels (host and device; unit-tested on the host by
// tests/test_depthwise_conv2d.py::test_launch_geometry_helpers, which needs no GPU) ---------------------

// gridDim.y and gridDim.z are at most 65535 and gridDim.x at most 2^31 - 1. Planes (B*C) alone exceed 65535
// in TAU's MixMlp (16 x 4096), so every kernel numbers its work on x only and loops with a grid stride over
// whatever exceeds the launched grid.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
// Dynamic shared memory a kernel may take without opting in to more.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

VPFAST_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks to launch along x for `work` items, `per_block` items per block and grid-stride pass.
VPFAST_HD int64_t grid_x(int64_t work, int64_t per_block) {
  const int64_t n = ceil_div(work, per_block);
  return n < 1 ? 1 : (n > kMaxGridX ? kMaxGridX : n);
}

// The tiled kernels' work items: one `tile` x `tile` block of output pixels of one (sample, channel) plane,
// numbered plane-major, then tile row, then tile column. Block b handles items b, b + gridDim.x, ...
struct TileGrid {
  int64_t planes, tiles_h, tiles_w;

  VPFAST_HD int64_t total() const { return planes * tiles_h * tiles_w; }
  VPFAST_HD void locate(int64_t item, int64_t& plane, int64_t& ty, int64_t& tx) const {
    tx = item % tiles_w;
    const int64_t rest = item / tiles_w;
    ty = rest % tiles_h;
    plane = rest / tiles_h;
  }
};

VPFAST_HD TileGrid tile_grid(int64_t planes, int64_t out_h, int64_t out_w, int64_t tile) {
  return TileGrid{planes, ceil_div(out_h, tile), ceil_div(out_w, tile)};
}

// Elements of shared memory the tiled forward stages per block: the input window of a tile x tile output
// block (its dilated, strided halo included) and the channel's filter. Arguments are below 2^31 (the op's
// check); a window too wide for any shared memory returns kMaxGridX rather than an overflowed product.
VPFAST_HD int64_t forward_tile_elems(int64_t tile, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                                     int64_t dw) {
  const int64_t in_h = (tile - 1) * sh + (kh - 1) * dh + 1, in_w = (tile - 1) * sw + (kw - 1) * dw + 1;
  if (in_h > kMaxSharedBytes || in_w > kMaxSharedBytes) return kMaxGridX;  // far beyond any shared memory
  return in_h * in_w + kh * kw;
}

// The fused pair's shared tiles (both stages stride 1): the intermediate map with stage 1's halo, and the
// input with both halos. Returns the element count; mid_h/w and in_h/w receive the tiles' extents.
VPFAST_HD int64_t pair_tile_elems(int64_t tile, int64_t k0h, int64_t k0w, int64_t d0h, int64_t d0w, int64_t k1h,
                                  int64_t k1w, int64_t d1h, int64_t d1w, int64_t& mid_h, int64_t& mid_w,
                                  int64_t& in_h, int64_t& in_w) {
  mid_h = tile + (k1h - 1) * d1h;
  mid_w = tile + (k1w - 1) * d1w;
  in_h = mid_h + (k0h - 1) * d0h;
  in_w = mid_w + (k0w - 1) * d0w;
  if (in_h > kMaxSharedBytes || in_w > kMaxSharedBytes) return kMaxGridX;  // far beyond any shared memory
  return in_h * in_w + mid_h * mid_w;
}

}  // namespace dw
}  // namespace vpfast
