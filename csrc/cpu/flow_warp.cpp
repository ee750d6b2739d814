// Flow warp, CPU. Forward: one task per (image, channel block) computes the sample geometry of every pixel
// once (four corner indices and weights, common/flow_warp.h) and fills its channels with four gathers
// each; no grid tensor is built. Backward: one task per (image, row block) recomputes the geometry and
// reduces the flow gradient over channels in channel order; one task per (image, channel) scatters the
// input gradient of that plane in a fixed order. Deterministic, no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/denormals.h"
#include "common/flow_warp.h"
#include "cpu/output_cache.h"
#include "cpu/warp_gather.h"

namespace vpfast {
namespace {

// Geometry of rows [h0, h1) of one image into idx/wt (4 planes of HW entries each, corners 00, 01, 10, 11).
// When grad is set, it also keeps what the flow gradient needs: validity m (4 planes), fractions ly/lx and
// derivative factors fy/fx, each at scratch + plane * HW.
template <typename T, bool kGrad>
VPFAST_CPU_CLONES void flow_table(const T* flow, int32_t H, int32_t W, int32_t h0, int32_t h1, bool border,
                                  bool align_corners, int32_t* idx, T* wt, T* scratch) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const T* fx = flow;
  const T* fy = flow + HW;
  for (int32_t h = h0; h < h1; ++h) {
    const int64_t row = static_cast<int64_t>(h) * W;
#pragma omp simd
    for (int32_t w = 0; w < W; ++w) {
      const int64_t p = row + w;
      T dfy, dfx;
      const T py = warp::flow_coord<T>(T(h), fy[p], H, border, align_corners, dfy);
      const T px = warp::flow_coord<T>(T(w), fx[p], W, border, align_corners, dfx);
      const auto c = warp::corners<T>(py, px, H, W);
      T w00, w01, w10, w11;
      warp::corner_weights<T>(c, T(1), w00, w01, w10, w11);
      idx[p] = c.r0 + c.c0;
      idx[HW + p] = c.r0 + c.c1;
      idx[2 * HW + p] = c.r1 + c.c0;
      idx[3 * HW + p] = c.r1 + c.c1;
      wt[p] = w00;
      wt[HW + p] = w01;
      wt[2 * HW + p] = w10;
      wt[3 * HW + p] = w11;
      if (kGrad) {
        scratch[p] = c.vy0 * c.vx0;
        scratch[HW + p] = c.vy0 * c.vx1;
        scratch[2 * HW + p] = c.vy1 * c.vx0;
        scratch[3 * HW + p] = c.vy1 * c.vx1;
        scratch[4 * HW + p] = c.ly;
        scratch[5 * HW + p] = c.lx;
        scratch[6 * HW + p] = dfy;
        scratch[7 * HW + p] = dfx;
      }
    }
  }
}

template <typename T>
VPFAST_CPU_CLONES void warp_channels_generic(const T* x, int64_t HW, const int32_t* idx, const T* wt, int64_t c0, int64_t c1,
                                     T* out) {
  const int32_t *i0 = idx, *i1 = idx + HW, *i2 = idx + 2 * HW, *i3 = idx + 3 * HW;
  const T *w0 = wt, *w1 = wt + HW, *w2 = wt + 2 * HW, *w3 = wt + 3 * HW;
  for (int64_t c = c0; c < c1; ++c) {
    const T* xc = x + c * HW;
    T* o = out + c * HW;
#pragma omp simd
    for (int64_t p = 0; p < HW; ++p) o[p] = w0[p] * xc[i0[p]] + w1[p] * xc[i1[p]] + w2[p] * xc[i2[p]] + w3[p] * xc[i3[p]];
  }
}

template <typename T>
void warp_channels(const T* x, int64_t HW, const int32_t* idx, const T* wt, int64_t c0, int64_t c1, T* out) {
  if (!warp::cpu_has_avx512()) return warp_channels_generic<T>(x, HW, idx, wt, c0, c1, out);
  const int32_t* ip[4] = {idx, idx + HW, idx + 2 * HW, idx + 3 * HW};
  const T* wp[4] = {wt, wt + HW, wt + 2 * HW, wt + 3 * HW};
  for (int64_t c = c0; c < c1; ++c) warp::gather4<T>(x + c * HW, ip, wp, out + c * HW, HW);
}

// Flow gradient for pixels [p0, p1) of one image, reduced over the C channels in order.
template <typename T>
VPFAST_CPU_CLONES void flow_grad_pixels(const T* x, const T* g, int64_t C, int64_t HW, int64_t p0, int64_t p1,
                                        const int32_t* idx, const T* scratch, T* gflow) {
  const int32_t *i0 = idx, *i1 = idx + HW, *i2 = idx + 2 * HW, *i3 = idx + 3 * HW;
  const T *m0 = scratch, *m1 = scratch + HW, *m2 = scratch + 2 * HW, *m3 = scratch + 3 * HW;
  const T *ly = scratch + 4 * HW, *lx = scratch + 5 * HW, *dfy = scratch + 6 * HW, *dfx = scratch + 7 * HW;
  T* gfx = gflow;
  T* gfy = gflow + HW;
#pragma omp simd
  for (int64_t p = p0; p < p1; ++p) {
    gfx[p] = T(0);
    gfy[p] = T(0);
  }
  bool done = false;
#ifdef VPFAST_X86_GATHER
  if constexpr (std::is_same_v<T, float>) {
    if (warp::cpu_has_avx512()) {
      const int32_t* ip[4] = {i0, i1, i2, i3};
      const T* mp[4] = {m0, m1, m2, m3};
      warp::grad_channels_f32(x, HW, g, HW, nullptr, 0, nullptr, C, ip, mp, ly, lx, nullptr, gfy, gfx, p0, p1);
      done = true;
    }
  }
#endif
  for (int64_t c = 0; c < C && !done; ++c) {
    const T* xc = x + c * HW;
    const T* gc = g + c * HW;
#pragma omp simd
    for (int64_t p = p0; p < p1; ++p) {
      T s, dy, dx;
      warp::sample_grad<T>(m0[p] * xc[i0[p]], m1[p] * xc[i1[p]], m2[p] * xc[i2[p]], m3[p] * xc[i3[p]], ly[p], lx[p], s,
                           dy, dx);
      gfy[p] += gc[p] * dy;
      gfx[p] += gc[p] * dx;
    }
  }
#pragma omp simd
  for (int64_t p = p0; p < p1; ++p) {
    gfy[p] *= dfy[p];
    gfx[p] *= dfx[p];
  }
}

template <typename T> void scatter_channel(const T* g, int64_t HW, const int32_t* idx, const T* wt, T* gx) {
  std::fill(gx, gx + HW, T(0));
  const int32_t* ip[4] = {idx, idx + HW, idx + 2 * HW, idx + 3 * HW};
  const T* wp[4] = {wt, wt + HW, wt + 2 * HW, wt + 3 * HW};
  warp::scatter4<T>(gx, ip, wp, g, HW);
}

at::Tensor flow_warp_forward_cpu(const at::Tensor& x, const at::Tensor& flow, bool border, bool align_corners) {
  warp::check_flow_inputs("vpfast::flow_warp_forward", x, flow);
  const auto X = x.contiguous(), FL = flow.contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3), HW = H * W;
  auto out = cpu::empty_output(X.sizes(), X.options());
  if (out.numel() == 0) return out;
  const int threads = at::get_num_threads();
  const int64_t ncb = std::min<int64_t>(C, std::max<int64_t>(1, (4 * threads + B - 1) / B));
  const int64_t cper = (C + ncb - 1) / ncb;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "flow_warp_forward_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* fp = FL.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    cpu::parallel_for(0, B * ncb, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> idx(4 * HW);
      std::vector<scalar_t> wt(4 * HW);
      int64_t last = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / ncb, cb = t % ncb;
        if (b != last) {
          flow_table<scalar_t, false>(fp + b * 2 * HW, (int32_t)H, (int32_t)W, 0, (int32_t)H, border, align_corners,
                                      idx.data(), wt.data(), nullptr);
          last = b;
        }
        const int64_t c0 = cb * cper, c1 = std::min(C, c0 + cper);
        if (c0 < c1) warp_channels<scalar_t>(xp + b * C * HW, HW, idx.data(), wt.data(), c0, c1, outp + b * C * HW);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_warp_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& flow, bool border, bool align_corners,
                                                          bool need_x, bool need_flow) {
  warp::check_flow_backward("vpfast::flow_warp_backward", grad, x, flow);
  const auto X = x.contiguous(), FL = flow.contiguous(), G = grad.to(x.scalar_type()).contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3), HW = H * W;
  auto gx = need_x ? cpu::empty_output(X.sizes(), X.options()) : at::empty({0}, X.options());
  auto gf = need_flow ? cpu::empty_output(FL.sizes(), FL.options()) : at::empty({0}, X.options());
  if (B == 0 || HW == 0 || C == 0 || !(need_x || need_flow)) {
    if (need_x) gx.zero_();
    if (need_flow) gf.zero_();
    return {gx, gf};
  }
  auto idx = cpu::empty_output({B, 4, HW}, X.options().dtype(at::kInt));
  auto wt = cpu::empty_output({B, 4, HW}, X.options());
  auto scratch = need_flow ? cpu::empty_output({B, 8, HW}, X.options()) : at::empty({0}, X.options());
  const int threads = at::get_num_threads();
  const int64_t nhb = std::min<int64_t>(H, std::max<int64_t>(1, (4 * threads + B - 1) / B));
  const int64_t hper = (H + nhb - 1) / nhb;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "flow_warp_backward_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* fp = FL.data_ptr<scalar_t>();
    const scalar_t* gp = G.data_ptr<scalar_t>();
    int32_t* ip = idx.data_ptr<int32_t>();
    scalar_t* wp = wt.data_ptr<scalar_t>();
    scalar_t* sp = need_flow ? scratch.data_ptr<scalar_t>() : nullptr;
    cpu::parallel_for(0, B * nhb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nhb, hb = t % nhb;
        const int64_t h0 = std::min(H, hb * hper), h1 = std::min(H, h0 + hper);
        if (h0 >= h1) continue;
        if (need_flow) {
          flow_table<scalar_t, true>(fp + b * 2 * HW, (int32_t)H, (int32_t)W, (int32_t)h0, (int32_t)h1, border,
                                     align_corners, ip + b * 4 * HW, wp + b * 4 * HW, sp + b * 8 * HW);
          flow_grad_pixels<scalar_t>(xp + b * C * HW, gp + b * C * HW, C, HW, h0 * W, h1 * W, ip + b * 4 * HW,
                                     sp + b * 8 * HW, gf.data_ptr<scalar_t>() + b * 2 * HW);
        } else {
          flow_table<scalar_t, false>(fp + b * 2 * HW, (int32_t)H, (int32_t)W, (int32_t)h0, (int32_t)h1, border,
                                      align_corners, ip + b * 4 * HW, wp + b * 4 * HW, nullptr);
        }
      }
    });
    if (need_x) {
      scalar_t* gxp = gx.data_ptr<scalar_t>();
      cpu::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / C;
          scatter_channel<scalar_t>(gp + t * HW, HW, ip + b * 4 * HW, wp + b * 4 * HW, gxp + t * HW);
        }
      });
    }
  });
  return {gx, gf};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("flow_warp_forward", &vpfast::flow_warp_forward_cpu);
  m.impl("flow_warp_backward", &vpfast::flow_warp_backward_cpu);
}
