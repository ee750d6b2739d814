// Depthwise convolution, CUDA (compiled in CI, not run here: the project has no GPU).
// Forward: one block per 16x16 output tile of one (sample, channel) plane; the input tile with its dilated
// halo and the channel's filter are staged in shared memory. Input gradient: one thread per input element,
// gathering the output-gradient positions that read it (common/depthwise_conv2d.h, as on the CPU). Weight and
// bias gradients: one block per (channel, tap), each thread sums a fixed strided subset and the block
// reduces in a fixed tree, so the result is identical on every run (no atomics).
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
constexpr int kReduceThreads = 256;

struct Geometry {
  int64_t B, C, H, W, Ho, Wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                               T* __restrict__ out, Geometry g) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int in_h = (kTile - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  const int in_w = (kTile - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  T* wsm = smem + in_h * in_w;
  const int64_t plane = blockIdx.z, c = plane % g.C;
  const int64_t oh0 = (int64_t)blockIdx.y * kTile, ow0 = (int64_t)blockIdx.x * kTile;
  const int64_t h0 = oh0 * g.sh - g.ph, w0 = ow0 * g.sw - g.pw;
  const T* xp = x + plane * g.H * g.W;
  const int tid = threadIdx.y * kTile + threadIdx.x, nthreads = kTile * kTile;
  for (int k = tid; k < g.kh * g.kw; k += nthreads) wsm[k] = w[c * g.kh * g.kw + k];
  for (int k = tid; k < in_h * in_w; k += nthreads) {
    const int64_t h = h0 + k / in_w, ww = w0 + k % in_w;
    smem[k] = (h >= 0 && h < g.H && ww >= 0 && ww < g.W) ? xp[h * g.W + ww] : T(0);
  }
  __syncthreads();
  const int64_t oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
  if (oh >= g.Ho || ow >= g.Wo) return;
  T acc = bias ? bias[c] : T(0);
  const int base = threadIdx.y * g.sh * in_w + threadIdx.x * g.sw;
  for (int i = 0; i < g.kh; ++i)
    for (int j = 0; j < g.kw; ++j) acc += wsm[i * g.kw + j] * smem[base + i * g.dh * in_w + j * g.dw];
  out[plane * g.Ho * g.Wo + oh * g.Wo + ow] = acc;
}

template <typename T>
__global__ void input_grad_kernel(const T* __restrict__ grad, const T* __restrict__ w, T* __restrict__ gx,
                                  Geometry g) {
  const int64_t n = g.B * g.C * g.H * g.W;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ww = e % g.W, h = (e / g.W) % g.H, plane = e / (g.H * g.W), c = plane % g.C;
    const T* gp = grad + plane * g.Ho * g.Wo;
    const T* wc = w + c * g.kh * g.kw;
    T acc = 0;
    for (int i = 0; i < g.kh; ++i) {
      const int64_t oh = dw::grad_source(h, i, g.sh, g.ph, g.dh, g.Ho);
      if (oh < 0) continue;
      for (int j = 0; j < g.kw; ++j) {
        const int64_t ow = dw::grad_source(ww, j, g.sw, g.pw, g.dw, g.Wo);
        if (ow >= 0) acc += wc[i * g.kw + j] * gp[oh * g.Wo + ow];
      }
    }
    gx[e] = acc;
  }
}

template <typename T>
__device__ T block_sum(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  return smem[0];
}

// blockIdx.x = c * (K + 1) + k; k < K: weight tap k, k == K: bias
template <typename T>
__global__ void param_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gw,
                                  T* __restrict__ gb, Geometry g, bool need_w, bool need_b) {
  __shared__ T smem[kReduceThreads];
  const int K = g.kh * g.kw;
  const int64_t c = blockIdx.x / (K + 1);
  const int k = blockIdx.x % (K + 1);
  if ((k < K && !need_w) || (k == K && !need_b)) return;
  const int i = k / g.kw, j = k % g.kw;
  const int64_t per_plane = g.Ho * g.Wo, n = g.B * per_plane;
  T acc = 0;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t b = e / per_plane, q = e % per_plane, oh = q / g.Wo, ow = q % g.Wo;
    const T gv = grad[(b * g.C + c) * per_plane + q];
    if (k == K) {
      acc += gv;
    } else {
      const int64_t h = oh * g.sh - g.ph + (int64_t)i * g.dh, ww = ow * g.sw - g.pw + (int64_t)j * g.dw;
      if (h >= 0 && h < g.H && ww >= 0 && ww < g.W) acc += gv * x[((b * g.C + c) * g.H + h) * g.W + ww];
    }
  }
  const T total = block_sum<T>(acc, smem);
  if (threadIdx.x == 0) {
    if (k == K) gb[c] = total;
    else gw[c * K + k] = total;
  }
}

Geometry geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef s, at::IntArrayRef p,
                  at::IntArrayRef d) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1,
              "vpfast::depthwise_conv2d: x must be [B, C, H, W] and weight [C, 1, kh, kw]");
  TORCH_CHECK(s.size() == 2 && p.size() == 2 && d.size() == 2, "vpfast::depthwise_conv2d: bad stride/padding/dilation");
  Geometry g;
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.kh = (int)w.size(2); g.kw = (int)w.size(3);
  g.sh = (int)s[0]; g.sw = (int)s[1]; g.ph = (int)p[0]; g.pw = (int)p[1]; g.dh = (int)d[0]; g.dw = (int)d[1];
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
  const int in_h = (kTile - 1) * g.sh + (g.kh - 1) * g.dh + 1, in_w = (kTile - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  const dim3 block(kTile, kTile), grid((g.Wo + kTile - 1) / kTile, (g.Ho + kTile - 1) / kTile, g.B * g.C);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "depthwise_conv2d_forward_cuda", [&] {
    const size_t smem = sizeof(scalar_t) * ((size_t)in_h * in_w + (size_t)g.kh * g.kw);
    forward_kernel<scalar_t><<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(
        X.data_ptr<scalar_t>(), Wt.data_ptr<scalar_t>(), Bt.defined() ? Bt.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              std::array<bool, 3> mask) {
  const Geometry g = geometry(x, weight, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto G = grad.contiguous(), X = x.contiguous(), Wt = weight.contiguous();
  auto gx = mask[0] ? at::empty({g.B, g.C, g.H, g.W}, X.options()) : at::empty({0}, X.options());
  auto gw = mask[1] ? at::zeros({g.C, 1, g.kh, g.kw}, X.options()) : at::empty({0}, X.options());
  auto gb = mask[2] ? at::zeros({g.C}, X.options()) : at::empty({0}, X.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "depthwise_conv2d_backward_cuda", [&] {
    if (mask[0] && gx.numel() > 0) {
      const int64_t blocks = std::min<int64_t>((gx.numel() + 255) / 256, 65535);
      input_grad_kernel<scalar_t><<<blocks, 256, 0, stream>>>(G.data_ptr<scalar_t>(), Wt.data_ptr<scalar_t>(),
                                                              gx.data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if ((mask[1] || mask[2]) && g.B > 0 && g.C > 0) {
      const int64_t blocks = g.C * ((int64_t)g.kh * g.kw + 1);
      param_grad_kernel<scalar_t><<<blocks, kReduceThreads, 0, stream>>>(
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
