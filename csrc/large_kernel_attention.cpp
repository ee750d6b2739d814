// Schemas of the fused depthwise pair of large-kernel attention. Implementations:
// cpu/large_kernel_attention.cpp, cuda/large_kernel_attention.cu; fake kernels and autograd:
// vpfast/ops/large_kernel_attention.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // out = dw(dw(x, w0, b0, dilation0), w1, b1, dilation1), both stride 1 with "same" zero padding
  // dilation*(k//2). x: [B, C, H, W], w0: [C, 1, k0h, k0w], w1: [C, 1, k1h, k1w], b0, b1: [C] or None.
  m.def(
      "large_kernel_attention_forward(Tensor x, Tensor w0, Tensor? b0, Tensor w1, Tensor? b1, "
      "int[2] dilation0, int[2] dilation1) -> Tensor");
  // Returns (grad_x, grad_w0, grad_b0, grad_w1, grad_b1), empty where output_mask is false. The
  // intermediate map is recomputed per plane (needs b0). Weight/bias gradients are deterministic.
  m.def(
      "large_kernel_attention_backward(Tensor grad, Tensor x, Tensor w0, Tensor? b0, Tensor w1, "
      "int[2] dilation0, int[2] dilation1, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
