// Causal LSTM (PredRNN++, MODELS.md §10) pointwise arithmetic and host-side argument handling, shared by
// csrc/cpu/causal_lstm.cpp and csrc/cuda/causal_lstm.cu. Layout helpers (strided planes, operand checks,
// output allocation) are the fused LSTMs' own, common/lstm_planes.h.
//
// The step's pointwise work runs in three stages between its convolutions:
//   cell    i = σ(pi), f = σ(pf + fb), g = tanh(pg), c_t = f c + i g, where each pre-activation is the sum
//           of the present operands (x_g: conv_x [7C], h_g [4C], c_g: conv_c [3C]); also writes the
//           "carry" the memory stage reads: [i'_x, f'_x, g'_x, o_x + o_h] with x_g, [o_h] without
//   memory  i' = σ(qi), f' = σ(qf + fb), g' = tanh(qg), t = tanh(m̂), m_t = f' t + i' g' (an LSTM memory
//           update whose previous memory is t), o_part = carry[o] + c2m[o]
//   output  o = tanh(o_part + o_m), tl = tanh(last), h = o tl
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/lstm_planes.h"

namespace vpfast {
namespace causal {

// memory stage backward from the saved i', f', t and m_t: the pre-activation gradients and that of m̂
template <typename T>
VPFAST_HD void memory_backward(T i, T f, T t, T m_new, T gm, T& gqi, T& gqf, T& gqg, T& gmhat) {
  T gt;
  lstm::stlstm_cell_backward<T>(i, f, t, m_new, gm, T(0), gqi, gqf, gqg, gt);
  gmhat = gt * (T(1) - t * t);
}

// output stage: o = tanh(po) (tanh, not σ: o can be exactly 0, so tanh(last) is saved, not recovered as h/o)
template <typename T>
VPFAST_HD void output_forward(T po, T last, T& o, T& tl, T& h) {
  o = fast_tanh<T>(po);
  tl = fast_tanh<T>(last);
  h = o * tl;
}

template <typename T>
VPFAST_HD void output_backward(T gh, T o, T tl, T& gpo, T& glast) {
  gpo = gh * tl * (T(1) - o * o);
  glast = gh * o * (T(1) - tl * tl);
}

// ---- host side: checks, planar operands and outputs (alloc: cpu::lstm_alloc or lstm::empty_alloc) ---------
using lstm::check_operand;
using lstm::output;
using lstm::planar;
using lstm::present;
using lstm::Sizes;
using lstm::sizes_of;

inline void check_state(const char* op, const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4, op, ": ", name, " must be [B, C, H, W], got ", c.sizes());
}

inline int64_t carry_slots(bool carry_x) { return carry_x ? 4 : 1; }

struct CellForward : Sizes {
  bool has_x = false, has_c = false;
  at::Tensor x_g, h_g, c_g, c;     // operands
  at::Tensor c_new, carry, act;    // outputs
};
template <typename Alloc>
CellForward cell_forward_args(const std::optional<at::Tensor>& x_g, const at::Tensor& h_g,
                              const std::optional<at::Tensor>& c_g, const at::Tensor& c, const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_cell_forward";
  CellForward a;
  a.has_x = present(x_g), a.has_c = present(c_g);
  check_state(op, c, "c");
  check_operand(op, h_g, c, 4, "h_g");
  if (a.has_x) check_operand(op, *x_g, c, 7, "x_g");
  if (a.has_c) check_operand(op, *c_g, c, 3, "c_g");
  static_cast<Sizes&>(a) = sizes_of(c);
  a.h_g = planar(h_g), a.c = planar(c);
  if (a.has_x) a.x_g = planar(*x_g);
  if (a.has_c) a.c_g = planar(*c_g);
  a.c_new = output(alloc, a, 1, a.c);
  a.carry = output(alloc, a, carry_slots(a.has_x), a.c);
  a.act = output(alloc, a, 2, a.c);
  return a;
}

struct CellBackward : Sizes {
  bool has_x = false, has_c = false;
  at::Tensor gcn, gcar, act, cn, c;  // operands: grad_c_new, grad_carry, act, c_new, c
  at::Tensor gx, gh, gcg, gc;        // outputs: grad_x_g, grad_h_g, grad_c_g, grad_c
};
template <typename Alloc>
CellBackward cell_backward_args(const at::Tensor& grad_c_new, const at::Tensor& grad_carry, const at::Tensor& act,
                                const at::Tensor& c_new, const at::Tensor& c, bool has_x, bool has_c,
                                const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_cell_backward";
  CellBackward a;
  a.has_x = has_x, a.has_c = has_c;
  check_state(op, c, "c");
  check_operand(op, grad_c_new, c, 1, "grad_c_new");
  check_operand(op, grad_carry, c, carry_slots(has_x), "grad_carry");
  check_operand(op, act, c, 2, "act");
  check_operand(op, c_new, c, 1, "c_new");
  static_cast<Sizes&>(a) = sizes_of(c);
  a.gcn = planar(grad_c_new), a.gcar = planar(grad_carry), a.act = planar(act), a.cn = planar(c_new);
  a.c = planar(c);
  a.gx = output(alloc, a, 7, a.c, has_x);
  a.gh = output(alloc, a, 4, a.c);
  a.gcg = output(alloc, a, 3, a.c, has_c);
  a.gc = output(alloc, a, 1, a.c);
  return a;
}

struct MemoryForward : Sizes {
  bool carry_x = false;
  at::Tensor carry, m_g, c2m_g;       // operands
  at::Tensor m_new, o_part, act;      // outputs (act: i', f', t)
};
template <typename Alloc>
MemoryForward memory_forward_args(const at::Tensor& carry, const at::Tensor& m_g, const at::Tensor& c2m_g,
                                  const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_memory_forward";
  MemoryForward a;
  check_state(op, m_g, "m_g");
  TORCH_CHECK(m_g.size(1) % 3 == 0, op, ": m_g must be [B, 3C, H, W], got ", m_g.sizes());
  const at::Tensor ref = m_g.narrow(1, 0, m_g.size(1) / 3);  // a [B, C, H, W] view for the shape checks
  TORCH_CHECK(carry.dim() == 4 && (carry.size(1) == ref.size(1) || carry.size(1) == 4 * ref.size(1)), op,
              ": carry must be [B, C, H, W] or [B, 4C, H, W] for m_g of shape ", m_g.sizes(), ", got ",
              carry.sizes());
  a.carry_x = carry.size(1) == 4 * ref.size(1) && ref.size(1) > 0;
  check_operand(op, carry, ref, carry_slots(a.carry_x), "carry");
  check_operand(op, c2m_g, ref, 4, "c2m_g");
  static_cast<Sizes&>(a) = sizes_of(ref);
  a.carry = planar(carry), a.m_g = planar(m_g), a.c2m_g = planar(c2m_g);
  a.m_new = output(alloc, a, 1, a.m_g);
  a.o_part = output(alloc, a, 1, a.m_g);
  a.act = output(alloc, a, 3, a.m_g);
  return a;
}

struct MemoryBackward : Sizes {
  bool carry_x = false;
  at::Tensor gm, gop, act, mn;       // operands: grad_m_new, grad_o_part, act, m_new
  at::Tensor gcar, gmg, gc2m;        // outputs: grad_carry, grad_m_g, grad_c2m_g
};
template <typename Alloc>
MemoryBackward memory_backward_args(const at::Tensor& grad_m_new, const at::Tensor& grad_o_part,
                                    const at::Tensor& act, const at::Tensor& m_new, bool carry_x,
                                    const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_memory_backward";
  MemoryBackward a;
  a.carry_x = carry_x;
  check_state(op, m_new, "m_new");
  check_operand(op, grad_m_new, m_new, 1, "grad_m_new");
  check_operand(op, grad_o_part, m_new, 1, "grad_o_part");
  check_operand(op, act, m_new, 3, "act");
  static_cast<Sizes&>(a) = sizes_of(m_new);
  a.gm = planar(grad_m_new), a.gop = planar(grad_o_part), a.act = planar(act), a.mn = planar(m_new);
  a.gcar = output(alloc, a, carry_slots(carry_x), a.mn);
  a.gmg = output(alloc, a, 3, a.mn);
  a.gc2m = output(alloc, a, 4, a.mn);
  return a;
}

// output stage, forward (a, b, c = o_part, o_m, last) and backward (a, b, c = grad_h, o, tl): three
// [B, C, H, W] operands in; outs [B, C, H, W] outputs
struct Output : Sizes {
  at::Tensor a, b, c;
  at::Tensor out[3];
};
template <typename Alloc>
Output output_args(const char* op, const at::Tensor& a_, const char* a_name, const at::Tensor& b_,
                   const char* b_name, const at::Tensor& c_, const char* c_name, int outs, const Alloc& alloc) {
  Output a;
  check_state(op, a_, a_name);
  check_operand(op, b_, a_, 1, b_name);
  check_operand(op, c_, a_, 1, c_name);
  static_cast<Sizes&>(a) = sizes_of(a_);
  a.a = planar(a_), a.b = planar(b_), a.c = planar(c_);
  for (int j = 0; j < 3; ++j) a.out[j] = output(alloc, a, 1, a.a, j < outs);
  return a;
}

}  // namespace causal
}  // namespace vpfast
