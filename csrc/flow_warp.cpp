// Schemas of the flow warp ops. Implementations: cpu/flow_warp.cpp, cuda/flow_warp.cu;
// fake kernels and autograd: vpfast/ops/flow_warp.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // x: [B, C, H, W], flow: [B, 2, H, W] in pixels (channel 0 along W, channel 1 along H) -> [B, C, H, W].
  // border: clamp positions into the map (else zeros outside); align_corners only matters for maps of size 1.
  m.def("flow_warp_forward(Tensor x, Tensor flow, bool border, bool align_corners) -> Tensor");
  // Returns (grad_x, grad_flow); an entry that is not needed is empty.
  m.def(
      "flow_warp_backward(Tensor grad, Tensor x, Tensor flow, bool border, bool align_corners, bool need_x, "
      "bool need_flow) -> (Tensor, Tensor)");
}
