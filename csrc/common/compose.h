// Helpers of the compiled compositions (whole recurrent steps as one op call: csrc/causal_lstm.cpp,
// csrc/mim_step.cpp). They run below autograd (their caller is the Python autograd node of the step) and call
// the stage ops through the dispatcher, so one implementation serves CPU, CUDA and Meta (fake) tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace vpfast {
namespace compose {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using T5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// fn(): the typed dispatcher handle of op `name` (Sig: its C++ signature), looked up on first use
#define VPFAST_OP_HANDLE(fn, name, ...)                                                              \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                                                \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>(); \
    return op;                                                                                       \
  }

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The layout of a convolution's output and input gradient: channels_last when the input or the weight is, as
// oneDNN and cuDNN choose. Made explicit (a no-op where the library already chose it) because a Meta run of a
// composition (what FakeTensorMode and torch.compile trace) gets planar convolution outputs regardless.
inline at::MemoryFormat conv_format(const Tensor& t, const Tensor& w) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  return t.suggest_memory_format() == cl || w.suggest_memory_format() == cl ? cl : at::MemoryFormat::Contiguous;
}

// t dense in `fmt` with that format's own strides, also for the dimensions of size 1 (whose strides the
// libraries set as they like, and a fake run differently from a real one): a view where t already is dense in
// fmt, else a copy
inline Tensor in_format(const Tensor& t, at::MemoryFormat fmt) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast && t.dim() == 4;
  const Tensor d = t.contiguous(cl ? fmt : at::MemoryFormat::Contiguous);
  std::vector<int64_t> want;
  if (cl) {
    want = c10::get_channels_last_strides_2d(d.sizes());
  } else {
    want.assign(d.dim(), 1);
    for (int64_t k = d.dim() - 2; k >= 0; --k) want[k] = want[k + 1] * std::max<int64_t>(d.size(k + 1), 1);
  }
  return d.strides() == at::IntArrayRef(want) ? d : d.as_strided(d.sizes(), want);
}

inline Tensor conv(const Tensor& t, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding) {
  return in_format(at::convolution(t, w, std::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1), conv_format(t, w));
}

// (grad of inp, grad of weight) of conv(inp, weight), each only where asked (else undefined)
inline T2 conv_grads(const Tensor& grad, const Tensor& inp, const Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding, bool need_in, bool need_w) {
  if (!need_in && !need_w) return {};
  auto r = at::convolution_backward(grad, inp, w, std::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                    {need_in, need_w, false});
  Tensor gi = std::get<0>(r), gw = std::get<1>(r);
  if (gi.defined()) gi = in_format(gi, conv_format(inp, w));
  if (gw.defined()) gw = in_format(gw, w.suggest_memory_format());
  return {gi, gw};
}

// a zero state or pre-activation of `channels` channels in the layout of `like` (a step's first convolution
// output): what a skipped convolution of a zero state would have given
inline Tensor zeros_like_layout(const Tensor& like, int64_t channels) {
  return at::zeros({like.size(0), channels, like.size(2), like.size(3)},
                   like.options().memory_format(like.suggest_memory_format()));
}

// a + b where either may be undefined (an absent gradient)
inline Tensor plus(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

inline Tensor plus(const Tensor& a, const OptTensor& b) { return has(b) ? plus(a, *b) : a; }

// an undefined gradient as the empty tensor the schemas return for "not computed"
inline Tensor out(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }

}  // namespace compose
}  // namespace vpfast
