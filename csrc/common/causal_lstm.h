// Causal LSTM (PredRNN++, MODELS.md §10) pointwise arithmetic and host-side argument handling, shared by
// csrc/cpu/causal_lstm.cpp and csrc/cuda/causal_lstm.cu (operand checks and the LSTM memory update are the
// fused LSTMs' own, common/lstm_planes.h and common/stlstm.h).
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

// ---- layouts -----------------------------------------------------------------------------------------------
// Every operand is [B, K*C, H, W] (K gate slots of C channels). Two layouts, one per call, chosen by the call's
// reference operand (the state, or the first input): planar (NCHW-like: each (b, channel) plane of H*W elements
// contiguous, batch/channel strides free) or channels_last (each pixel's K*C channels contiguous), which the
// CPU cell runs in because oneDNN's small convolutions are faster in it. The kernels walk rows of contiguous
// elements: planar rows are (b, channel) planes of H*W, channels_last rows are (b, pixel) runs of C channels.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sb, so, sj;  // row (b, o) of gate slot j starts at ptr + b*sb + o*so + j*sj
  VPFAST_HD T* row(int64_t b, int64_t o, int64_t j) const { return ptr + b * sb + o * so + j * sj; }
  // element (b, slot j, channel ch, pixel p)
  VPFAST_HD T* at(bool cl, int64_t b, int64_t j, int64_t ch, int64_t p) const {
    return cl ? row(b, p, j) + ch : row(b, ch, j) + p;
  }
};

using lstm::check_operand;
using lstm::present;
using lstm::Sizes;
using lstm::sizes_of;

// the layout a call runs in: channels_last when its reference operand is (and not also contiguous, as a
// tensor with one channel or one pixel is)
inline bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// the operand in the call's layout: as it is when its strides already fit, else copied
inline at::Tensor prepared(const at::Tensor& t, bool cl) {
  if (!cl) return lstm::planar(t);
  const bool ok = t.stride(1) == 1 && (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3));
  return ok ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename T>
Rows<T> rows(const at::Tensor& t, int64_t C, bool cl) {
  if (!t.defined() || t.numel() == 0) return {nullptr, 0, 0, 0};
  return cl ? Rows<T>{t.data_ptr<T>(), t.stride(0), t.stride(3), C} : Rows<T>{t.data_ptr<T>(), t.stride(0),
                                                                             t.stride(1), C * t.stride(1)};
}

inline void check_state(const char* op, const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4, op, ": ", name, " must be [B, C, H, W], got ", c.sizes());
}

inline int64_t carry_slots(bool carry_x) { return carry_x ? 4 : 1; }

// Sizes plus the call's layout; rows() and width() are what the CPU kernels iterate: B*C planes of H*W elements,
// or B*H*W pixels of C channels
struct Call : Sizes {
  bool cl = false;
  int64_t outer() const { return cl ? HW : C; }
  int64_t width() const { return cl ? C : HW; }
};

// a [B, k*C, H, W] output in the call's layout when `on`, else an empty tensor. alloc(sizes, options, format):
// cpu::empty_output on the CPU, at::empty on CUDA.
template <typename Alloc>
at::Tensor output(const Alloc& alloc, const Call& s, int64_t k, const at::Tensor& like, bool on = true) {
  if (!on) return at::empty({0}, like.options());
  return alloc(at::IntArrayRef{s.B, k * s.C, s.H, s.W}, like.options(),
               s.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// the sizes and the layout of a call whose reference operand is ref ([B, C, H, W])
inline Call call_of(const at::Tensor& ref, const at::Tensor& layout_from) {
  Call a;
  static_cast<Sizes&>(a) = sizes_of(ref);
  a.cl = channels_last(layout_from);
  return a;
}

struct CellForward : Call {
  bool has_x = false, has_c = false;
  at::Tensor x_g, h_g, c_g, c;     // operands
  at::Tensor c_new, carry, act;    // outputs
};
template <typename Alloc>
CellForward cell_forward_args(const std::optional<at::Tensor>& x_g, const at::Tensor& h_g,
                              const std::optional<at::Tensor>& c_g, const at::Tensor& c, const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_cell_forward";
  check_state(op, c, "c");
  check_operand(op, h_g, c, 4, "h_g");
  CellForward a;
  static_cast<Call&>(a) = call_of(c, c);
  a.has_x = present(x_g), a.has_c = present(c_g);
  if (a.has_x) check_operand(op, *x_g, c, 7, "x_g");
  if (a.has_c) check_operand(op, *c_g, c, 3, "c_g");
  a.h_g = prepared(h_g, a.cl), a.c = prepared(c, a.cl);
  if (a.has_x) a.x_g = prepared(*x_g, a.cl);
  if (a.has_c) a.c_g = prepared(*c_g, a.cl);
  a.c_new = output(alloc, a, 1, a.c);
  a.carry = output(alloc, a, carry_slots(a.has_x), a.c);
  a.act = output(alloc, a, 2, a.c);
  return a;
}

struct CellBackward : Call {
  bool has_x = false, has_c = false;
  at::Tensor gcn, gcar, act, cn, c;  // operands: grad_c_new, grad_carry, act, c_new, c
  at::Tensor gx, gh, gcg, gc;        // outputs: grad_x_g, grad_h_g, grad_c_g, grad_c
};
template <typename Alloc>
CellBackward cell_backward_args(const at::Tensor& grad_c_new, const at::Tensor& grad_carry, const at::Tensor& act,
                                const at::Tensor& c_new, const at::Tensor& c, bool has_x, bool has_c,
                                const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_cell_backward";
  check_state(op, c, "c");
  check_operand(op, grad_c_new, c, 1, "grad_c_new");
  check_operand(op, grad_carry, c, carry_slots(has_x), "grad_carry");
  check_operand(op, act, c, 2, "act");
  check_operand(op, c_new, c, 1, "c_new");
  CellBackward a;
  static_cast<Call&>(a) = call_of(c, act);  // the layout of the forward's outputs
  a.has_x = has_x, a.has_c = has_c;
  a.gcn = prepared(grad_c_new, a.cl), a.gcar = prepared(grad_carry, a.cl), a.act = prepared(act, a.cl);
  a.cn = prepared(c_new, a.cl), a.c = prepared(c, a.cl);
  a.gx = output(alloc, a, 7, a.c, has_x);
  a.gh = output(alloc, a, 4, a.c);
  a.gcg = output(alloc, a, 3, a.c, has_c);
  a.gc = output(alloc, a, 1, a.c);
  return a;
}

struct MemoryForward : Call {
  bool carry_x = false;
  at::Tensor carry, m_g, c2m_g;       // operands
  at::Tensor m_new, o_part, act;      // outputs (act: i', f', t)
};
template <typename Alloc>
MemoryForward memory_forward_args(const at::Tensor& carry, const at::Tensor& m_g, const at::Tensor& c2m_g,
                                  const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_memory_forward";
  check_state(op, m_g, "m_g");
  TORCH_CHECK(m_g.size(1) % 3 == 0, op, ": m_g must be [B, 3C, H, W], got ", m_g.sizes());
  const at::Tensor ref = m_g.narrow(1, 0, m_g.size(1) / 3);  // a [B, C, H, W] view for the shape checks
  TORCH_CHECK(carry.dim() == 4 && (carry.size(1) == ref.size(1) || carry.size(1) == 4 * ref.size(1)), op,
              ": carry must be [B, C, H, W] or [B, 4C, H, W] for m_g of shape ", m_g.sizes(), ", got ",
              carry.sizes());
  MemoryForward a;
  static_cast<Call&>(a) = call_of(ref, m_g);
  a.carry_x = carry.size(1) == 4 * ref.size(1) && ref.size(1) > 0;
  check_operand(op, carry, ref, carry_slots(a.carry_x), "carry");
  check_operand(op, c2m_g, ref, 4, "c2m_g");
  a.carry = prepared(carry, a.cl), a.m_g = prepared(m_g, a.cl), a.c2m_g = prepared(c2m_g, a.cl);
  a.m_new = output(alloc, a, 1, a.m_g);
  a.o_part = output(alloc, a, 1, a.m_g);
  a.act = output(alloc, a, 3, a.m_g);
  return a;
}

struct MemoryBackward : Call {
  bool carry_x = false;
  at::Tensor gm, gop, act, mn;       // operands: grad_m_new, grad_o_part, act, m_new
  at::Tensor gcar, gmg, gc2m;        // outputs: grad_carry, grad_m_g, grad_c2m_g
};
template <typename Alloc>
MemoryBackward memory_backward_args(const at::Tensor& grad_m_new, const at::Tensor& grad_o_part,
                                    const at::Tensor& act, const at::Tensor& m_new, bool carry_x,
                                    const Alloc& alloc) {
  constexpr const char* op = "vpfast::causal_lstm_memory_backward";
  check_state(op, m_new, "m_new");
  check_operand(op, grad_m_new, m_new, 1, "grad_m_new");
  check_operand(op, grad_o_part, m_new, 1, "grad_o_part");
  check_operand(op, act, m_new, 3, "act");
  MemoryBackward a;
  static_cast<Call&>(a) = call_of(m_new, act);
  a.carry_x = carry_x;
  a.gm = prepared(grad_m_new, a.cl), a.gop = prepared(grad_o_part, a.cl), a.act = prepared(act, a.cl);
  a.mn = prepared(m_new, a.cl);
  a.gcar = output(alloc, a, carry_slots(carry_x), a.mn);
  a.gmg = output(alloc, a, 3, a.mn);
  a.gc2m = output(alloc, a, 4, a.mn);
  return a;
}

// output stage, forward (a, b, c = o_part, o_m, last) and backward (a, b, c = grad_h, o, tl): three
// [B, C, H, W] operands in (the layout: o_part's forward, o's backward); `outs` [B, C, H, W] outputs
struct Output : Call {
  at::Tensor a, b, c;
  at::Tensor out[3];
};
template <typename Alloc>
Output output_args(const char* op, const at::Tensor& a_, const char* a_name, const at::Tensor& b_,
                   const char* b_name, const at::Tensor& c_, const char* c_name, int outs, bool fwd,
                   const Alloc& alloc) {
  check_state(op, a_, a_name);
  check_operand(op, b_, a_, 1, b_name);
  check_operand(op, c_, a_, 1, c_name);
  Output a;
  static_cast<Call&>(a) = call_of(a_, fwd ? a_ : b_);
  a.a = prepared(a_, a.cl), a.b = prepared(b_, a.cl), a.c = prepared(c_, a.cl);
  for (int j = 0; j < 3; ++j) a.out[j] = output(alloc, a, 1, a.a, j < outs);
  return a;
}

}  // namespace causal
}  // namespace vpfast
