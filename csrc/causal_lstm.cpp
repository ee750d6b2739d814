// Schemas of the fused Causal LSTM (PredRNN++) pointwise ops. Implementations: cpu/causal_lstm.cpp,
// cuda/causal_lstm.cu; arithmetic: common/causal_lstm.h; fake kernels and autograd: vpfast/ops/causal_lstm.py.
// Shapes (C = hidden channels): every operand [B, kC, H, W] with H*W-contiguous planes (batch/channel strides
// are free). Gate orders are the reference's: x_g (conv_x) i, f, g, i', f', g', o; h_g i, f, g, o;
// c_g (conv_c) i, f, g; m_g (conv_m) i', f', m̂; c2m_g (conv_c2m) i', g', f', o.
#include <torch/library.h>

#include <array>

#include "common/compose.h"

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

// ---- whole steps: compositions of the stage ops and aten's convolutions --------------------------------------
// One Causal LSTM step (separate k x k convolutions, no LayerNorm) and one merged GHU step, forward and backward,
// each a single call. Why C++: at PredRNN++'s `small` preset (B=4, C=16, 16x16) a step's ~25 op calls cost
// ~5-8 us each from Python (argument parsing, OpOverload dispatch) plus the interpreter's own time, ~0.25 ms
// per cell step fwd+bwd against ~5 ms of work; from C++ each call costs ~1-2 us. The autograd node stays in
// Python (vpfast/nn/causal_lstm.py `_CausalStep`, `_GHUStep`); these ops are its forward and backward bodies.
// Registered once for every backend (CompositeExplicitAutograd): they call the stage ops through the
// dispatcher, so CPU, CUDA and Meta/fake tensors each reach their own kernels.
//
// causal_lstm_step: states h, c, m may be None = zero (the first step): their convolutions are skipped.
//   Returns (h_new, c_new, m_new, act1 [i, f], act2 [i', f', tanh(m̂)], o) — what backward needs besides the
//   inputs. tanh(conv_last([c_t, m_t])) is not kept: backward recomputes it.
// causal_lstm_step_backward: grads of (x, h, c, m, w_x, w_h, w_c, w_m, w_k, w_om, w_last) where output_mask
//   (11 bools, that order) asks and the input exists; an empty tensor otherwise (also for the gradient of a
//   weight whose input state was None: that gradient is zero).
TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  m.def(
      "causal_lstm_step(Tensor x, Tensor? h, Tensor? c, Tensor? m, Tensor w_x, Tensor w_h, Tensor w_c, Tensor w_m, "
      "Tensor w_k, Tensor w_om, Tensor w_last, int stride, int padding, float forget_bias) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "causal_lstm_step_backward(Tensor? grad_h, Tensor? grad_c, Tensor? grad_m, Tensor x, Tensor? h, Tensor? c, "
      "Tensor? m, Tensor c_new, Tensor m_new, Tensor act1, Tensor act2, Tensor o, Tensor w_x, Tensor w_h, "
      "Tensor w_c, Tensor w_m, Tensor w_k, Tensor w_om, Tensor w_last, int stride, int padding, bool[11] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GHU step with its merged [x, z] weight w [2C, in + C, k, k] (stride 1): z_t = σ(u) ⊙ tanh(p) + (1 − σ(u)) ⊙ z,
  // [p, u] = conv([x, z], w). Returns (z_new, σ(u), tanh(p)); z_new is channels_last when x is (the Causal LSTM
  // cells' CPU layout). Backward: grads of (x, z, w) where output_mask asks.
  m.def("causal_lstm_ghu_step(Tensor x, Tensor z, Tensor w, int padding) -> (Tensor, Tensor, Tensor)");
  m.def(
      "causal_lstm_ghu_step_backward(Tensor grad, Tensor x, Tensor z, Tensor w, Tensor sg, Tensor tp, int padding, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace vpfast {
namespace {

using namespace compose;

VPFAST_OP_HANDLE(cell_fwd, "vpfast::causal_lstm_cell_forward",
                 T3(const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, double))
VPFAST_OP_HANDLE(cell_bwd, "vpfast::causal_lstm_cell_backward",
                 T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool))
VPFAST_OP_HANDLE(memory_fwd, "vpfast::causal_lstm_memory_forward",
                 T3(const Tensor&, const Tensor&, const Tensor&, double))
VPFAST_OP_HANDLE(memory_bwd, "vpfast::causal_lstm_memory_backward",
                 T3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool))
VPFAST_OP_HANDLE(output_fwd, "vpfast::causal_lstm_output_forward", T3(const Tensor&, const Tensor&, const Tensor&))
VPFAST_OP_HANDLE(output_bwd, "vpfast::causal_lstm_output_backward", T2(const Tensor&, const Tensor&, const Tensor&))
VPFAST_OP_HANDLE(stlstm_out_fwd, "vpfast::stlstm_output_forward",
                 T3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&))
VPFAST_OP_HANDLE(stlstm_out_bwd, "vpfast::stlstm_output_backward",
                 T3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&))

// [B, K, H, W] channels_last as its [B*H*W, K] pixel matrix (a view); undefined when not channels_last
Tensor pixels(const Tensor& t) {
  if (!t.is_contiguous(at::MemoryFormat::ChannelsLast)) return {};
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

Tensor unpixels(const Tensor& mat, const Tensor& like) {
  return mat.view({like.size(0), like.size(2), like.size(3), mat.size(1)}).permute({0, 3, 1, 2});
}

// conv2d(cm, w) for a 1x1 weight: one matrix product over the pixels when cm is channels_last (the CPU runs a
// 1x1 convolution of channels_last maps through im2col, ~30-55 us a call at the `small` preset)
Tensor conv1x1(const Tensor& cm, const Tensor& w) {
  const Tensor mat = pixels(cm);
  if (!mat.defined()) return conv(cm, w, {1, 1}, {0, 0});
  return unpixels(at::mm(mat, w.view({w.size(0), w.size(1)}).t()), cm);
}

T2 conv1x1_backward(const Tensor& grad, const Tensor& cm, const Tensor& w, bool need_w) {
  const Tensor mat = pixels(cm);
  if (!mat.defined()) return conv_grads(grad, cm, w, {1, 1}, {0, 0}, true, need_w);
  const Tensor g = grad.permute({0, 2, 3, 1}).reshape({-1, grad.size(1)});
  const Tensor w2 = w.view({w.size(0), w.size(1)});
  return {unpixels(at::mm(g, w2), cm), need_w ? at::mm(g.t(), mat).view(w.sizes()) : Tensor()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> causal_lstm_step(
    const Tensor& x, const OptTensor& h, const OptTensor& c, const OptTensor& m, const Tensor& w_x,
    const Tensor& w_h, const Tensor& w_c, const Tensor& w_m, const Tensor& w_k, const Tensor& w_om,
    const Tensor& w_last, int64_t stride, int64_t padding, double forget_bias) {
  // below autograd: the stage ops' Python autograd bridges are not wanted here (the caller is the node)
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = w_h.size(0) / 4;
  const std::array<int64_t, 2> st{stride, stride}, pd{padding, padding};
  const Tensor x_g = conv(x, w_x, st, pd);
  const Tensor h_g = has(h) ? conv(*h, w_h, st, pd) : zeros_like_layout(x_g, 4 * C);
  const OptTensor c_g = has(c) ? OptTensor(conv(*c, w_c, st, pd)) : std::nullopt;
  const Tensor c_prev = has(c) ? *c : zeros_like_layout(x_g, C);
  auto [c_new, carry, act1] = cell_fwd().call(x_g, h_g, c_g, c_prev, forget_bias);
  const Tensor m_g = has(m) ? conv(*m, w_m, st, pd) : zeros_like_layout(x_g, 3 * C);
  const Tensor c2m_g = conv(c_new, w_k, st, pd);
  auto [m_new, o_part, act2] = memory_fwd().call(carry, m_g, c2m_g, forget_bias);
  const Tensor last = conv1x1(at::cat({c_new, m_new}, 1), w_last);
  const Tensor o_m = conv(m_new, w_om, st, pd);
  auto [h_new, o, tl] = output_fwd().call(o_part, o_m, last);
  return {h_new, c_new, m_new, act1, act2, o};
}

using Grads11 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Grads11 causal_lstm_step_backward(const OptTensor& grad_h, const OptTensor& grad_c, const OptTensor& grad_m,
                                  const Tensor& x, const OptTensor& h, const OptTensor& c, const OptTensor& m,
                                  const Tensor& c_new, const Tensor& m_new, const Tensor& act1, const Tensor& act2,
                                  const Tensor& o, const Tensor& w_x, const Tensor& w_h, const Tensor& w_c,
                                  const Tensor& w_m, const Tensor& w_k, const Tensor& w_om, const Tensor& w_last,
                                  int64_t stride, int64_t padding, std::array<bool, 11> need) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = c_new.size(1);
  const std::array<int64_t, 2> s{stride, stride}, p{padding, padding};
  const Tensor cm = at::cat({c_new, m_new}, 1);
  Tensor g_pre, g_last;
  if (!has(grad_h)) {  // h_t unused (e.g. the last step's upper states)
    g_pre = g_last = at::zeros_like(o);
  } else {
    const Tensor tl = conv1x1(cm, w_last).tanh_();
    std::tie(g_pre, g_last) = output_bwd().call(*grad_h, o, tl);
  }
  // o = tanh(o_part + conv_om(m_t)), last = conv_last([c_t, m_t]): both reach m_t, last also c_t
  auto [g_m_om, g_w_om] = conv_grads(g_pre, m_new, w_om, s, p, true, need[9]);
  auto [g_cm, g_w_last] = conv1x1_backward(g_last, cm, w_last, need[10]);
  const Tensor g_cn_last = g_cm.narrow(1, 0, C), g_mn_last = g_cm.narrow(1, C, C);
  Tensor g_mn = g_m_om + g_mn_last;
  if (has(grad_m)) g_mn = g_mn + *grad_m;
  auto [g_carry, g_mg, g_c2m] = memory_bwd().call(g_mn, g_pre, act2, m_new, true);
  g_mn.reset();
  Tensor g_m_prev, g_w_m;
  if (has(m)) std::tie(g_m_prev, g_w_m) = conv_grads(g_mg, *m, w_m, s, p, need[3], need[7]);
  auto [g_cn_k, g_w_k] = conv_grads(g_c2m, c_new, w_k, s, p, true, need[8]);
  Tensor g_cn = g_cn_k + g_cn_last;
  if (has(grad_c)) g_cn = g_cn + *grad_c;
  const Tensor c_prev = has(c) ? *c : at::zeros_like(c_new);
  auto [g_xg, g_hg, g_cg, g_c_direct] = cell_bwd().call(g_cn, g_carry, act1, c_new, c_prev, true, has(c));
  auto [g_x, g_w_x] = conv_grads(g_xg, x, w_x, s, p, need[0], need[4]);
  Tensor g_h_prev, g_w_h, g_c_prev, g_w_c;
  if (has(h)) std::tie(g_h_prev, g_w_h) = conv_grads(g_hg, *h, w_h, s, p, need[1], need[5]);
  if (has(c)) {
    Tensor g_c_conv;
    std::tie(g_c_conv, g_w_c) = conv_grads(g_cg, *c, w_c, s, p, need[2], need[6]);
    if (need[2]) g_c_prev = g_c_direct + g_c_conv;
  }
  return {out(g_x, x), out(g_h_prev, x), out(g_c_prev, x), out(g_m_prev, x), out(g_w_x, x), out(g_w_h, x),
          out(g_w_c, x), out(g_w_m, x), out(g_w_k, x), out(g_w_om, x), out(g_w_last, x)};
}

// the GHU's convolution layout: channels_last weights next to channels_last maps (the Causal LSTM cells' CPU
// layout; else oneDNN reorders the weight on every call); the copy is made again in backward rather than kept.
// Decided by x's layout alone, not its device, so that the Meta/fake run of this composition agrees with it.
bool ghu_channels_last(const Tensor& x) { return x.is_contiguous(at::MemoryFormat::ChannelsLast); }

T3 causal_lstm_ghu_step(const Tensor& x, const Tensor& z, const Tensor& w, int64_t padding) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = z.size(1);
  const bool cl = ghu_channels_last(x);
  const Tensor pu = conv(at::cat({x, z}, 1), cl ? w.contiguous(at::MemoryFormat::ChannelsLast) : w, {1, 1},
                       {padding, padding});
  // the kernel sums two pre-activations of the gate; the merged convolution gave the whole sum. The CPU kernel
  // reads contiguous H*W planes: a planar zero map is one copy fewer than a channels_last one
  auto [z_new, sg, tp] = stlstm_out_fwd().call(pu.narrow(1, C, C), at::zeros(z.sizes(), z.options()),
                                               pu.narrow(1, 0, C), z);
  if (cl) z_new = z_new.contiguous(at::MemoryFormat::ChannelsLast);  // the cells' CPU layout
  return {z_new, sg, tp};
}

T3 causal_lstm_ghu_step_backward(const Tensor& grad, const Tensor& x, const Tensor& z, const Tensor& w,
                                 const Tensor& sg, const Tensor& tp, int64_t padding, std::array<bool, 3> need) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = z.size(1);
  const bool cl = ghu_channels_last(x);
  auto [g_u, g_p, g_z] = stlstm_out_bwd().call(grad, sg, tp, z);
  const bool need_in = need[0] || need[1];
  Tensor g_pu;
  if (cl) {  // in the convolution's layout (else convolution_backward converts it): one copy, not two
    g_pu = at::empty({grad.size(0), 2 * C, grad.size(2), grad.size(3)},
                     grad.options().memory_format(at::MemoryFormat::ChannelsLast));
    g_pu.narrow(1, 0, C).copy_(g_p);
    g_pu.narrow(1, C, C).copy_(g_u);
  } else {
    g_pu = at::cat({g_p, g_u}, 1);
  }
  auto [g_xz, g_w] = conv_grads(g_pu, at::cat({x, z}, 1), cl ? w.contiguous(at::MemoryFormat::ChannelsLast) : w,
                                {1, 1}, {padding, padding}, need_in, need[2]);
  Tensor g_x, g_zz;
  if (need[0]) g_x = g_xz.narrow(1, 0, x.size(1));
  if (need[1]) g_zz = g_z + g_xz.narrow(1, x.size(1), C);
  return {out(g_x, x), out(g_zz, x), out(g_w, x)};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CompositeExplicitAutograd, m) {
  m.impl("causal_lstm_step", &vpfast::causal_lstm_step);
  m.impl("causal_lstm_step_backward", &vpfast::causal_lstm_step_backward);
  m.impl("causal_lstm_ghu_step", &vpfast::causal_lstm_ghu_step);
  m.impl("causal_lstm_ghu_step_backward", &vpfast::causal_lstm_ghu_step_backward);
}
