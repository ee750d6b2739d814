// Schemas of the fused MotionGRU pointwise ops. Implementations: cpu/motion_gru.cpp, cuda/motion_gru.cu;
// fake kernels and autograd: vpfast/ops/motion_gru.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // gates: [B, 2M, H, W] pre-activations of the update (channels 0..M-1) and reset (M..2M-1) convolutions;
  // f_prev, d_prev, o: [B, M, H, W]. motion_gru_reset -> σ(gates_r) ⊙ f_prev.
  m.def("motion_gru_reset(Tensor gates, Tensor f_prev) -> Tensor");
  // -> (grad_gates (update half 0), grad_f_prev)
  m.def("motion_gru_reset_backward(Tensor grad, Tensor gates, Tensor f_prev) -> (Tensor, Tensor)");
  // o: pre-activation of the output convolution. -> (F = F' + D, D) with u = σ(gates_u),
  // F' = f_prev (1 - u) + tanh(o) u, D = d_prev + 0.5 (f_prev - d_prev).
  m.def("motion_gru_update(Tensor gates, Tensor o, Tensor f_prev, Tensor d_prev) -> (Tensor, Tensor)");
  // -> (grad_gates (reset half 0), grad_o, grad_f_prev, grad_d_prev)
  m.def(
      "motion_gru_update_backward(Tensor grad_f, Tensor grad_d, Tensor gates, Tensor o, Tensor f_prev) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
