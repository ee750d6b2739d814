// ST-LSTM / ConvLSTM elementwise arithmetic shared by csrc/cpu/{stlstm,convlstm}.cpp and
// csrc/cuda/{stlstm,convlstm}.cu (MODELS.md §1-§2).
//
// Layout helpers: every [B, K, H, W] operand is addressed as planes (b, channel) of H*W elements that are
// contiguous inside the plane; the batch and channel strides are free, so channel slices such as
// cm[:, :C] (the previous step's c) are read in place without a copy.
#pragma once
#include <cstdint>

#include "common/math.h"

namespace vpfast {
namespace lstm {

template <typename T>
struct Planes {
  T* ptr;
  int64_t sb, sc;  // strides of the batch and channel axes, in elements
  VPFAST_HD T* at(int64_t b, int64_t ch) const { return ptr + b * sb + ch * sc; }
};

// One LSTM-style memory update: i = σ(pi), f = σ(pf + forget_bias), g = tanh(pg), c_new = f c + i g.
template <typename T>
VPFAST_HD void cell_forward(T pi, T pf, T pg, T c_prev, T forget_bias, T& i, T& f, T& g, T& c_new) {
  i = fast_sigmoid<T>(pi);
  f = fast_sigmoid<T>(pf + forget_bias);
  g = fast_tanh<T>(pg);
  c_new = f * c_prev + i * g;
}

// tanh's range, for a g recovered by division (see stlstm_cell_backward)
template <typename T>
VPFAST_HD T clamp_unit(T g) {
  return g > T(1) ? T(1) : (g < T(-1) ? T(-1) : g);
}

// The memory update's backward given i, f, g, d = i*g and c_prev. gc: gradient reaching c_new; gd: gradient
// reaching d directly (PredRNN-v2's delta output; 0 otherwise); gg: gradient reaching g directly (ConvLSTM's
// h = o*g variant; 0 otherwise). Returns the pre-activation gradients and the gradient of c_prev.
template <typename T>
VPFAST_HD void cell_backward(T i, T f, T g, T d, T c_prev, T gc, T gd, T gg, T& gpi, T& gpf, T& gpg, T& gc_prev) {
  const T gig = gc + gd;
  gpi = gig * d * (T(1) - i);
  gpf = gc * c_prev * f * (T(1) - f);
  gpg = (gig * i + gg) * (T(1) - g * g);
  gc_prev = gc * f;
}

// The fused steps save i and f but not g: c_new is saved anyway (the next convolutions' input), and
// d = i g = c_new - f c_prev. Its error is about one rounding of c_new (eps |c_new|) in absolute terms, so
// every gradient below carries an absolute error of order eps |c_new| |gc|; g = d / i is clamped to tanh's
// range because where i is tiny that absolute error, divided by i, would otherwise blow up (the true
// gradients that use g there are multiplied by i).
template <typename T>
VPFAST_HD void stlstm_cell_backward(T i, T f, T c_prev, T c_new, T gc, T gd, T& gpi, T& gpf, T& gpg, T& gc_prev) {
  const T d = c_new - f * c_prev;
  const T g = clamp_unit<T>(i > T(0) ? d / i : T(0));
  cell_backward<T>(i, f, g, d, c_prev, gc, gd, T(0), gpi, gpf, gpg, gc_prev);
}

// ST-LSTM output stage: o = σ(po), tl = tanh(last), h = o tl + (1 - o) hw (hw = 0 without highway).
template <typename T>
VPFAST_HD void output_forward(T po, T last, T hw, T& o, T& tl, T& h) {
  o = fast_sigmoid<T>(po);
  tl = fast_tanh<T>(last);
  h = o * tl + (T(1) - o) * hw;
}

// tanh(last) recovered from the saved output h = o * tl of the no-highway variant. Where o is 0, every
// gradient that uses tl is multiplied by o or o(1-o) and vanishes, so 0 is as good as any value.
template <typename T>
VPFAST_HD T tl_from_h(T h, T o) {
  return o > T(0) ? h / o : T(0);
}

template <typename T>
VPFAST_HD void output_backward(T gh, T o, T tl, T hw, T& gpo, T& glast, T& ghw) {
  gpo = gh * (tl - hw) * o * (T(1) - o);
  glast = gh * o * (T(1) - tl * tl);
  ghw = gh * (T(1) - o);
}

// ConvLSTM: o = σ(po); h = o * tanh(c_new) (tanh_c) or o * g. Backward from the saved i, f, o, c_prev,
// c_new and h: g is recovered as in stlstm_cell_backward, except that for h = o * g it is h / o where o > i
// (g then also reaches the output gate's gradient, which is scaled by o, not by i).
template <typename T>
VPFAST_HD void convlstm_backward(T i, T f, T o, T c_prev, T c_new, T h, T gh, T gc, bool tanh_c, T& gpi, T& gpf,
                                 T& gpg, T& gpo, T& gc_prev) {
  const T d = c_new - f * c_prev;
  const T g = clamp_unit<T>(!tanh_c && o > i ? h / o : (i > T(0) ? d / i : T(0)));
  T gct = gc, gg = T(0), a;
  if (tanh_c) {
    a = fast_tanh<T>(c_new);
    gct += gh * o * (T(1) - a * a);
  } else {
    a = g;
    gg = gh * o;
  }
  gpo = gh * a * o * (T(1) - o);
  cell_backward<T>(i, f, g, d, c_prev, gct, T(0), gg, gpi, gpf, gpg, gc_prev);
}

}  // namespace lstm
}  // namespace vpfast
