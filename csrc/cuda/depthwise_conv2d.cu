// Depthwise convolution, CUDA.
// Forward: one block per 16x16 output tile of one (sample, channel) plane; the input window with its dilated
// halo and the channel's filter are staged in shared memory. Windows too large for a block's 48 KB (huge
// dilations or strides) take a direct kernel, one thread per output reading global memory. Input gradient:
// one thread per input element, gathering the output-gradient positions that read it (common/
// depthwise_conv2d.h, as on the CPU). Weight and bias gradients: one block per (channel, tap), each thread
// sums a fixed strided subset and the block reduces in a fixed tree, so the result is identical on every run
// (no atomics).
//
// Launch limits: every grid counts its work on x alone (B*C planes reach 65536 in TAU's MixMlp, beyond
// gridDim.y/z's 65535) and loops with a grid stride; indices are 64-bit. Half and bfloat16 tensors are read
// into at::opmath_type (float), which the arithmetic, the shared tiles and every reduction use; results are
// stored in the input's dtype.
#include <ATen/OpMathType.h>
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
constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;  // a power of two (tree reduction)

struct Geometry {
  int64_t B, C, H, W, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Shared-tile extents of the tiled forward; they fit in int because the host checked the tile's bytes.
struct TileShape {
  int in_h, in_w, kh, kw, sh, sw, dh, dw;
};

template <typename T>
__global__ void forward_tiled_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                     T* __restrict__ out, Geometry g, dw::TileGrid tiles, TileShape ts) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  A* ws = xs + ts.in_h * ts.in_w;
  const int tid = threadIdx.y * kTile + threadIdx.x, nthreads = kTile * kTile;
  for (int64_t item = blockIdx.x; item < tiles.total(); item += gridDim.x) {
    int64_t plane, ty, tx;
    tiles.locate(item, plane, ty, tx);
    const int64_t c = plane % g.C;
    const int64_t oh0 = ty * kTile, ow0 = tx * kTile;
    const int64_t h0 = oh0 * g.sh - g.ph, w0 = ow0 * g.sw - g.pw;
    const T* xp = x + plane * g.H * g.W;
    __syncthreads();  // the previous item's reads of the shared tiles are done
    for (int k = tid; k < ts.kh * ts.kw; k += nthreads) ws[k] = static_cast<A>(w[c * ts.kh * ts.kw + k]);
    for (int k = tid; k < ts.in_h * ts.in_w; k += nthreads) {
      const int64_t h = h0 + k / ts.in_w, ww = w0 + k % ts.in_w;
      xs[k] = (h >= 0 && h < g.H && ww >= 0 && ww < g.W) ? static_cast<A>(xp[h * g.W + ww]) : A(0);
    }
    __syncthreads();
    const int64_t oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
    if (oh < g.Ho && ow < g.Wo) {
      A acc = bias ? static_cast<A>(bias[c]) : A(0);
      const int base = threadIdx.y * ts.sh * ts.in_w + threadIdx.x * ts.sw;
      for (int i = 0; i < ts.kh; ++i)
        for (int j = 0; j < ts.kw; ++j) acc += ws[i * ts.kw + j] * xs[base + i * ts.dh * ts.in_w + j * ts.dw];
      out[plane * g.Ho * g.Wo + oh * g.Wo + ow] = static_cast<T>(acc);
    }
  }
}

template <typename T>
__global__ void forward_direct_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                      T* __restrict__ out, Geometry g) {
  using A = at::opmath_type<T>;
  const int64_t n = g.B * g.C * g.Ho * g.Wo;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ow = e % g.Wo, oh = (e / g.Wo) % g.Ho, plane = e / (g.Ho * g.Wo), c = plane % g.C;
    const T* xp = x + plane * g.H * g.W;
    const T* wc = w + c * g.kh * g.kw;
    A acc = bias ? static_cast<A>(bias[c]) : A(0);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t h = oh * g.sh - g.ph + i * g.dh;
      if (h < 0 || h >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ww = ow * g.sw - g.pw + j * g.dw;
        if (ww >= 0 && ww < g.W) acc += static_cast<A>(wc[i * g.kw + j]) * static_cast<A>(xp[h * g.W + ww]);
      }
    }
    out[e] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void input_grad_kernel(const T* __restrict__ grad, const T* __restrict__ w, T* __restrict__ gx,
                                  Geometry g) {
  using A = at::opmath_type<T>;
  const int64_t n = g.B * g.C * g.H * g.W;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ww = e % g.W, h = (e / g.W) % g.H, plane = e / (g.H * g.W), c = plane % g.C;
    const T* gp = grad + plane * g.Ho * g.Wo;
    const T* wc = w + c * g.kh * g.kw;
    A acc = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oh = dw::grad_source(h, i, g.sh, g.ph, g.dh, g.Ho);
      if (oh < 0) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ow = dw::grad_source(ww, j, g.sw, g.pw, g.dw, g.Wo);
        if (ow >= 0) acc += static_cast<A>(wc[i * g.kw + j]) * static_cast<A>(gp[oh * g.Wo + ow]);
      }
    }
    gx[e] = static_cast<T>(acc);
  }
}

// Every thread returns the sum of v over the block, added in a fixed tree.
template <typename A>
__device__ A block_sum(A v, A* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const A total = smem[0];
  __syncthreads();  // smem is written again by the caller's next item
  return total;
}

// Work item = c * (K + 1) + k; k < K: weight tap k, k == K: bias.
template <typename T>
__global__ void param_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gw,
                                  T* __restrict__ gb, Geometry g, bool need_w, bool need_b) {
  using A = at::opmath_type<T>;
  __shared__ A smem[kReduceThreads];
  const int64_t K = g.kh * g.kw, items = g.C * (K + 1);
  const int64_t per_plane = g.Ho * g.Wo, n = g.B * per_plane;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c = item / (K + 1), k = item % (K + 1);
    if ((k < K && !need_w) || (k == K && !need_b)) continue;  // uniform over the block
    const int64_t i = k / g.kw, j = k % g.kw;
    A acc = 0;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const int64_t b = e / per_plane, q = e % per_plane, oh = q / g.Wo, ow = q % g.Wo;
      const A gv = static_cast<A>(grad[(b * g.C + c) * per_plane + q]);
      if (k == K) {
        acc += gv;
      } else {
        const int64_t h = oh * g.sh - g.ph + i * g.dh, ww = ow * g.sw - g.pw + j * g.dw;
        if (h >= 0 && h < g.H && ww >= 0 && ww < g.W)
          acc += gv * static_cast<A>(x[((b * g.C + c) * g.H + h) * g.W + ww]);
      }
    }
    const A total = block_sum<A>(acc, smem);
    if (threadIdx.x == 0) {
      if (k == K) gb[c] = static_cast<T>(total);
      else gw[c * K + k] = static_cast<T>(total);
    }
  }
}

Geometry geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef s, at::IntArrayRef p,
                  at::IntArrayRef d) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1,
              "vpfast::depthwise_conv2d: x must be [B, C, H, W] and weight [C, 1, kh, kw]");
  TORCH_CHECK(s.size() == 2 && p.size() == 2 && d.size() == 2, "vpfast::depthwise_conv2d: bad stride/padding/dilation");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "vpfast::depthwise_conv2d: weight must have x's dtype");
  Geometry g;
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.kh = w.size(2); g.kw = w.size(3);
  g.sh = s[0]; g.sw = s[1]; g.ph = p[0]; g.pw = p[1]; g.dh = d[0]; g.dw = d[1];
  for (int64_t v : {g.sh, g.sw, g.dh, g.dw, g.kh, g.kw})
    TORCH_CHECK(v >= 1 && v <= dw::kMaxGridX, "vpfast::depthwise_conv2d: stride, dilation and kernel size must "
                "be in [1, 2^31)");
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && g.ph <= dw::kMaxGridX && g.pw <= dw::kMaxGridX,
              "vpfast::depthwise_conv2d: padding must be in [0, 2^31)");
  g.Ho = dw::out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = dw::out_size(g.W, g.kw, g.sw, g.pw, g.dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "vpfast::depthwise_conv2d: the output would be empty");
  return g;
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(x, weight, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto X = x.contiguous(), Wt = weight.contiguous();
  const at::Tensor Bt = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  auto out = at::empty({g.B, g.C, g.Ho, g.Wo}, X.options());
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t tile_elems = dw::forward_tile_elems(kTile, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "depthwise_conv2d_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* bp = Bt.defined() ? Bt.data_ptr<scalar_t>() : nullptr;
    const int64_t smem = tile_elems * (int64_t)sizeof(A);
    if (smem <= dw::kMaxSharedBytes) {
      const dw::TileGrid tiles = dw::tile_grid(g.B * g.C, g.Ho, g.Wo, kTile);
      TileShape ts;
      ts.in_h = (int)((kTile - 1) * g.sh + (g.kh - 1) * g.dh + 1);
      ts.in_w = (int)((kTile - 1) * g.sw + (g.kw - 1) * g.dw + 1);
      ts.kh = (int)g.kh; ts.kw = (int)g.kw; ts.sh = (int)g.sh; ts.sw = (int)g.sw; ts.dh = (int)g.dh; ts.dw = (int)g.dw;
      forward_tiled_kernel<scalar_t><<<(unsigned)dw::grid_x(tiles.total(), 1), dim3(kTile, kTile), smem, stream>>>(
          X.data_ptr<scalar_t>(), Wt.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), g, tiles, ts);
    } else {
      forward_direct_kernel<scalar_t><<<(unsigned)dw::grid_x(out.numel(), kThreads), kThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), Wt.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              std::array<bool, 3> mask) {
  const Geometry g = geometry(x, weight, stride, padding, dilation);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.B && grad.size(1) == g.C && grad.size(2) == g.Ho &&
              grad.size(3) == g.Wo && grad.scalar_type() == x.scalar_type(),
              "vpfast::depthwise_conv2d_backward: grad must be [B, C, Ho, Wo] in x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto G = grad.contiguous(), X = x.contiguous(), Wt = weight.contiguous();
  auto gx = mask[0] ? at::empty({g.B, g.C, g.H, g.W}, X.options()) : at::empty({0}, X.options());
  auto gw = mask[1] ? at::zeros({g.C, 1, g.kh, g.kw}, X.options()) : at::empty({0}, X.options());
  auto gb = mask[2] ? at::zeros({g.C}, X.options()) : at::empty({0}, X.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "depthwise_conv2d_backward_cuda", [&] {
    if (mask[0] && gx.numel() > 0) {
      input_grad_kernel<scalar_t><<<(unsigned)dw::grid_x(gx.numel(), kThreads), kThreads, 0, stream>>>(
          G.data_ptr<scalar_t>(), Wt.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // with B == 0 the gradients stay the zeros they were allocated as
    if ((mask[1] || mask[2]) && g.B > 0 && g.C > 0) {
      const int64_t items = g.C * (g.kh * g.kw + 1);
      param_grad_kernel<scalar_t><<<(unsigned)dw::grid_x(items, 1), kReduceThreads, 0, stream>>>(
          G.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), mask[1] ? gw.data_ptr<scalar_t>() : nullptr,
          mask[2] ? gb.data_ptr<scalar_t>() : nullptr, g, mask[1], mask[2]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw, gb};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("depthwise_conv2d_forward", &vpfast::forward_cuda);
  m.impl("depthwise_conv2d_backward", &vpfast::backward_cuda);
}
