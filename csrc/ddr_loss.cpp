// Schemas of the DDR loss ops. Implementations: cpu/ddr_loss.cpp, cuda/ddr_loss.cu (not ddr_loss_forward_grad);
// fake kernels and autograd: vpfast/ops/ddr_loss.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // pred, target: [B, T, C, H, W] (T >= 3), same shape/dtype/device. Returns the scalar loss and the
  // per-row statistics [B, T-1, 6] that the backward pass needs.
  m.def("ddr_loss_forward(Tensor pred, Tensor target, float tau, float eps) -> (Tensor, Tensor)");
  // Returns (grad_pred, grad_target); grad_target is empty unless need_target.
  m.def(
      "ddr_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor stats, float tau, float eps, "
      "bool need_target) -> (Tensor, Tensor)");
  // CPU only (the cpp backend under autograd): the loss and its gradients for an incoming gradient of 1, from
  // one pass (grad_target empty unless need_target). The backward pass scales them by the real gradient.
  m.def(
      "ddr_loss_forward_grad(Tensor pred, Tensor target, float tau, float eps, bool need_target) -> "
      "(Tensor, Tensor, Tensor)");
}
