// Flow warp arithmetic shared by csrc/cpu/flow_warp.cpp and csrc/cuda/flow_warp.cu: the sample position of
// a pixel, as grid_sample sees it after un-normalising the grid, plus the corner geometry of
// common/deform_warp.h.
#pragma once
#include "common/deform_warp.h"

namespace vpfast {
namespace warp {

// Position along one axis of size `size` for pixel coordinate `base` moved by `f` pixels, and the factor
// (0 or 1) by which its derivative with respect to f is multiplied. With align_corners a map of size 1 is
// always sampled at 0 (grid_sample's un-normalisation multiplies by size - 1). Border padding clamps the
// position into [0, size - 1]; as in grid_sample the clamped positions and the two ends have derivative 0.
template <typename T> VPFAST_HD T flow_coord(T base, T f, int32_t size, bool border, bool align_corners, T& dfac) {
  const bool fixed = align_corners && size == 1;
  T p = fixed ? T(0) : base + f;
  T g = fixed ? T(0) : T(1);
  if (border) {
    const T hi = T(size - 1);
    g = (p > T(0) && p < hi) ? g : T(0);
    p = p > T(0) ? p : T(0);
    p = p < hi ? p : hi;
  }
  dfac = g;
  return p;
}

// host side, shared by the CPU and CUDA wrappers
inline void check_flow_inputs(const char* fn, const at::Tensor& x, const at::Tensor& flow) {
  TORCH_CHECK(x.dim() == 4 && flow.dim() == 4, fn, ": x and flow must be 4-D");
  TORCH_CHECK(flow.sizes() == at::IntArrayRef({x.size(0), 2, x.size(2), x.size(3)}), fn, ": flow must be [B, 2, H, W]");
  TORCH_CHECK(flow.scalar_type() == x.scalar_type(), fn, ": dtype mismatch");
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31) && x.size(2) + 2 < (int64_t(1) << 30) &&
                  x.size(3) + 2 < (int64_t(1) << 30),
              fn, ": the map is too large for 32-bit indices");
}

// flow_warp_backward's operands: the forward's, and grad of x's shape
inline void check_flow_backward(const char* fn, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& flow) {
  check_flow_inputs(fn, x, flow);
  TORCH_CHECK(grad.sizes() == x.sizes(), fn, ": grad must have the shape of x");
}

}  // namespace warp
}  // namespace vpfast
