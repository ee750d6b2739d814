// Schemas of the depthwise convolution ops. Implementations: cpu/depthwise_conv2d.cpp,
// cuda/depthwise_conv2d.cu; fake kernels and autograd: vpfast/ops/depthwise_conv2d.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // x: [B, C, H, W], weight: [C, 1, kh, kw], bias: [C] or None; stride, padding, dilation: (h, w).
  m.def(
      "depthwise_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias); an entry is an empty tensor when its output_mask is false.
  // grad_weight and grad_bias are reduced over the batch in a fixed order (run-to-run identical).
  m.def(
      "depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
