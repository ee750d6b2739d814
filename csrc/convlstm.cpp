// Schemas of the fused ConvLSTM pointwise op. Implementations: cpu/convlstm.cpp, cuda/convlstm.cu;
// fake kernels and autograd: vpfast/ops/convlstm.py. x_g (optional), h_g: [B, 4C, H, W] (i, f, g, o);
// c: [B, C, H, W]; planes must be H*W-contiguous, batch/channel strides are free.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // Returns (h, c_new, act [B, 3C, H, W] = i, f, o for backward, which recovers g from c, c_new and h, see
  // common/stlstm.h). tanh_c: h = o*tanh(c_new), else o*g.
  m.def("convlstm_forward(Tensor? x_g, Tensor h_g, Tensor c, float forget_bias, bool tanh_c) -> (Tensor, Tensor, Tensor)");
  // Either output gradient may be absent. Returns (grad_x_g [empty unless has_x], grad_h_g, grad_c).
  m.def(
      "convlstm_backward(Tensor? grad_h, Tensor? grad_c, Tensor act, Tensor c, Tensor c_new, Tensor h, "
      "bool has_x, bool tanh_c) -> (Tensor, Tensor, Tensor)");
}
