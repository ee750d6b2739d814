// Depthwise convolution, CPU. One task per (sample, channel) plane (cpu::parallel_for over B*C); each task
// copies its plane into a zero-padded scratch buffer that stays in cache and runs the register-blocked,
// W-vectorised loops of cpu/depthwise_plane.h.
//
// Backward, one task per (block of channels, chunk of samples): grad_x of each plane is the correlation of the
// zero-upsampled output gradient with the flipped filter; the weight and bias gradients are summed over the
// chunk's planes in order, then over the chunks in order (no atomics, identical bits on every run and for
// every thread count; see dwcpu::batch_chunks).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "cpu/denormals.h"
#include "cpu/depthwise_plane.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

using dwcpu::Geo;

struct Args {
  int64_t B, C, H, W, Ho, Wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

Args check_args(const char* name, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, name, ": x must be [B, C, H, W]");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1, name,
              ": weight must be [C, 1, kh, kw] with C = x.size(1)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, name,
              ": stride, padding and dilation must have 2 entries");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              name, ": stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(weight.size(2) <= dwcpu::kMaxTaps && weight.size(3) <= dwcpu::kMaxTaps, name,
              ": kernel sizes up to ", dwcpu::kMaxTaps, " are supported");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), name, ": x and weight must have the same dtype");
  Args a;
  a.B = x.size(0); a.C = x.size(1); a.H = x.size(2); a.W = x.size(3);
  a.kh = (int)weight.size(2); a.kw = (int)weight.size(3);
  a.sh = (int)stride[0]; a.sw = (int)stride[1];
  a.ph = (int)padding[0]; a.pw = (int)padding[1];
  a.dh = (int)dilation[0]; a.dw = (int)dilation[1];
  a.Ho = dw::out_size(a.H, a.kh, a.sh, a.ph, a.dh);
  a.Wo = dw::out_size(a.W, a.kw, a.sw, a.pw, a.dw);
  TORCH_CHECK(a.Ho >= 1 && a.Wo >= 1, name, ": the output would be empty");
  return a;
}

// scratch plane of the forward correlation (and of the weight gradient)
template <typename T>
Geo forward_geo(const Args& a) {
  return dwcpu::make_geo(a.kh, a.kw, a.sh, a.sw, a.dh, a.dw, a.Ho, a.Wo, a.ph, a.pw, a.H, a.W, dwcpu::Vec<T>::N);
}

// scratch plane of the input gradient: grad[oh, ow] sits at (oh*sh + offh, ow*sw + offw), read by a stride-1
// correlation with the flipped filter that produces H x W
template <typename T>
Geo input_grad_geo(const Args& a, int64_t& offh, int64_t& offw) {
  offh = (int64_t)(a.kh - 1) * a.dh - a.ph;
  offw = (int64_t)(a.kw - 1) * a.dw - a.pw;
  Geo g = dwcpu::make_geo(a.kh, a.kw, 1, 1, a.dh, a.dw, a.H, a.W, 0, 0, 0, 0, dwcpu::Vec<T>::N);
  g.rlo = std::max<int64_t>(0, offh);
  g.rhi = std::min<int64_t>(g.rows, offh + (a.Ho - 1) * a.sh + 1);
  g.clo = std::max<int64_t>(0, offw);
  g.chi = std::min<int64_t>(g.ld, offw + (a.Wo - 1) * a.sw + 1);
  return g;
}

template <typename T>
void fill_upsampled(const Geo& g, const Args& a, int64_t offh, int64_t offw, const T* gp, T* buf) {
  if (a.sh == 1 && a.sw == 1 && g.rhi - g.rlo == a.Ho && g.chi - g.clo == a.Wo) {
    // nothing to upsample or clip: the plain plane copy (vectorised for this CPU)
    dwcpu::fill_plane<T>(g, gp, a.Wo, buf);
    return;
  }
  for (int64_t oh = 0; oh < a.Ho; ++oh) {
    const int64_t r = oh * a.sh + offh;
    if (r < 0 || r >= g.rows) continue;
    T* row = buf + r * g.ld;
    const T* src = gp + oh * a.Wo;
    if (a.sw == 1 && offw >= 0) {
      const int64_t n = std::min<int64_t>(a.Wo, g.ld - offw);
      if (n > 0) dwcpu::copy_row<T>(row + offw, src, n);
      continue;
    }
    for (int64_t ow = 0; ow < a.Wo; ++ow) {
      const int64_t c = ow * a.sw + offw;
      if (c >= 0 && c < g.ld) row[c] = src[ow];
    }
  }
}

at::Tensor depthwise_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Args a = check_args("vpfast::depthwise_conv2d_forward", x, weight, stride, padding, dilation);
  const auto X = x.contiguous(), Wt = weight.contiguous();
  at::Tensor Bt;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == a.C && bias->scalar_type() == x.scalar_type(),
                "vpfast::depthwise_conv2d_forward: bias must be [C] with x's dtype");
    Bt = bias->contiguous();
  }
  auto out = cpu::empty_output({a.B, a.C, a.Ho, a.Wo}, X.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "depthwise_conv2d_forward_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* wp = Wt.data_ptr<scalar_t>();
    const scalar_t* bp = Bt.defined() ? Bt.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const Geo g = forward_geo<scalar_t>(a);
    const auto taps = dwcpu::make_taps<scalar_t>(wp, a.C, a.kh, a.kw, false);
    cpu::parallel_for(0, a.B * a.C, 1, [&](int64_t p0, int64_t p1) {
      // zero once: every plane overwrites the same data region, the padding stays zero
      std::vector<scalar_t> buf(g.size(), scalar_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % a.C;
        if (p + 1 < p1) {
          const int64_t pn = (p + 1);
          dwcpu::prefetch_plane(xp + pn * a.H * a.W, a.H * a.W * sizeof(scalar_t));
          dwcpu::prefetch_plane_w(op + pn * a.Ho * a.Wo, a.Ho * a.Wo * sizeof(scalar_t));
        }
        dwcpu::fill_plane<scalar_t>(g, xp + p * a.H * a.W, a.W, buf.data());
        dwcpu::correlate_plane<scalar_t>(buf.data(), g, taps, c, bp ? bp[c] : scalar_t(0),
                                         op + p * a.Ho * a.Wo, a.Wo, a.Ho, a.Wo);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const Args a = check_args("vpfast::depthwise_conv2d_backward", x, weight, stride, padding, dilation);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == a.B && grad.size(1) == a.C && grad.size(2) == a.Ho &&
                  grad.size(3) == a.Wo && grad.scalar_type() == x.scalar_type(),
              "vpfast::depthwise_conv2d_backward: grad must be [B, C, Ho, Wo] with x's dtype");
  const auto G = grad.contiguous(), X = x.contiguous(), Wt = weight.contiguous();
  const int64_t K = (int64_t)a.kh * a.kw, P = a.B * a.C;
  auto gx = mask[0] ? cpu::empty_output({a.B, a.C, a.H, a.W}, X.options()) : at::empty({0}, X.options());
  auto gw = mask[1] ? at::empty({a.C, 1, a.kh, a.kw}, X.options()) : at::empty({0}, X.options());
  auto gb = mask[2] ? at::empty({a.C}, X.options()) : at::empty({0}, X.options());
  if (!(mask[0] || mask[1] || mask[2])) return {gx, gw, gb};
  if (P == 0) {
    if (mask[1]) gw.zero_();
    if (mask[2]) gb.zero_();
    return {gx, gw, gb};
  }
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int V = dwcpu::Vec<T>::N;
    const T* gp = G.data_ptr<T>();
    const T* xp = X.data_ptr<T>();
    const T* wp = Wt.data_ptr<T>();
    const Geo gf = forward_geo<T>(a);
    int64_t offh = 0, offw = 0;
    const Geo gi = input_grad_geo<T>(a, offh, offw);
    const auto flipped = mask[0] ? dwcpu::make_taps<T>(wp, a.C, a.kh, a.kw, true) : dwcpu::Taps<T>();
    const int64_t ldg = dwcpu::round_up(a.Wo, V);
    const bool reuse = dwcpu::wgrad_reuse(gf, a.Ho);
    // The weight gradient is a correlation either way round: dw[i, j] = sum gy[oh, ow] * xpad[oh*sh + i*dh, ...]
    // = sum x[h, w] * gpad[h + (kh-1-i)*dh, w + (kw-1-j)*dw], where gpad is the zero-padded (and, at stride 2,
    // zero-upsampled) output-gradient plane that the input gradient reads anyway; every row and column of it
    // that the sum reaches lies inside that scratch plane, clipped or not. When x's rows are whole vectors, the
    // row kernels take x in place against gpad (taps in reversed order), so x needs no padded copy: one plane
    // copy per plane instead of two (TAU's 5x5 backward at 16x16: 2-6% faster, alternating A/B).
    const bool swapped = mask[0] && mask[1] && a.W % V == 0 && dwcpu::row_kernels_cover(gi);
    // the weight gradient reads the output gradient in place when its rows are whole vectors (and no padded
    // copy is needed for the tap-row reuse path)
    const bool direct = swapped || (a.Wo % V == 0 && !reuse);
    const int64_t NB = dwcpu::batch_chunks(a.B, a.C), Bc = (a.B + NB - 1) / NB;
    std::vector<T> part_w(mask[1] ? NB * a.C * K : 0), part_b(mask[2] ? NB * a.C : 0);
    T* gxp = mask[0] ? gx.data_ptr<T>() : nullptr;
    // Tasks are (block of CB channels, chunk of samples). Inside a task the planes are visited sample by
    // sample, the block's channels in memory order, so each operand streams through runs of CB adjacent planes
    // rather than one plane per page (a channel's samples are C planes apart): TAU's 5x5 backward at 16x16 ran
    // 7-25% faster (runs of this VM differ) with 16-plane runs than one channel at a time. Small planes only
    // (large ones stream well on their own), with the block's vector partial sums kept within L1. A channel's
    // sums still add its samples in order, so the bits do not depend on CB.
    const int64_t plane_bytes = a.H * a.W * (int64_t)sizeof(T), wg_bytes = K * V * (int64_t)sizeof(T);
    const int64_t CB = std::max<int64_t>(1, std::min<int64_t>({dwcpu::kMaxChanBlock, 16384 / plane_bytes,
                                                               32768 / wg_bytes,
                                                               a.C / (4 * at::get_num_threads())}));
    const int64_t NCB = (a.C + CB - 1) / CB;
    cpu::parallel_for(0, NCB * NB, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> xbuf(mask[1] && !swapped ? gf.size() : 0, T(0));
      std::vector<T> ibuf(mask[0] ? gi.size() : 0, T(0));
      // grad plane with zero tail columns and kTapRows-1 zero rows above and below (weight_grad_general)
      constexpr int64_t pad = dwcpu::kTapRows - 1;
      std::vector<T> gpadded(mask[1] && !direct ? (a.Ho + 2 * pad) * ldg : 0, T(0));
      T* gcomp = mask[1] && !direct ? gpadded.data() + pad * ldg : nullptr;
      std::vector<dwcpu::WeightGrad<T>> wg(CB, dwcpu::WeightGrad<T>(mask[1] ? K : 0));
      std::array<T, dwcpu::kMaxChanBlock> bsum{};
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cb = t / NB, chunk = t % NB;
        const int64_t c0 = cb * CB, c1 = std::min(a.C, c0 + CB);
        const int64_t b0 = chunk * Bc, b1 = std::min(a.B, b0 + Bc);
        for (auto& w : wg) w.reset();
        bsum.fill(T(0));
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t p = b * a.C + c;
            // the next plane of this task
            const int64_t pn = c + 1 < c1 ? p + 1 : (b + 1 < b1 ? (b + 1) * a.C + c0 : -1);
            // the next plane's reads are requested now, its input-gradient lines only after this plane's weight
            // gradient: a plane of TAU's 5x5 backward issues 48 prefetches, and issued at once they queue for
            // the core's few line-fill buffers (they stood out in a perf profile of this loop). Split, the
            // backward ran ~5% faster (alternating A/B, one and two threads); the forward's 32 showed no such
            // effect.
            if (pn >= 0) {
              dwcpu::prefetch_plane(gp + pn * a.Ho * a.Wo, a.Ho * a.Wo * sizeof(T));
              if (mask[1]) dwcpu::prefetch_plane(xp + pn * a.H * a.W, a.H * a.W * sizeof(T));
            }
            const T* gplane = gp + p * a.Ho * a.Wo;
            bool bias_done = false;
            if (swapped) {
              fill_upsampled<T>(gi, a, offh, offw, gplane, ibuf.data());
              wg[c - c0].add(ibuf.data(), gi, xp + p * a.H * a.W, a.W, a.H, a.W);
            } else if (mask[1]) {
              dwcpu::fill_plane<T>(gf, xp + p * a.H * a.W, a.W, xbuf.data());
              if (direct) {
                bias_done = wg[c - c0].add(xbuf.data(), gf, gplane, a.Wo, a.Ho, a.Wo, nullptr, mask[2]);
              } else {
                for (int64_t oh = 0; oh < a.Ho; ++oh) dwcpu::copy_row<T>(gcomp + oh * ldg, gplane + oh * a.Wo, a.Wo);
                bias_done = wg[c - c0].add(xbuf.data(), gf, gcomp, ldg, a.Ho, a.Wo, reuse ? gcomp : nullptr, mask[2]);
              }
            }
            if (mask[2] && !bias_done) bsum[c - c0] += dwcpu::plane_sum<T>(gplane, a.Wo, a.Ho, a.Wo);
            if (mask[0] && pn >= 0) dwcpu::prefetch_plane_w(gxp + pn * a.H * a.W, a.H * a.W * sizeof(T));
            if (mask[0]) {
              if (!swapped) fill_upsampled<T>(gi, a, offh, offw, gplane, ibuf.data());
              dwcpu::correlate_plane<T>(ibuf.data(), gi, flipped, c, T(0), gxp + p * a.H * a.W, a.W, a.H, a.W);
            }
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          if (mask[1]) {
            T* dw = &part_w[(chunk * a.C + c) * K];
            wg[c - c0].result(dw);
            if (swapped) std::reverse(dw, dw + K);  // tap (i, j) was accumulated at (kh-1-i, kw-1-j)
          }
          if (mask[2]) part_b[chunk * a.C + c] = bsum[c - c0] + (mask[1] ? wg[c - c0].bias_result() : T(0));
        }
      }
    });
    if (mask[1]) dwcpu::reduce_batch<T>(part_w.data(), NB, a.C, K, gw.data_ptr<T>());
    if (mask[2]) dwcpu::reduce_batch<T>(part_b.data(), NB, a.C, 1, gb.data_ptr<T>());
  });
  return {gx, gw, gb};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("depthwise_conv2d_forward", &vpfast::depthwise_conv2d_forward_cpu);
  m.impl("depthwise_conv2d_backward", &vpfast::depthwise_conv2d_backward_cpu);
}
