// Bilinear sampling with zero padding, shared by the deformable warp and the flow warp on CPU and CUDA.
//
// A sample at (y, x) of an H x W map reads the four corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) with
// y0 = floor(y), y1 = y0 + 1 (likewise x), weighted (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly lx; a corner outside
// the map reads 0. This is torchvision's deform_conv2d and grid_sample's "zeros" rule, and also thuml's
// Warp (which clamps positions into a frame padded by one zero pixel), including the one-sided derivative
// at integer positions (floor convention).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include "common/math.h"

namespace vpfast {
namespace warp {

template <typename T> VPFAST_HD T floor_v(T v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return floor_t<T>(v);
#endif
}

// Corner geometry of one sample. Rows/columns are clamped into the map, so every index is safe to read;
// the 0/1 validity factors vy0.., vx0.. zero the corners that lie outside.
template <typename T> struct Corners {
  int32_t r0, r1, c0, c1;  // r* already multiplied by W
  T vy0, vy1, vx0, vx1;
  T ly, lx;
};

VPFAST_HD int32_t clamp_i(int32_t v, int32_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// thuml_edge: thuml's reference clamps positions into its padded frame, so exactly on the line one pixel
// before the map (y = -1 or x = -1) its derivative is 0 rather than the one-sided value; deform_warp follows
// it (the value is 0 there either way), flow_warp follows grid_sample, which keeps the one-sided value.
template <typename T> VPFAST_HD Corners<T> corners(T y, T x, int32_t H, int32_t W, bool thuml_edge = false) {
  // Further than one pixel outside the map every corner is outside; clamping there keeps the integer
  // conversion defined for any offset and changes no result or derivative.
  y = y > T(-2) ? y : T(-2);
  y = y < T(H + 1) ? y : T(H + 1);
  x = x > T(-2) ? x : T(-2);
  x = x < T(W + 1) ? x : T(W + 1);
  const T fy = floor_v<T>(y), fx = floor_v<T>(x);
  Corners<T> c;
  c.ly = y - fy;
  c.lx = x - fx;
  const int32_t y0 = static_cast<int32_t>(fy), x0 = static_cast<int32_t>(fx);
  c.vy0 = (y0 >= 0 && y0 < H) ? T(1) : T(0);
  c.vy1 = ((thuml_edge ? y > T(-1) : y0 + 1 >= 0) && y0 + 1 < H) ? T(1) : T(0);
  c.vx0 = (x0 >= 0 && x0 < W) ? T(1) : T(0);
  c.vx1 = ((thuml_edge ? x > T(-1) : x0 + 1 >= 0) && x0 + 1 < W) ? T(1) : T(0);
  c.r0 = clamp_i(y0, H - 1) * W;
  c.r1 = clamp_i(y0 + 1, H - 1) * W;
  c.c0 = clamp_i(x0, W - 1);
  c.c1 = clamp_i(x0 + 1, W - 1);
  return c;
}

// The four corner weights of a sample, validity included, scaled by s (the modulation mask).
template <typename T>
VPFAST_HD void corner_weights(const Corners<T>& c, T s, T& w00, T& w01, T& w10, T& w11) {
  const T a0 = s * (T(1) - c.ly) * c.vy0, a1 = s * c.ly * c.vy1;
  const T b0 = (T(1) - c.lx) * c.vx0, b1 = c.lx * c.vx1;
  w00 = a0 * b0;
  w01 = a0 * b1;
  w10 = a1 * b0;
  w11 = a1 * b1;
}

// Sample value and its derivatives along y and x from the four corner values already multiplied by their
// validity (u00 = vy0 vx0 x[y0, x0], ...).
template <typename T>
VPFAST_HD void sample_grad(T u00, T u01, T u10, T u11, T ly, T lx, T& s, T& dy, T& dx) {
  const T hy = T(1) - ly, hx = T(1) - lx;
  const T top = hx * u00 + lx * u01, bot = hx * u10 + lx * u11;
  s = hy * top + ly * bot;
  dy = bot - top;
  dx = hy * (u01 - u00) + ly * (u11 - u10);
}

// ---- host side, shared by the CPU and CUDA wrappers --------------------------------------------------------
inline void check_deform_inputs(const char* fn, const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
                  const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && offset.dim() == 4 && mask.dim() == 4 && weight.dim() == 4, fn,
              ": x, offset, mask, weight must be 4-D");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), k = weight.size(2);
  TORCH_CHECK(weight.size(1) == C && weight.size(3) == k && k % 2 == 1, fn, ": weight must be [O, C, k, k], k odd");
  TORCH_CHECK(offset.sizes() == at::IntArrayRef({B, 2 * k * k, H, W}), fn, ": offset must be [B, 2k², H, W]");
  TORCH_CHECK(mask.sizes() == at::IntArrayRef({B, k * k, H, W}), fn, ": mask must be [B, k², H, W]");
  TORCH_CHECK(offset.scalar_type() == x.scalar_type() && mask.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              fn, ": dtype mismatch");
  TORCH_CHECK(H * W < (int64_t(1) << 31) && H + 2 < (int64_t(1) << 30) && W + 2 < (int64_t(1) << 30), fn,
              ": the map is too large for 32-bit indices");
}

// deform_warp_backward's operands: the forward's, and grad of the output's shape [B, O, H, W]
inline void check_deform_backward(const char* fn, const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight) {
  check_deform_inputs(fn, x, offset, mask, weight);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({x.size(0), weight.size(0), x.size(2), x.size(3)}), fn,
              ": grad must be [B, O, H, W]");
}

// What both wrappers of each entry point work on, after the checks: the operands made contiguous, the weight as
// the [O, K = C*k*k] GEMM operand, and the sizes. Unpacked with a structured binding, in this order.
struct DeformOperands {
  at::Tensor X, OFF, M, Wm;
  int64_t B, C, H, W, O, k, N, HW, K;
};
inline DeformOperands deform_operands(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
                                      const at::Tensor& weight) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), k = weight.size(2), N = k * k, K = C * N;
  return {x.contiguous(), offset.contiguous(), mask.contiguous(), weight.contiguous().view({O, K}),
          B, C, H, W, O, k, N, H * W, K};
}
inline DeformOperands deform_forward_operands(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
                                              const at::Tensor& weight) {
  check_deform_inputs("vpfast::deform_warp_forward", x, offset, mask, weight);
  return deform_operands(x, offset, mask, weight);
}
inline DeformOperands deform_backward_operands(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset,
                                               const at::Tensor& mask, const at::Tensor& weight) {
  check_deform_backward("vpfast::deform_warp_backward", grad, x, offset, mask, weight);
  return deform_operands(x, offset, mask, weight);
}

// Images per column-buffer chunk: as many as fit `budget` bytes with `buffers` buffers per image, at least one.
inline int64_t chunk_images(int64_t B, int64_t bytes_per_image, int buffers, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(B, budget / std::max<int64_t>(1, bytes_per_image * buffers)));
}

}  // namespace warp
}  // namespace vpfast
