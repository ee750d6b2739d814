// Compiled compositions behind MIM's one-node steps (vpfast/nn/_mim_step.py): the ST-LSTM layer 0, a MIM block
// and a MIM-N step, forward and backward, each one op call. Why C++: at MIM's `small` preset (B=8, C=16,
// 16x16) a MIM block step's ~40 tensor calls cost ~5-8 us each from Python plus the interpreter's own time; from
// C++ each costs ~1-2 us. The arithmetic, order of operations and what backward keeps are those of the Python
// bodies they replace (the fused stlstm_* / convlstm_* stages, aten's convolutions; docs/performance.md).
// Registered once for every backend (CompositeExplicitAutograd): the stage ops are called through the
// dispatcher, so CPU, CUDA and Meta (fake) tensors each reach their own kernels. Helpers: common/compose.h.
//
// Gradients come back in argument order where output_mask asks, an empty tensor elsewhere; the two inputs of one
// merged convolution whose gradients are one buffer (the MIM block's D and c_{t-1}, MIM-N's x and h) share one
// output, [B, C1 + C2, H, W], that the caller splits (two outputs may not alias each other).
#include <torch/library.h>

#include <array>

#include "common/compose.h"

TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  // ST-LSTM (MIM's layer 0) with merged convolutions over [x, h] (w_xh: i, f, g, o) and [x, m] (w_xm: i', f',
  // g'), conv_o (stride 1) and conv_last over [c', m']. Returns (h', cm = [c', m'], act, o).
  m.def(
      "mim_stlstm_step(Tensor x, Tensor h, Tensor c, Tensor m, Tensor w_xh, Tensor w_xm, Tensor w_o, Tensor w_last, "
      "int[2] stride, int[2] padding, float forget_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mim_stlstm_step_backward(Tensor? grad_h, Tensor? grad_c, Tensor? grad_m, Tensor x, Tensor h, Tensor c, "
      "Tensor m, Tensor w_xh, Tensor w_xm, Tensor w_o, Tensor w_last, Tensor act, Tensor cm, Tensor o, "
      "Tensor h_new, int[2] stride, int[2] padding, bool[8] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
  // MIM block: w_x, w_s gates i, f, g, o; w_t (conv_t_cc) i, g, o; w_mims over [D, c_{t-1}] i, f, g, o; ct [2C, H,
  // W] and oc [C, H, W] the MIM-S peepholes. Returns (h', c', sm = [S', m'], act, o1, t_mem, ia, ga, o2).
  // diff_h, h, c, s may be None: zero (a loop's first step); the convolutions of zero inputs are skipped.
  m.def(
      "mim_block_step(Tensor x, Tensor? diff_h, Tensor? h, Tensor? c, Tensor m, Tensor? s, Tensor w_x, Tensor w_s, "
      "Tensor w_t, Tensor w_mims, Tensor ct, Tensor oc, Tensor w_last, int[2] stride, int[2] padding, "
      "float forget_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mim_block_step_backward(Tensor? grad_h, Tensor? grad_c, Tensor? grad_m, Tensor? grad_s, Tensor x, "
      "Tensor? diff_h, Tensor? h, Tensor? c, Tensor m, Tensor? s, Tensor w_x, Tensor w_s, Tensor w_t, Tensor w_mims, "
      "Tensor ct, Tensor oc, Tensor w_last, Tensor act, Tensor sm, Tensor o1, Tensor t_mem, Tensor ia, Tensor ga, "
      "Tensor o2, Tensor h_new, Tensor c_new, int[2] stride, int[2] padding, bool[13] output_mask) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // MIM-N: the peephole LSTM with its merged weight w over [x, h] (i, f, g, o). Returns (h', c', act, o).
  m.def(
      "mim_n_step(Tensor x, Tensor h, Tensor c, Tensor w, Tensor ct, Tensor oc, int[2] stride, int[2] padding, "
      "float forget_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mim_n_step_backward(Tensor? grad_h, Tensor? grad_c, Tensor x, Tensor h, Tensor c, Tensor w, Tensor ct, "
      "Tensor oc, Tensor act, Tensor c_new, Tensor o, Tensor h_new, int[2] stride, int[2] padding, "
      "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace vpfast {
namespace {

using namespace compose;
using at::IntArrayRef;

VPFAST_OP_HANDLE(gates_fwd, "vpfast::stlstm_gates_forward",
                 T4(const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool))
VPFAST_OP_HANDLE(gates_bwd, "vpfast::stlstm_gates_backward",
                 T5(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                    const Tensor&, bool))
VPFAST_OP_HANDLE(output_fwd, "vpfast::stlstm_output_forward",
                 T3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&))
VPFAST_OP_HANDLE(output_bwd, "vpfast::stlstm_output_backward",
                 T3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&))
VPFAST_OP_HANDLE(convlstm_fwd, "vpfast::convlstm_forward",
                 T3(const OptTensor&, const Tensor&, const Tensor&, double, bool))
VPFAST_OP_HANDLE(convlstm_bwd, "vpfast::convlstm_backward",
                 T3(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    bool, bool))

const std::array<int64_t, 2> kOne{1, 1}, kZero{0, 0};

Tensor ch(const Tensor& t, int64_t from, int64_t n) { return t.narrow(1, from, n); }

// Gradients of conv(cat(parts), w): (grad of each part where asked, grad of w where asked). When only the last
// part needs a gradient (layer 0's first input is a data frame), its input gradient is computed over its own
// channels only.
std::pair<std::vector<Tensor>, Tensor> cat_conv_grads(const Tensor& grad, const std::vector<Tensor>& parts,
                                                      const Tensor& w, IntArrayRef stride, IntArrayRef padding,
                                                      const std::vector<bool>& need, bool need_w) {
  const Tensor cat = parts.size() > 1 ? at::cat(parts, 1) : parts[0];
  std::vector<Tensor> gis(parts.size());
  bool any = false, only_last = parts.size() > 1 && need.back();
  for (size_t k = 0; k < parts.size(); ++k) {
    any = any || need[k];
    if (k + 1 < parts.size() && need[k]) only_last = false;
  }
  Tensor gw;
  if (only_last) {
    gw = std::get<1>(conv_grads(grad, cat, w, stride, padding, false, need_w));
    const int64_t start = cat.size(1) - parts.back().size(1);
    gis.back() = std::get<0>(conv_grads(grad, parts.back(), w.narrow(1, start, parts.back().size(1)).contiguous(),
                                        stride, padding, true, false));
    return {gis, gw};
  }
  Tensor gi;
  std::tie(gi, gw) = conv_grads(grad, cat, w, stride, padding, any, need_w);
  int64_t at = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    if (need[k]) gis[k] = gi.narrow(1, at, parts[k].size(1));
    at += parts[k].size(1);
  }
  return {gis, gw};
}

// the Hadamard peepholes q[:, :C] += s ⊙ ct[:C], q[:, C:2C] += s ⊙ ct[C:], in place (q is not kept)
void add_peepholes(const Tensor& q, const Tensor& s, const Tensor& ct, int64_t C) {
  ch(q, 0, C).addcmul_(s, ct.narrow(0, 0, C));
  ch(q, C, C).addcmul_(s, ct.narrow(0, C, C));
}

// their gradients wrt s and ct, given the gradient of q
T2 peephole_grads(const Tensor& g_q, const Tensor& s, const Tensor& ct, int64_t C, bool need_s, bool need_ct) {
  const Tensor g_i = ch(g_q, 0, C), g_f = ch(g_q, C, C);
  Tensor g_s, g_ct;
  if (need_s) g_s = at::addcmul(g_i * ct.narrow(0, 0, C), g_f, ct.narrow(0, C, C));
  if (need_ct) g_ct = at::cat({(g_i * s).sum(0), (g_f * s).sum(0)}, 0);
  return {g_s, g_ct};
}

// ---- ST-LSTM (layer 0) -----------------------------------------------------------------------------------------
T4 mim_stlstm_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& m, const Tensor& w_xh,
                   const Tensor& w_xm, const Tensor& w_o, const Tensor& w_last, IntArrayRef stride,
                   IntArrayRef padding, double forget_bias) {
  at::AutoDispatchBelowADInplaceOrView below;
  const Tensor h_g = conv(at::cat({x, h}, 1), w_xh, stride, padding);
  const Tensor m_g = conv(at::cat({x, m}, 1), w_xm, stride, padding);
  auto [cm, o_part, act, unused] = gates_fwd().call(std::nullopt, h_g, m_g, c, m, forget_bias, false);
  const Tensor o_m = conv(cm, w_o, kOne, padding);
  const Tensor last = conv(cm, w_last, kOne, kZero);
  auto [h_new, o, tl] = output_fwd().call(o_part, o_m, last, std::nullopt);
  return {h_new, cm, act, o};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mim_stlstm_step_backward(
    const OptTensor& grad_h, const OptTensor& grad_c, const OptTensor& grad_m, const Tensor& x, const Tensor& h,
    const Tensor& c, const Tensor& m, const Tensor& w_xh, const Tensor& w_xm, const Tensor& w_o,
    const Tensor& w_last, const Tensor& act, const Tensor& cm, const Tensor& o, const Tensor& h_new,
    IntArrayRef stride, IntArrayRef padding, std::array<bool, 8> need) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = c.size(1);
  const Tensor g_h = has(grad_h) ? *grad_h : at::zeros_like(h_new);
  auto [g_pre, g_last, unused] = output_bwd().call(g_h, o, h_new, std::nullopt);
  auto [g_cm, g_wo] = conv_grads(g_pre, cm, w_o, kOne, padding, true, need[6]);
  auto [g_cm_last, g_wlast] = conv_grads(g_last, cm, w_last, kOne, kZero, true, need[7]);
  g_cm.add_(g_cm_last);
  g_cm_last.reset();
  if (has(grad_c)) ch(g_cm, 0, C).add_(*grad_c);
  if (has(grad_m)) ch(g_cm, C, C).add_(*grad_m);
  auto [g_xg_unused, g_hg, g_mg, g_cp, g_mp] = gates_bwd().call(g_cm, g_pre, std::nullopt, act, cm, c, m, false);
  g_cm.reset();
  auto [g_xh, g_wxh] = cat_conv_grads(g_hg, {x, h}, w_xh, stride, padding, {need[0], need[1]}, need[4]);
  g_hg.reset();
  auto [g_xm, g_wxm] = cat_conv_grads(g_mg, {x, m}, w_xm, stride, padding, {need[0], need[3]}, need[5]);
  Tensor g_x = need[0] ? g_xh[0] + g_xm[0] : Tensor();
  Tensor g_m = need[3] ? g_mp + g_xm[1] : Tensor();
  return {out(g_x, x), out(g_xh[1], x), out(need[2] ? g_cp : Tensor(), x), out(g_m, x), out(g_wxh, x),
          out(g_wxm, x), out(g_wo, x), out(g_wlast, x)};
}

// ---- MIM block -------------------------------------------------------------------------------------------------
// [D, c_{t-1}], the input of MIM-S's merged convolution, with a zero map for an absent one (like: a map in the
// step's layout; w_mims: [4C, C_D + C, k, k])
Tensor dc_input(const OptTensor& diff_h, const OptTensor& c, const Tensor& like, const Tensor& w_mims) {
  const int64_t C = w_mims.size(0) / 4;
  return at::cat({has(diff_h) ? *diff_h : zeros_like_layout(like, w_mims.size(1) - C),
                  has(c) ? *c : zeros_like_layout(like, C)}, 1);
}

using T9 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

T9 mim_block_step(const Tensor& x, const OptTensor& diff_h, const OptTensor& h, const OptTensor& c, const Tensor& m,
                  const OptTensor& s, const Tensor& w_x, const Tensor& w_s, const Tensor& w_t, const Tensor& w_mims,
                  const Tensor& ct, const Tensor& oc, const Tensor& w_last, IntArrayRef stride, IntArrayRef padding,
                  double forget_bias) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = w_x.size(0) / 4;
  const Tensor x_g = conv(x, w_x, stride, padding);  // i, f, g, o
  const Tensor s_g = conv(m, w_s, stride, padding);  // i, f, g, o
  const Tensor t_g = has(h) ? conv(*h, w_t, stride, padding) : Tensor();  // i, g, o; none of a zero h
  // MIM-S gates i, f, g, o
  Tensor q = has(diff_h) || has(c) ? conv(dc_input(diff_h, c, x_g, w_mims), w_mims, stride, padding)
                                   : zeros_like_layout(x_g, 4 * C);
  if (has(s)) add_peepholes(q, *s, ct, C);
  Tensor m_g = at::add(ch(x_g, 0, 3 * C), ch(s_g, 0, 3 * C));
  // c-half of the ST-LSTM gates: the MIM-S cell (S); m-half: the zig-zag memory
  auto [sm, o_mims, act, unused] =
      gates_fwd().call(std::nullopt, q, m_g, has(s) ? *s : zeros_like_layout(x_g, C), m, forget_bias, false);
  q.reset();
  m_g.reset();
  const Tensor s_new = ch(sm, 0, C), m_new = ch(sm, C, C);
  auto [t_mem, o1, unused1] = output_fwd().call(o_mims, s_new * oc, s_new, std::nullopt);
  const Tensor ia = t_g.defined() ? at::add(ch(x_g, 0, C), ch(t_g, 0, C)).sigmoid_() : ch(x_g, 0, C).sigmoid();
  const Tensor ga = t_g.defined() ? at::add(ch(x_g, 2 * C, C), ch(t_g, C, C)).tanh_() : ch(x_g, 2 * C, C).tanh();
  const Tensor c_new = at::addcmul(t_mem, ia, ga);
  const Tensor last = conv(at::cat({c_new, m_new}, 1), w_last, kOne, kZero);
  const Tensor o_part = t_g.defined() ? at::add(ch(x_g, 3 * C, C), ch(t_g, 2 * C, C)) : ch(x_g, 3 * C, C);
  auto [h_new, o2, unused2] = output_fwd().call(o_part, ch(s_g, 3 * C, C), last, std::nullopt);
  return {h_new, c_new, sm, act, o1, t_mem, ia, ga, o2};
}

using T12 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                       Tensor>;

// (x, [D, c_{t-1}], h, m, s, w_x, w_s, w_t, w_mims, ct, oc, w_last)
T12 mim_block_step_backward(const OptTensor& grad_h, const OptTensor& grad_c, const OptTensor& grad_m,
                            const OptTensor& grad_s, const Tensor& x, const OptTensor& diff_h, const OptTensor& h,
                            const OptTensor& c, const Tensor& m, const OptTensor& s, const Tensor& w_x, const Tensor& w_s,
                            const Tensor& w_t, const Tensor& w_mims, const Tensor& ct, const Tensor& oc,
                            const Tensor& w_last, const Tensor& act, const Tensor& sm, const Tensor& o1,
                            const Tensor& t_mem, const Tensor& ia, const Tensor& ga, const Tensor& o2,
                            const Tensor& h_new, const Tensor& c_new, IntArrayRef stride, IntArrayRef padding,
                            std::array<bool, 13> need) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = w_x.size(0) / 4;
  const Tensor s_prev = has(s) ? *s : at::zeros_like(m);
  const Tensor s_new = ch(sm, 0, C), m_new = ch(sm, C, C);
  const Tensor g_h = has(grad_h) ? *grad_h : at::zeros_like(h_new);
  // h' = σ(o_x + o_t + o_s) ⊙ tanh(conv_last([c', m']))
  auto [g_o, g_last, unused] = output_bwd().call(g_h, o2, h_new, std::nullopt);
  auto [g_cm_last, g_wlast] = conv_grads(g_last, at::cat({c_new, m_new}, 1), w_last, kOne, kZero, true, need[12]);
  const Tensor g_cn = plus(ch(g_cm_last, 0, C), grad_c);
  const Tensor g_mn = plus(ch(g_cm_last, C, C), grad_m);
  // c' = T + σ(a_i) ⊙ tanh(a_g)
  const Tensor g_ai = g_cn * ga * ia * (1 - ia);
  const Tensor g_ag = g_cn * ia * (1 - ga * ga);
  // T = σ(o_mims + S' ⊙ oc) ⊙ tanh(S')
  auto [g_o1, g_sn, unused1] = output_bwd().call(g_cn, o1, t_mem, std::nullopt);
  g_sn = plus(g_sn.addcmul_(g_o1, oc), grad_s);
  const Tensor g_oc = need[11] ? (g_o1 * s_new).sum(0) : Tensor();
  auto [g_xg_unused, g_q, g_mg, g_s_prev, g_m_prev] =
      gates_bwd().call(at::cat({g_sn, g_mn}, 1), g_o1, std::nullopt, act, sm, s_prev, m, false);
  // a zero s: no peephole terms (their gradients are zero)
  auto [g_s_peep, g_ct] = peephole_grads(g_q, s_prev, ct, C, need[5], need[10] && has(s));
  const Tensor g_s_out = need[5] ? g_s_prev + g_s_peep : Tensor();
  Tensor g_dc, g_wmims;
  if (has(diff_h) || has(c))
    std::tie(g_dc, g_wmims) =
        conv_grads(g_q, dc_input(diff_h, c, m, w_mims), w_mims, stride, padding, need[1] || need[3], need[9]);
  // the three gate convolutions' gradients: x (i, f, g, o) feeds m, c' and h'; m (i, f, g, o) feeds m and h';
  // h_{t-1} (i, g, o) feeds c' and h'
  Tensor g_xg = at::cat({ch(g_mg, 0, C) + g_ai, ch(g_mg, C, C), ch(g_mg, 2 * C, C) + g_ag, g_o}, 1);
  auto [g_x, g_wx] = conv_grads(g_xg, x, w_x, stride, padding, need[0], need[6]);
  g_xg.reset();
  auto [g_m2, g_ws] = conv_grads(at::cat({g_mg, g_o}, 1), m, w_s, stride, padding, need[4], need[7]);
  Tensor g_hp, g_wt;
  if (has(h))
    std::tie(g_hp, g_wt) = conv_grads(at::cat({g_ai, g_ag, g_o}, 1), *h, w_t, stride, padding, need[2], need[8]);
  const Tensor g_m = need[4] ? g_m_prev + g_m2 : Tensor();
  return {out(g_x, x),  out(g_dc, x),    out(g_hp, x), out(g_m, x),  out(g_s_out, x), out(g_wx, x),
          out(g_ws, x), out(g_wt, x), out(g_wmims, x), out(g_ct, x), out(g_oc, x), out(g_wlast, x)};
}

// ---- MIM-N -----------------------------------------------------------------------------------------------------
// The cell update is convlstm (its own h, which lacks the peephole, is not used), the output gate stlstm_output.
T4 mim_n_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w, const Tensor& ct,
              const Tensor& oc, IntArrayRef stride, IntArrayRef padding, double forget_bias) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = c.size(1);
  const Tensor q = conv(at::cat({x, h}, 1), w, stride, padding);
  add_peepholes(q, c, ct, C);
  auto [h_unused, c_new, act] = convlstm_fwd().call(std::nullopt, q, c, forget_bias, true);
  auto [h_new, o, unused] = output_fwd().call(ch(q, 3 * C, C), c_new * oc, c_new, std::nullopt);
  return {h_new, c_new, act, o};
}

// ([x, h], c, w, ct, oc)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mim_n_step_backward(
    const OptTensor& grad_h, const OptTensor& grad_c, const Tensor& x, const Tensor& h, const Tensor& c,
    const Tensor& w, const Tensor& ct, const Tensor& oc, const Tensor& act, const Tensor& c_new, const Tensor& o,
    const Tensor& h_new, IntArrayRef stride, IntArrayRef padding, std::array<bool, 6> need) {
  at::AutoDispatchBelowADInplaceOrView below;
  const int64_t C = c.size(1);
  Tensor g_cn = has(grad_c) ? *grad_c : Tensor(), g_o;
  if (has(grad_h)) {
    Tensor g_cn_h;
    std::tie(g_o, g_cn_h, std::ignore) = output_bwd().call(*grad_h, o, h_new, std::nullopt);
    g_cn = plus(g_cn_h.addcmul_(g_o, oc), g_cn);
  }
  const Tensor g_oc = need[5] && g_o.defined() ? (g_o * c_new).sum(0) : Tensor();
  if (!g_cn.defined()) g_cn = at::zeros_like(c_new);
  // convlstm's h is not an output here (no gradient): with tanh_c its backward does not read h, so c_new
  // stands in for it
  auto [g_xg_unused, g_q, g_cp] = convlstm_bwd().call(std::nullopt, g_cn, act, c, c_new, c_new, false, true);
  if (g_o.defined()) ch(g_q, 3 * C, C).copy_(g_o);
  auto [g_c_peep, g_ct] = peephole_grads(g_q, c, ct, C, need[2], need[4]);
  auto [g_xh, g_w] = conv_grads(g_q, at::cat({x, h}, 1), w, stride, padding, need[0] || need[1], need[3]);
  const Tensor g_c = need[2] ? g_cp + g_c_peep : Tensor();
  return {out(g_xh, x), out(g_c, x), out(g_w, x), out(g_ct, x), out(g_oc, x)};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CompositeExplicitAutograd, m) {
  m.impl("mim_stlstm_step", &vpfast::mim_stlstm_step);
  m.impl("mim_stlstm_step_backward", &vpfast::mim_stlstm_step_backward);
  m.impl("mim_block_step", &vpfast::mim_block_step);
  m.impl("mim_block_step_backward", &vpfast::mim_block_step_backward);
  m.impl("mim_n_step", &vpfast::mim_n_step);
  m.impl("mim_n_step_backward", &vpfast::mim_n_step_backward);
}
