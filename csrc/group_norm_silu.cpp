// Schemas of the fused GroupNorm + SiLU ops. Implementations: cpu/group_norm_silu.cpp,
// cuda/group_norm_silu.cu; fake kernels and autograd: vpfast/ops/group_norm_silu.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // x: [N, C, *] (NCHW-contiguous, or 4-D channels_last; other layouts are made contiguous), C % groups == 0;
  // weight, bias: [C] or None. Returns y = silu(group_norm(x)) in x's memory format, and the per-(sample,
  // group) statistics mean, rstd: [N, groups] (x's dtype) that the backward pass needs.
  m.def("group_norm_silu_forward(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias); an output whose output_mask entry is false (or whose parameter
  // is None) is an empty tensor. grad_weight/grad_bias are summed over the batch in a fixed order.
  m.def("group_norm_silu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
