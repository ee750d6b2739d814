// Host side of the fused LSTM kernels (stlstm, convlstm) on CPU and CUDA: operand checks and the strided
// plane views the kernels read. Operands are read plane by plane in place, so only the H*W planes must be
// contiguous.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/stlstm.h"

namespace vpfast {
namespace lstm {

// A [B, K, H, W] tensor whose H*W planes are contiguous (any batch/channel strides); others are copied.
inline at::Tensor planar(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  const bool ok = (W == 1 || t.stride(3) == 1) && (H == 1 || t.stride(2) == W);
  return ok ? t : t.contiguous();
}

template <typename T>
Planes<T> planes(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

// planes(t) when on, an empty view otherwise (an optional operand)
template <typename T>
Planes<T> planes_opt(bool on, const at::Tensor& t) {
  return on ? planes<T>(t) : Planes<T>{nullptr, 0, 0};
}

// t must be [B, k*C, H, W] for c of shape [B, C, H, W], with c's dtype and device.
inline void check_operand(const char* op, const at::Tensor& t, const at::Tensor& c, int64_t k, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == c.size(0) && t.size(1) == k * c.size(1) && t.size(2) == c.size(2) &&
                  t.size(3) == c.size(3),
              op, ": ", what, " must be [B, ", k, "C, H, W] for c of shape ", c.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == c.scalar_type() && t.device() == c.device(), op, ": ", what,
              " must match c's dtype and device");
}

// The operand checks of each fused op's entry points, shared by the CPU and CUDA wrappers. Absent optional
// operands are passed as nullptr.
inline void check_stlstm_gates_forward(const at::Tensor& c, const at::Tensor& h_g, const at::Tensor& m_g,
                                       const at::Tensor& m, const at::Tensor* x_g) {
  TORCH_CHECK(c.dim() == 4, "vpfast::stlstm_gates_forward: c must be [B, C, H, W]");
  check_operand("vpfast::stlstm", h_g, c, 4, "h_g");
  check_operand("vpfast::stlstm", m_g, c, 3, "m_g");
  check_operand("vpfast::stlstm", m, c, 1, "m");
  if (x_g) check_operand("vpfast::stlstm", *x_g, c, 7, "x_g");
}

inline void check_stlstm_gates_backward(const at::Tensor& c, const at::Tensor& grad_cm, const at::Tensor& grad_op,
                                        const at::Tensor& act, const at::Tensor& cm, const at::Tensor& m,
                                        const at::Tensor* grad_delta) {
  TORCH_CHECK(c.dim() == 4, "vpfast::stlstm_gates_backward: c must be [B, C, H, W]");
  check_operand("vpfast::stlstm", grad_cm, c, 2, "grad_cm");
  check_operand("vpfast::stlstm", grad_op, c, 1, "grad_o_part");
  check_operand("vpfast::stlstm", act, c, 4, "act");
  check_operand("vpfast::stlstm", cm, c, 2, "cm");
  check_operand("vpfast::stlstm", m, c, 1, "m");
  if (grad_delta) check_operand("vpfast::stlstm", *grad_delta, c, 2, "grad_delta");
}

// stage 2, forward (ref = o_part; a, b = o_m, last) and backward (ref = o; a, b = grad_h, h_or_tl)
inline void check_stlstm_output(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& a,
                                const char* a_name, const at::Tensor& b, const char* b_name,
                                const at::Tensor* highway) {
  TORCH_CHECK(ref.dim() == 4, op, ": ", ref_name, " must be [B, C, H, W]");
  check_operand("vpfast::stlstm", a, ref, 1, a_name);
  check_operand("vpfast::stlstm", b, ref, 1, b_name);
  if (highway) check_operand("vpfast::stlstm", *highway, ref, 1, "highway");
}

inline void check_convlstm_forward(const at::Tensor& c, const at::Tensor& h_g, const at::Tensor* x_g) {
  TORCH_CHECK(c.dim() == 4, "vpfast::convlstm_forward: c must be [B, C, H, W]");
  check_operand("vpfast::convlstm", h_g, c, 4, "h_g");
  if (x_g) check_operand("vpfast::convlstm", *x_g, c, 4, "x_g");
}

inline void check_convlstm_backward(const at::Tensor& c, const at::Tensor& act, const at::Tensor& c_new,
                                    const at::Tensor& h, const at::Tensor* grad_h, const at::Tensor* grad_c) {
  TORCH_CHECK(c.dim() == 4, "vpfast::convlstm_backward: c must be [B, C, H, W]");
  check_operand("vpfast::convlstm", act, c, 3, "act");
  check_operand("vpfast::convlstm", c_new, c, 1, "c_new");
  check_operand("vpfast::convlstm", h, c, 1, "h");
  if (grad_h) check_operand("vpfast::convlstm", *grad_h, c, 1, "grad_h");
  if (grad_c) check_operand("vpfast::convlstm", *grad_c, c, 1, "grad_c");
}

// ---- each entry point's host side ---------------------------------------------------------------------------
// Shared by the CPU and CUDA wrappers: the checks, the sizes, the operands as planar tensors (an absent optional
// operand stays undefined) and the outputs, allocated by alloc(sizes, options): cpu::empty_output on the CPU,
// at::empty on CUDA. An output the call does not produce is an empty tensor.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// the CUDA wrappers' allocator (the CPU ones pass cpu::lstm_alloc, cpu/lstm_cpu.h)
inline at::Tensor empty_alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

struct Sizes {
  int64_t B = 0, C = 0, H = 0, W = 0, HW = 0;
};
inline Sizes sizes_of(const at::Tensor& c) {
  return {c.size(0), c.size(1), c.size(2), c.size(3), c.size(2) * c.size(3)};
}

// a [B, k*C, H, W] output like `like` when `on`, else an empty tensor
template <typename Alloc>
at::Tensor output(const Alloc& alloc, const Sizes& s, int64_t k, const at::Tensor& like, bool on = true) {
  return on ? alloc(at::IntArrayRef{s.B, k * s.C, s.H, s.W}, like.options()) : at::empty({0}, like.options());
}

struct StlstmGatesForward : Sizes {
  bool has_x = false;
  at::Tensor x_g, h_g, m_g, c, m;     // operands
  at::Tensor cm, o_part, act, delta;  // outputs
};
template <typename Alloc>
StlstmGatesForward stlstm_gates_forward_args(const std::optional<at::Tensor>& x_g, const at::Tensor& h_g,
                                             const at::Tensor& m_g, const at::Tensor& c, const at::Tensor& m,
                                             bool with_delta, const Alloc& alloc) {
  StlstmGatesForward a;
  a.has_x = present(x_g);
  check_stlstm_gates_forward(c, h_g, m_g, m, a.has_x ? &*x_g : nullptr);
  static_cast<Sizes&>(a) = sizes_of(c);
  a.h_g = planar(h_g), a.m_g = planar(m_g), a.c = planar(c), a.m = planar(m);
  if (a.has_x) a.x_g = planar(*x_g);
  a.cm = output(alloc, a, 2, a.c);
  a.o_part = output(alloc, a, 1, a.c);
  a.act = output(alloc, a, 4, a.c);
  a.delta = output(alloc, a, 2, a.c, with_delta);
  return a;
}

struct StlstmGatesBackward : Sizes {
  bool with_delta = false;
  at::Tensor gcm, gop, gd, act, cm, c, m;  // operands
  at::Tensor gx, gh, gm, gc, gmp;          // outputs
};
template <typename Alloc>
StlstmGatesBackward stlstm_gates_backward_args(const at::Tensor& grad_cm, const at::Tensor& grad_op,
                                               const std::optional<at::Tensor>& grad_delta, const at::Tensor& act,
                                               const at::Tensor& cm, const at::Tensor& c, const at::Tensor& m,
                                               bool has_x, const Alloc& alloc) {
  StlstmGatesBackward a;
  a.with_delta = present(grad_delta);
  check_stlstm_gates_backward(c, grad_cm, grad_op, act, cm, m, a.with_delta ? &*grad_delta : nullptr);
  static_cast<Sizes&>(a) = sizes_of(c);
  a.gcm = planar(grad_cm), a.gop = planar(grad_op), a.act = planar(act), a.cm = planar(cm), a.c = planar(c);
  a.m = planar(m);
  if (a.with_delta) a.gd = planar(*grad_delta);
  a.gx = output(alloc, a, 7, a.c, has_x);
  a.gh = output(alloc, a, 4, a.c);
  a.gm = output(alloc, a, 3, a.c);
  a.gc = output(alloc, a, 1, a.c);
  a.gmp = output(alloc, a, 1, a.c);
  return a;
}

struct StlstmOutputForward : Sizes {
  bool has_hw = false;
  at::Tensor op, om, last, hw;  // operands: o_part, o_m, last, highway
  at::Tensor h, o, tl;          // outputs (tl: tanh(last), kept for the backward pass with a highway)
};
template <typename Alloc>
StlstmOutputForward stlstm_output_forward_args(const at::Tensor& o_part, const at::Tensor& o_m,
                                               const at::Tensor& last, const std::optional<at::Tensor>& hw,
                                               const Alloc& alloc) {
  StlstmOutputForward a;
  a.has_hw = present(hw);
  check_stlstm_output("vpfast::stlstm_output_forward", o_part, "o_part", o_m, "o_m", last, "last",
                      a.has_hw ? &*hw : nullptr);
  static_cast<Sizes&>(a) = sizes_of(o_part);
  a.op = planar(o_part), a.om = planar(o_m), a.last = planar(last);
  if (a.has_hw) a.hw = planar(*hw);
  a.h = output(alloc, a, 1, a.op);
  a.o = output(alloc, a, 1, a.op);
  a.tl = output(alloc, a, 1, a.op, a.has_hw);
  return a;
}

struct StlstmOutputBackward : Sizes {
  bool has_hw = false;
  at::Tensor gh, o, ht, hw;      // operands: grad_h, o, h_or_tl, highway
  at::Tensor gpre, glast, ghw;   // outputs
};
template <typename Alloc>
StlstmOutputBackward stlstm_output_backward_args(const at::Tensor& gh, const at::Tensor& o,
                                                 const at::Tensor& h_or_tl, const std::optional<at::Tensor>& hw,
                                                 const Alloc& alloc) {
  StlstmOutputBackward a;
  a.has_hw = present(hw);
  check_stlstm_output("vpfast::stlstm_output_backward", o, "o", gh, "grad_h", h_or_tl, "h_or_tl",
                      a.has_hw ? &*hw : nullptr);
  static_cast<Sizes&>(a) = sizes_of(o);
  a.gh = planar(gh), a.o = planar(o), a.ht = planar(h_or_tl);
  if (a.has_hw) a.hw = planar(*hw);
  a.gpre = output(alloc, a, 1, a.o);
  a.glast = output(alloc, a, 1, a.o);
  a.ghw = output(alloc, a, 1, a.o, a.has_hw);
  return a;
}

struct ConvlstmForward : Sizes {
  bool has_x = false;
  at::Tensor x_g, h_g, c;  // operands
  at::Tensor h, cn, act;   // outputs
};
template <typename Alloc>
ConvlstmForward convlstm_forward_args(const std::optional<at::Tensor>& x_g, const at::Tensor& h_g, const at::Tensor& c,
                                      const Alloc& alloc) {
  ConvlstmForward a;
  a.has_x = present(x_g);
  check_convlstm_forward(c, h_g, a.has_x ? &*x_g : nullptr);
  static_cast<Sizes&>(a) = sizes_of(c);
  a.h_g = planar(h_g), a.c = planar(c);
  if (a.has_x) a.x_g = planar(*x_g);
  a.h = output(alloc, a, 1, a.c);
  a.cn = output(alloc, a, 1, a.c);
  a.act = output(alloc, a, 3, a.c);
  return a;
}

struct ConvlstmBackward : Sizes {
  bool has_gh = false, has_gc = false;
  at::Tensor gh, gc, act, c, cn, ho;  // operands: grad_h, grad_c, act, c, c_new, h
  at::Tensor gx, ghg, gcp;            // outputs
};
template <typename Alloc>
ConvlstmBackward convlstm_backward_args(const std::optional<at::Tensor>& gh, const std::optional<at::Tensor>& gc,
                                        const at::Tensor& act, const at::Tensor& c, const at::Tensor& cn,
                                        const at::Tensor& h, bool has_x, const Alloc& alloc) {
  ConvlstmBackward a;
  a.has_gh = present(gh), a.has_gc = present(gc);
  check_convlstm_backward(c, act, cn, h, a.has_gh ? &*gh : nullptr, a.has_gc ? &*gc : nullptr);
  static_cast<Sizes&>(a) = sizes_of(c);
  a.act = planar(act), a.c = planar(c), a.cn = planar(cn), a.ho = planar(h);
  if (a.has_gh) a.gh = planar(*gh);
  if (a.has_gc) a.gc = planar(*gc);
  a.gx = output(alloc, a, 4, a.c, has_x);
  a.ghg = output(alloc, a, 4, a.c);
  a.gcp = output(alloc, a, 1, a.c);
  return a;
}

}  // namespace lstm
}  // namespace vpfast
