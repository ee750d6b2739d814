// Schemas of the fused Causal LSTM (PredRNN++) pointwise ops. Implementations: cpu/causal_lstm.cpp,
// cuda/causal_lstm.cu; arithmetic: common/causal_lstm.h; fake kernels and autograd: vpfast/ops/causal_lstm.py.
// Shapes (C = hidden channels): every operand [B, kC, H, W] with H*W-contiguous planes (batch/channel strides
// are free). Gate orders are the reference's: x_g (conv_x) i, f, g, i', f', g', o; h_g i, f, g, o;
// c_g (conv_c) i, f, g; m_g (conv_m) i', f', m̂; c2m_g (conv_c2m) i', g', f', o.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // Stage 1. Returns c_new [B, C, H, W], carry ([B, 4C, H, W] = [i'_x, f'_x, g'_x, o_x + o_h] with x_g,
  // [B, C, H, W] = o_h without) and act [B, 2C, H, W] = [i, f] (backward recovers g from c_new and c).
  m.def(
      "causal_lstm_cell_forward(Tensor? x_g, Tensor h_g, Tensor? c_g, Tensor c, float forget_bias) -> (Tensor, "
      "Tensor, Tensor)");
  // Returns (grad_x_g [empty unless has_x], grad_h_g, grad_c_g [empty unless has_c], grad_c).
  m.def(
      "causal_lstm_cell_backward(Tensor grad_c_new, Tensor grad_carry, Tensor act, Tensor c_new, Tensor c, "
      "bool has_x, bool has_c) -> (Tensor, Tensor, Tensor, Tensor)");
  // Stage 2. Returns m_new [B, C, H, W], o_part = carry[o] + c2m_g[o] [B, C, H, W] and act [B, 3C, H, W] =
  // [i', f', tanh(m̂)] (backward recovers g' from m_new).
  m.def("causal_lstm_memory_forward(Tensor carry, Tensor m_g, Tensor c2m_g, float forget_bias) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_carry [4C if carry_x else C], grad_m_g, grad_c2m_g).
  m.def(
      "causal_lstm_memory_backward(Tensor grad_m_new, Tensor grad_o_part, Tensor act, Tensor m_new, bool carry_x) "
      "-> (Tensor, Tensor, Tensor)");
  // Stage 3. o = tanh(o_part + o_m), tl = tanh(last), h = o * tl. Returns (h, o, tl).
  m.def("causal_lstm_output_forward(Tensor o_part, Tensor o_m, Tensor last) -> (Tensor, Tensor, Tensor)");
  // Returns (grad of o_part and o_m (the same), grad_last).
  m.def("causal_lstm_output_backward(Tensor grad_h, Tensor o, Tensor tl) -> (Tensor, Tensor)");
}
