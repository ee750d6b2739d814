// Large-kernel attention's depthwise pair, CUDA.
// Forward, fused: one block per 16x16 output tile of one plane; the input tile with both stages' halos is
// staged in shared memory, stage 0 writes the intermediate tile (with stage 1's halo, zero outside the map)
// to shared memory, stage 1 reads it there. Pairs whose tiles exceed a block's 48 KB run as two depthwise
// convolutions. Backward: composed from the depthwise_conv2d ops through the dispatcher (recompute mid, then
// the two transposed stages), whose weight/bias gradients are deterministic.
//
// As in depthwise_conv2d.cu: tiles of all B*C planes are numbered on gridDim.x (grid-stride loop; y/z are
// limited to 65535), indices are 64-bit, and half/bfloat16 inputs are computed in float (both shared tiles
// hold float, so the intermediate map is not rounded to the input's dtype between the stages).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <type_traits>

#include "common/depthwise_conv2d.h"

namespace vpfast {
namespace {

constexpr int kTile = 16;

struct PairGeometry {
  int64_t C, H, W;
  int k0h, k0w, k1h, k1w, d0h, d0w, d1h, d1w;
  int mid_h, mid_w, in_h, in_w;  // shared tiles (they fit in int: the host checked their bytes)
};

template <typename T>
__global__ void fused_forward_kernel(const T* __restrict__ x, const T* __restrict__ w0, const T* __restrict__ b0,
                                     const T* __restrict__ w1, const T* __restrict__ b1, T* __restrict__ out,
                                     PairGeometry g, dw::TileGrid tiles) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  A* ms = xs + g.in_h * g.in_w;
  const int p1h = g.d1h * (g.k1h / 2), p1w = g.d1w * (g.k1w / 2);
  const int p0h = g.d0h * (g.k0h / 2), p0w = g.d0w * (g.k0w / 2);
  const int tid = threadIdx.y * kTile + threadIdx.x, nthreads = kTile * kTile;
  for (int64_t item = blockIdx.x; item < tiles.total(); item += gridDim.x) {
    int64_t plane, ty, tx;
    tiles.locate(item, plane, ty, tx);
    const int64_t c = plane % g.C;
    const int64_t oh0 = ty * kTile, ow0 = tx * kTile;
    const int64_t mh0 = oh0 - p1h, mw0 = ow0 - p1w;  // map position of ms[0]
    const int64_t xh0 = mh0 - p0h, xw0 = mw0 - p0w;  // map position of xs[0]
    const T* xp = x + plane * g.H * g.W;
    __syncthreads();  // the previous item's stage 1 is done reading ms
    for (int k = tid; k < g.in_h * g.in_w; k += nthreads) {
      const int64_t h = xh0 + k / g.in_w, ww = xw0 + k % g.in_w;
      xs[k] = (h >= 0 && h < g.H && ww >= 0 && ww < g.W) ? static_cast<A>(xp[h * g.W + ww]) : A(0);
    }
    __syncthreads();
    const T* w0c = w0 + c * g.k0h * g.k0w;
    for (int k = tid; k < g.mid_h * g.mid_w; k += nthreads) {
      const int mi = k / g.mid_w, mj = k % g.mid_w;
      const int64_t h = mh0 + mi, ww = mw0 + mj;
      A acc = 0;
      if (h >= 0 && h < g.H && ww >= 0 && ww < g.W) {  // stage 1 pads the intermediate map with zeros
        acc = b0 ? static_cast<A>(b0[c]) : A(0);
        for (int i = 0; i < g.k0h; ++i)
          for (int j = 0; j < g.k0w; ++j)
            acc += static_cast<A>(w0c[i * g.k0w + j]) * xs[(mi + i * g.d0h) * g.in_w + mj + j * g.d0w];
      }
      ms[k] = acc;
    }
    __syncthreads();
    const int64_t oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
    if (oh < g.H && ow < g.W) {
      const T* w1c = w1 + c * g.k1h * g.k1w;
      A acc = b1 ? static_cast<A>(b1[c]) : A(0);
      for (int i = 0; i < g.k1h; ++i)
        for (int j = 0; j < g.k1w; ++j)
          acc += static_cast<A>(w1c[i * g.k1w + j]) * ms[(threadIdx.y + i * g.d1h) * g.mid_w + threadIdx.x + j * g.d1w];
      out[plane * g.H * g.W + oh * g.W + ow] = static_cast<T>(acc);
    }
  }
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
  for (const auto* w : {&w0, &w1})
    TORCH_CHECK(w->size(0) == x.size(1) && w->size(1) == 1 && w->scalar_type() == x.scalar_type(),
                "vpfast::large_kernel_attention_forward: weights must be [C, 1, kh, kw] in x's dtype");
  for (int64_t v : {d0[0], d0[1], d1[0], d1[1]})
    TORCH_CHECK(v >= 1 && v <= dw::kMaxGridX, "vpfast::large_kernel_attention_forward: dilation must be in [1, 2^31)");
  const c10::cuda::CUDAGuard guard(x.device());
  int64_t mid_h, mid_w, in_h, in_w;
  const int64_t elems = dw::pair_tile_elems(kTile, w0.size(2), w0.size(3), d0[0], d0[1], w1.size(2), w1.size(3),
                                            d1[0], d1[1], mid_h, mid_w, in_h, in_w);
  // float tiles for the half types too (at::opmath_type)
  const int64_t smem = elems * (x.scalar_type() == at::kDouble ? 8 : 4);
  if (smem > dw::kMaxSharedBytes) return dw_forward(dw_forward(x, w0, b0, d0), w1, b1, d1);  // too large to fuse
  PairGeometry g;
  g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.k0h = (int)w0.size(2); g.k0w = (int)w0.size(3); g.k1h = (int)w1.size(2); g.k1w = (int)w1.size(3);
  g.d0h = (int)d0[0]; g.d0w = (int)d0[1]; g.d1h = (int)d1[0]; g.d1w = (int)d1[1];
  g.mid_h = (int)mid_h; g.mid_w = (int)mid_w; g.in_h = (int)in_h; g.in_w = (int)in_w;
  const auto X = x.contiguous(), W0 = w0.contiguous(), W1 = w1.contiguous();
  const at::Tensor B0 = (b0.has_value() && b0->defined()) ? b0->contiguous() : at::Tensor();
  const at::Tensor B1 = (b1.has_value() && b1->defined()) ? b1->contiguous() : at::Tensor();
  auto out = at::empty_like(X);
  if (out.numel() == 0) return out;
  const dw::TileGrid tiles = dw::tile_grid(x.size(0) * g.C, g.H, g.W, kTile);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "large_kernel_attention_forward_cuda", [&] {
    static_assert(sizeof(at::opmath_type<scalar_t>) == (std::is_same_v<scalar_t, double> ? 8 : 4));
    fused_forward_kernel<scalar_t><<<(unsigned)dw::grid_x(tiles.total(), 1), dim3(kTile, kTile), smem,
                                     at::cuda::getCurrentCUDAStream()>>>(
        X.data_ptr<scalar_t>(), W0.data_ptr<scalar_t>(), B0.defined() ? B0.data_ptr<scalar_t>() : nullptr,
        W1.data_ptr<scalar_t>(), B1.defined() ? B1.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g,
        tiles);
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
