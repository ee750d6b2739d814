// Large-kernel attention's depthwise pair, CUDA (compiled in CI, not run here: no GPU).
// Forward, fused: one block per 16x16 output tile of one plane; the input tile with both stages' halos is
// staged in shared memory, stage 0 writes the intermediate tile (with stage 1's halo, zero outside the map)
// to shared memory, stage 1 reads it there. Backward: composed from the depthwise_conv2d ops through the
// dispatcher (recompute mid, then the two transposed stages), whose weight/bias gradients are deterministic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "common/depthwise_conv2d.h"

namespace vpfast {
namespace {

constexpr int kTile = 16;
constexpr size_t kMaxSmem = 48 * 1024;

struct PairGeometry {
  int64_t C, H, W;
  int k0h, k0w, k1h, k1w, d0h, d0w, d1h, d1w;
  int mid_h, mid_w, in_h, in_w;  // shared tiles
};

template <typename T>
__global__ void fused_forward_kernel(const T* __restrict__ x, const T* __restrict__ w0, const T* __restrict__ b0,
                                     const T* __restrict__ w1, const T* __restrict__ b1, T* __restrict__ out,
                                     PairGeometry g) {
  extern __shared__ unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ms = xs + g.in_h * g.in_w;
  const int64_t plane = blockIdx.z, c = plane % g.C;
  const int64_t oh0 = (int64_t)blockIdx.y * kTile, ow0 = (int64_t)blockIdx.x * kTile;
  const int p1h = g.d1h * (g.k1h / 2), p1w = g.d1w * (g.k1w / 2);
  const int p0h = g.d0h * (g.k0h / 2), p0w = g.d0w * (g.k0w / 2);
  const int64_t mh0 = oh0 - p1h, mw0 = ow0 - p1w;  // map position of ms[0]
  const int64_t xh0 = mh0 - p0h, xw0 = mw0 - p0w;  // map position of xs[0]
  const T* xp = x + plane * g.H * g.W;
  const int tid = threadIdx.y * kTile + threadIdx.x, nthreads = kTile * kTile;
  for (int k = tid; k < g.in_h * g.in_w; k += nthreads) {
    const int64_t h = xh0 + k / g.in_w, ww = xw0 + k % g.in_w;
    xs[k] = (h >= 0 && h < g.H && ww >= 0 && ww < g.W) ? xp[h * g.W + ww] : T(0);
  }
  __syncthreads();
  const T* w0c = w0 + c * g.k0h * g.k0w;
  for (int k = tid; k < g.mid_h * g.mid_w; k += nthreads) {
    const int mi = k / g.mid_w, mj = k % g.mid_w;
    const int64_t h = mh0 + mi, ww = mw0 + mj;
    T acc = 0;
    if (h >= 0 && h < g.H && ww >= 0 && ww < g.W) {  // stage 1 pads the intermediate map with zeros
      acc = b0 ? b0[c] : T(0);
      for (int i = 0; i < g.k0h; ++i)
        for (int j = 0; j < g.k0w; ++j) acc += w0c[i * g.k0w + j] * xs[(mi + i * g.d0h) * g.in_w + mj + j * g.d0w];
    }
    ms[k] = acc;
  }
  __syncthreads();
  const int64_t oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
  if (oh >= g.H || ow >= g.W) return;
  const T* w1c = w1 + c * g.k1h * g.k1w;
  T acc = b1 ? b1[c] : T(0);
  for (int i = 0; i < g.k1h; ++i)
    for (int j = 0; j < g.k1w; ++j)
      acc += w1c[i * g.k1w + j] * ms[(threadIdx.y + i * g.d1h) * g.mid_w + threadIdx.x + j * g.d1w];
  out[plane * g.H * g.W + oh * g.W + ow] = acc;
}

std::vector<int64_t> same_padding(const at::Tensor& w, at::IntArrayRef d) {
  return {d[0] * (w.size(2) / 2), d[1] * (w.size(3) / 2)};
}

at::Tensor dw_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      at::IntArrayRef d) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vpfast::depthwise_conv2d_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  const std::vector<int64_t> one{1, 1};
  return op.call(x, w, b, one, same_padding(w, d), d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_backward(const at::Tensor& g, const at::Tensor& x,
                                                           const at::Tensor& w, at::IntArrayRef d,
                                                           std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vpfast::depthwise_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, std::array<bool, 3>)>();
  const std::vector<int64_t> one{1, 1};
  return op.call(g, x, w, one, same_padding(w, d), d, mask);
}

at::Tensor lka_forward_cuda(const at::Tensor& x, const at::Tensor& w0, const std::optional<at::Tensor>& b0,
                            const at::Tensor& w1, const std::optional<at::Tensor>& b1, at::IntArrayRef d0,
                            at::IntArrayRef d1) {
  TORCH_CHECK(x.dim() == 4 && w0.dim() == 4 && w1.dim() == 4 && d0.size() == 2 && d1.size() == 2,
              "vpfast::large_kernel_attention_forward: bad arguments");
  const c10::cuda::CUDAGuard guard(x.device());
  PairGeometry g;
  g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.k0h = (int)w0.size(2); g.k0w = (int)w0.size(3); g.k1h = (int)w1.size(2); g.k1w = (int)w1.size(3);
  g.d0h = (int)d0[0]; g.d0w = (int)d0[1]; g.d1h = (int)d1[0]; g.d1w = (int)d1[1];
  g.mid_h = kTile + (g.k1h - 1) * g.d1h; g.mid_w = kTile + (g.k1w - 1) * g.d1w;
  g.in_h = g.mid_h + (g.k0h - 1) * g.d0h; g.in_w = g.mid_w + (g.k0w - 1) * g.d0w;
  const size_t smem = x.element_size() * ((size_t)g.in_h * g.in_w + (size_t)g.mid_h * g.mid_w);
  if (smem > kMaxSmem) return dw_forward(dw_forward(x, w0, b0, d0), w1, b1, d1);  // too large to fuse
  const auto X = x.contiguous(), W0 = w0.contiguous(), W1 = w1.contiguous();
  const at::Tensor B0 = (b0.has_value() && b0->defined()) ? b0->contiguous() : at::Tensor();
  const at::Tensor B1 = (b1.has_value() && b1->defined()) ? b1->contiguous() : at::Tensor();
  auto out = at::empty_like(X);
  if (out.numel() == 0) return out;
  const dim3 block(kTile, kTile), grid((g.W + kTile - 1) / kTile, (g.H + kTile - 1) / kTile, x.size(0) * g.C);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "large_kernel_attention_forward_cuda", [&] {
    fused_forward_kernel<scalar_t><<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(
        X.data_ptr<scalar_t>(), W0.data_ptr<scalar_t>(), B0.defined() ? B0.data_ptr<scalar_t>() : nullptr,
        W1.data_ptr<scalar_t>(), B1.defined() ? B1.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lka_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w0, const std::optional<at::Tensor>& b0,
    const at::Tensor& w1, at::IntArrayRef d0, at::IntArrayRef d1, std::array<bool, 5> mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto mid = dw_forward(x, w0, b0, d0);
  const bool need_gmid = mask[0] || mask[1] || mask[2];
  auto [gmid, gw1, gb1] = dw_backward(grad, mid, w1, d1, {need_gmid, mask[3], mask[4]});
  at::Tensor gx = at::empty({0}, x.options()), gw0 = at::empty({0}, x.options()), gb0 = at::empty({0}, x.options());
  if (need_gmid) std::tie(gx, gw0, gb0) = dw_backward(gmid, x, w0, d0, {mask[0], mask[1], mask[2]});
  return {gx, gw0, gb0, gw1, gb1};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("large_kernel_attention_forward", &vpfast::lka_forward_cuda);
  m.impl("large_kernel_attention_backward", &vpfast::lka_backward_cuda);
}
