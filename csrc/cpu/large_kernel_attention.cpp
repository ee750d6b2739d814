// Large-kernel attention's depthwise pair, fused, CPU. One task per (sample, channel) plane: the first
// depthwise conv writes straight into the zero-padded scratch plane that the second one reads, so the
// intermediate map lives only in the core's cache (never in memory). Both stages are stride 1 with "same"
// padding, so each transposed correlation of the backward pass reads a scratch plane of the same geometry
// as its forward stage.
//
// Backward per plane: recompute mid (stage 0); grad_mid = flip(w1) * grad; grad_x = flip(w0) * grad_mid.
// Tasks are (channel, chunk of samples); weight and bias gradients are summed over a chunk's planes in order,
// then over the chunks in order (deterministic; dwcpu::batch_chunks).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

#include "cpu/denormals.h"
#include "cpu/depthwise_plane.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

using dwcpu::Geo;

struct PairArgs {
  int64_t B, C, H, W;
  int k0h, k0w, k1h, k1w, d0h, d0w, d1h, d1w;
};

PairArgs check_pair(const char* name, const at::Tensor& x, const at::Tensor& w0, const at::Tensor& w1,
                    at::IntArrayRef d0, at::IntArrayRef d1) {
  TORCH_CHECK(x.dim() == 4, name, ": x must be [B, C, H, W]");
  for (const auto* w : {&w0, &w1}) {
    TORCH_CHECK(w->dim() == 4 && w->size(0) == x.size(1) && w->size(1) == 1, name,
                ": weights must be [C, 1, kh, kw] with C = x.size(1)");
    TORCH_CHECK(w->size(2) % 2 == 1 && w->size(3) % 2 == 1, name, ": kernel sizes must be odd");
    TORCH_CHECK(w->size(2) <= dwcpu::kMaxTaps && w->size(3) <= dwcpu::kMaxTaps, name, ": kernel too large");
    TORCH_CHECK(w->scalar_type() == x.scalar_type(), name, ": weights must have x's dtype");
  }
  TORCH_CHECK(d0.size() == 2 && d1.size() == 2 && d0[0] >= 1 && d0[1] >= 1 && d1[0] >= 1 && d1[1] >= 1, name,
              ": dilations must be pairs >= 1");
  PairArgs a;
  a.B = x.size(0); a.C = x.size(1); a.H = x.size(2); a.W = x.size(3);
  a.k0h = (int)w0.size(2); a.k0w = (int)w0.size(3); a.k1h = (int)w1.size(2); a.k1w = (int)w1.size(3);
  a.d0h = (int)d0[0]; a.d0w = (int)d0[1]; a.d1h = (int)d1[0]; a.d1w = (int)d1[1];
  return a;
}

// "same" padded, stride-1 scratch plane of one stage
template <typename T>
Geo stage_geo(const PairArgs& a, int kh, int kw, int dh, int dw) {
  const int64_t ph = (int64_t)dh * (kh / 2), pw = (int64_t)dw * (kw / 2);
  return dwcpu::make_geo(kh, kw, 1, 1, dh, dw, a.H, a.W, ph, pw, a.H, a.W, dwcpu::Vec<T>::N);
}

template <typename T>
T* interior(const Geo& g, T* buf) {
  return buf + g.rlo * g.ld + g.clo;
}

at::Tensor optional_contig(const std::optional<at::Tensor>& t, int64_t C, at::ScalarType dt, const char* what) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == C && t->scalar_type() == dt, what, " must be [C] with x's dtype");
  return t->contiguous();
}

at::Tensor lka_forward_cpu(const at::Tensor& x, const at::Tensor& w0, const std::optional<at::Tensor>& b0,
                           const at::Tensor& w1, const std::optional<at::Tensor>& b1, at::IntArrayRef d0,
                           at::IntArrayRef d1) {
  const PairArgs a = check_pair("vpfast::large_kernel_attention_forward", x, w0, w1, d0, d1);
  const auto X = x.contiguous(), W0 = w0.contiguous(), W1 = w1.contiguous();
  const auto B0 = optional_contig(b0, a.C, x.scalar_type(), "b0");
  const auto B1 = optional_contig(b1, a.C, x.scalar_type(), "b1");
  auto out = cpu::empty_output({a.B, a.C, a.H, a.W}, X.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "large_kernel_attention_forward_cpu", [&] {
    using T = scalar_t;
    const T* xp = X.data_ptr<T>();
    const T* w0p = W0.data_ptr<T>();
    const T* w1p = W1.data_ptr<T>();
    const T* b0p = B0.defined() ? B0.data_ptr<T>() : nullptr;
    const T* b1p = B1.defined() ? B1.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    const Geo g0 = stage_geo<T>(a, a.k0h, a.k0w, a.d0h, a.d0w);
    const Geo g1 = stage_geo<T>(a, a.k1h, a.k1w, a.d1h, a.d1w);
    const int64_t HW = a.H * a.W;
    const auto t0 = dwcpu::make_taps<T>(w0p, a.C, a.k0h, a.k0w, false);
    const auto t1 = dwcpu::make_taps<T>(w1p, a.C, a.k1h, a.k1w, false);
    cpu::parallel_for(0, a.B * a.C, 1, [&](int64_t p0, int64_t p1) {
      std::vector<T> buf0(g0.size(), T(0)), buf1(g1.size(), T(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % a.C;
        if (p + 1 < p1) {
          dwcpu::prefetch_plane(xp + (p + 1) * HW, HW * sizeof(T));
          dwcpu::prefetch_plane_w(op + (p + 1) * HW, HW * sizeof(T));
        }
        dwcpu::fill_plane<T>(g0, xp + p * HW, a.W, buf0.data());
        dwcpu::correlate_plane<T>(buf0.data(), g0, t0, c, b0p ? b0p[c] : T(0), interior(g1, buf1.data()),
                                  g1.ld, a.H, a.W);
        dwcpu::correlate_plane<T>(buf1.data(), g1, t1, c, b1p ? b1p[c] : T(0), op + p * HW, a.W, a.H, a.W);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lka_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w0, const std::optional<at::Tensor>& b0,
    const at::Tensor& w1, at::IntArrayRef d0, at::IntArrayRef d1, std::array<bool, 5> mask) {
  const PairArgs a = check_pair("vpfast::large_kernel_attention_backward", x, w0, w1, d0, d1);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "vpfast::large_kernel_attention_backward: grad must match x");
  const auto G = grad.contiguous(), X = x.contiguous(), W0 = w0.contiguous(), W1 = w1.contiguous();
  const auto B0 = optional_contig(b0, a.C, x.scalar_type(), "b0");
  const int64_t K0 = (int64_t)a.k0h * a.k0w, K1 = (int64_t)a.k1h * a.k1w, HW = a.H * a.W, P = a.B * a.C;
  const auto opts = X.options();
  auto gx = mask[0] ? cpu::empty_output({a.B, a.C, a.H, a.W}, opts) : at::empty({0}, opts);
  auto gw0 = mask[1] ? at::empty({a.C, 1, a.k0h, a.k0w}, opts) : at::empty({0}, opts);
  auto gb0 = mask[2] ? at::empty({a.C}, opts) : at::empty({0}, opts);
  auto gw1 = mask[3] ? at::empty({a.C, 1, a.k1h, a.k1w}, opts) : at::empty({0}, opts);
  auto gb1 = mask[4] ? at::empty({a.C}, opts) : at::empty({0}, opts);
  if (P == 0 || HW == 0) {
    for (auto* t : {&gw0, &gb0, &gw1, &gb1})
      if (t->numel()) t->zero_();
    return {gx, gw0, gb0, gw1, gb1};
  }
  const bool need_mid = mask[3];                       // dW1 reads the intermediate map
  const bool need_gmid = mask[0] || mask[1] || mask[2];  // everything of stage 0 reads grad_mid
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "large_kernel_attention_backward_cpu", [&] {
    using T = scalar_t;
    const T* gp = G.data_ptr<T>();
    const T* xp = X.data_ptr<T>();
    const T* w0p = W0.data_ptr<T>();
    const T* b0p = B0.defined() ? B0.data_ptr<T>() : nullptr;
    const Geo g0 = stage_geo<T>(a, a.k0h, a.k0w, a.d0h, a.d0w);
    const Geo g1 = stage_geo<T>(a, a.k1h, a.k1w, a.d1h, a.d1w);
    const auto t0 = need_mid ? dwcpu::make_taps<T>(w0p, a.C, a.k0h, a.k0w, false) : dwcpu::Taps<T>();
    const auto f0 = mask[0] ? dwcpu::make_taps<T>(w0p, a.C, a.k0h, a.k0w, true) : dwcpu::Taps<T>();
    const auto f1 = need_gmid ? dwcpu::make_taps<T>(W1.data_ptr<T>(), a.C, a.k1h, a.k1w, true) : dwcpu::Taps<T>();
    // the tap-row reuse path of the weight gradient needs kTapRows-1 zero rows around the gradient plane;
    // the scratch planes have them when their padding is deep enough
    auto reuse_ok = [&](const Geo& g) {
      return dwcpu::wgrad_reuse(g, a.H) && g.rlo >= dwcpu::kTapRows - 1 && g.rows - g.rhi >= dwcpu::kTapRows - 1;
    };
    const bool reuse0 = reuse_ok(g0), reuse1 = reuse_ok(g1);
    // tasks: (channel, chunk of samples), weight and bias gradients summed in order (dwcpu::batch_chunks)
    const int64_t NB = dwcpu::batch_chunks(a.B, a.C), Bc = (a.B + NB - 1) / NB;
    std::vector<T> pw0(mask[1] ? NB * a.C * K0 : 0), pb0(mask[2] ? NB * a.C : 0),
        pw1(mask[3] ? NB * a.C * K1 : 0), pb1(mask[4] ? NB * a.C : 0);
    T* gxp = mask[0] ? gx.data_ptr<T>() : nullptr;
    cpu::parallel_for(0, a.C * NB, 1, [&](int64_t t0_, int64_t t1_) {
      // x (stage 0 input), mid (stage 1 input), grad (stage 1 transposed input), grad_mid (stage 0
      // transposed input): all zero-padded scratch planes whose padding stays zero across planes
      std::vector<T> xb(g0.size(), T(0)), mb(need_mid ? g1.size() : 0, T(0)), gb(g1.size(), T(0)),
          gmb(need_gmid ? g0.size() : 0, T(0));
      dwcpu::WeightGrad<T> wg0(mask[1] ? K0 : 0), wg1(mask[3] ? K1 : 0);
      for (int64_t t = t0_; t < t1_; ++t) {
        const int64_t c = t / NB, chunk = t % NB;
        const int64_t b0 = chunk * Bc, b1 = std::min(a.B, b0 + Bc);
        wg0.reset();
        wg1.reset();
        T bsum0 = 0, bsum1 = 0;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t p = b * a.C + c;
          if (b + 1 < b1) {
            const int64_t pn = p + a.C;
            dwcpu::prefetch_plane(gp + pn * HW, HW * sizeof(T));
            dwcpu::prefetch_plane(xp + pn * HW, HW * sizeof(T));
            if (mask[0]) dwcpu::prefetch_plane_w(gxp + pn * HW, HW * sizeof(T));
          }
          dwcpu::fill_plane<T>(g1, gp + p * HW, a.W, gb.data());
          const T* g_in = interior(g1, gb.data());
          if (mask[4]) bsum1 += dwcpu::plane_sum<T>(g_in, g1.ld, a.H, a.W);
          if (need_mid || mask[1]) dwcpu::fill_plane<T>(g0, xp + p * HW, a.W, xb.data());
          if (need_mid) {
            dwcpu::correlate_plane<T>(xb.data(), g0, t0, c, b0p ? b0p[c] : T(0), interior(g1, mb.data()),
                                      g1.ld, a.H, a.W);
            wg1.add(mb.data(), g1, g_in, g1.ld, a.H, a.W, reuse1 ? g_in : nullptr);
          }
          if (!need_gmid) continue;
          T* gm = interior(g0, gmb.data());
          dwcpu::correlate_plane<T>(gb.data(), g1, f1, c, T(0), gm, g0.ld, a.H, a.W);
          if (mask[2]) bsum0 += dwcpu::plane_sum<T>(gm, g0.ld, a.H, a.W);
          if (mask[1]) wg0.add(xb.data(), g0, gm, g0.ld, a.H, a.W, reuse0 ? gm : nullptr);
          if (mask[0]) dwcpu::correlate_plane<T>(gmb.data(), g0, f0, c, T(0), gxp + p * HW, a.W, a.H, a.W);
        }
        const int64_t q = chunk * a.C + c;
        if (mask[1]) wg0.result(&pw0[q * K0]);
        if (mask[2]) pb0[q] = bsum0;
        if (mask[3]) wg1.result(&pw1[q * K1]);
        if (mask[4]) pb1[q] = bsum1;
      }
    });
    if (mask[1]) dwcpu::reduce_batch<T>(pw0.data(), NB, a.C, K0, gw0.data_ptr<T>());
    if (mask[2]) dwcpu::reduce_batch<T>(pb0.data(), NB, a.C, 1, gb0.data_ptr<T>());
    if (mask[3]) dwcpu::reduce_batch<T>(pw1.data(), NB, a.C, K1, gw1.data_ptr<T>());
    if (mask[4]) dwcpu::reduce_batch<T>(pb1.data(), NB, a.C, 1, gb1.data_ptr<T>());
  });
  return {gx, gw0, gb0, gw1, gb1};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("large_kernel_attention_forward", &vpfast::lka_forward_cpu);
  m.impl("large_kernel_attention_backward", &vpfast::lka_backward_cpu);
}
