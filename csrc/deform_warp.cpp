// Schemas of the deformable warp ops. Implementations: cpu/deform_warp.cpp, cuda/deform_warp.cu;
// fake kernels and autograd: vpfast/ops/deform_warp.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // x: [B, C, H, W], offset: [B, 2k², H, W] (all dy, then all dx), mask: [B, k², H, W], weight: [O, C, k, k]
  // (k odd) -> [B, O, H, W].
  m.def("deform_warp_forward(Tensor x, Tensor offset, Tensor mask, Tensor weight) -> Tensor");
  // Returns (grad_x, grad_offset, grad_mask, grad_weight); an entry whose needs[i] is false is empty.
  m.def(
      "deform_warp_backward(Tensor grad, Tensor x, Tensor offset, Tensor mask, Tensor weight, bool[4] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
