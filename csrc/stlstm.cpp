// Schemas of the fused ST-LSTM pointwise ops. Implementations: cpu/stlstm.cpp, cuda/stlstm.cu;
// fake kernels and autograd: vpfast/ops/stlstm.py. Shapes (C = hidden channels):
//   x_g [B, 7C, H, W] (optional; absent when h_g/m_g come from the merged convolutions), h_g [B, 4C, H, W],
//   m_g [B, 3C, H, W], c, m [B, C, H, W]; planes must be H*W-contiguous, batch/channel strides are free.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // Stage 1. Returns cm [B, 2C, H, W] (= [c_t, m_t]), o_part [B, C, H, W] (= o_x + o_h), act [B, 4C, H, W]
  // (i, f, i', f': with cm, c and m all that backward needs; it recovers g, g' from them, common/stlstm.h)
  // and delta [B, 2C, H, W] (= [i*g, i'*g']; empty unless with_delta).
  m.def(
      "stlstm_gates_forward(Tensor? x_g, Tensor h_g, Tensor m_g, Tensor c, Tensor m, float forget_bias, "
      "bool with_delta) -> (Tensor, Tensor, Tensor, Tensor)");
  // act, cm: the forward's outputs; c, m: its inputs. Returns (grad_x_g [empty unless has_x], grad_h_g,
  // grad_m_g, grad_c, grad_m).
  m.def(
      "stlstm_gates_backward(Tensor grad_cm, Tensor grad_o_part, Tensor? grad_delta, Tensor act, Tensor cm, "
      "Tensor c, Tensor m, bool has_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Stage 2. o = sigmoid(o_part + o_m), h = o*tanh(last) [+ (1-o)*highway]. Returns (h, o, tl), tl =
  // tanh(last) only with a highway (empty otherwise: backward recovers it as h / o).
  m.def("stlstm_output_forward(Tensor o_part, Tensor o_m, Tensor last, Tensor? highway) -> (Tensor, Tensor, Tensor)");
  // h_or_tl: the forward's h without highway, its tl with one. Returns (grad of o_part and o_m (the same),
  // grad_last, grad_highway [empty without highway]).
  m.def(
      "stlstm_output_backward(Tensor grad_h, Tensor o, Tensor h_or_tl, Tensor? highway) -> (Tensor, Tensor, "
      "Tensor)");
}
