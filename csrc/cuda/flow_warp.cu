// Flow warp, CUDA. Forward: one thread per output element, position and corners from common/flow_warp.h
// (no grid tensor). Backward: one thread per (image, pixel) reduces the flow gradient over channels in order
// (deterministic); the input gradient scatters with atomicAdd (not deterministic: reported to
// torch.use_deterministic_algorithms, which then raises).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/flow_warp.h"

namespace vpfast {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

template <typename T>
__device__ __forceinline__ warp::Corners<T> flow_geometry(const T* flow, int64_t b, int64_t p, int32_t H, int32_t W,
                                                          bool border, bool align_corners, T& dfy, T& dfx) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int32_t h = static_cast<int32_t>(p / W), w = static_cast<int32_t>(p % W);
  const T* fb = flow + b * 2 * HW;
  const T py = warp::flow_coord<T>(T(h), fb[HW + p], H, border, align_corners, dfy);
  const T px = warp::flow_coord<T>(T(w), fb[p], W, border, align_corners, dfx);
  return warp::corners<T>(py, px, H, W);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ flow, int64_t B, int64_t C, int32_t H,
                               int32_t W, bool border, bool align_corners, T* __restrict__ out) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % HW, bc = i / HW, b = bc / C;
    T dfy, dfx, w00, w01, w10, w11;
    const auto c = flow_geometry<T>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    warp::corner_weights<T>(c, T(1), w00, w01, w10, w11);
    const T* xc = x + bc * HW;
    out[i] = w00 * xc[c.r0 + c.c0] + w01 * xc[c.r0 + c.c1] + w10 * xc[c.r1 + c.c0] + w11 * xc[c.r1 + c.c1];
  }
}

template <typename T>
__global__ void grad_flow_kernel(const T* __restrict__ x, const T* __restrict__ flow, const T* __restrict__ g,
                                 int64_t B, int64_t C, int32_t H, int32_t W, bool border, bool align_corners,
                                 T* __restrict__ gflow) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % HW, b = i / HW;
    T dfy, dfx;
    const auto c = flow_geometry<T>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    const T m00 = c.vy0 * c.vx0, m01 = c.vy0 * c.vx1, m10 = c.vy1 * c.vx0, m11 = c.vy1 * c.vx1;
    T ay = 0, ax = 0;
    for (int64_t ch = 0; ch < C; ++ch) {
      const T* xc = x + (b * C + ch) * HW;
      T s, dy, dx;
      warp::sample_grad<T>(m00 * xc[c.r0 + c.c0], m01 * xc[c.r0 + c.c1], m10 * xc[c.r1 + c.c0], m11 * xc[c.r1 + c.c1],
                           c.ly, c.lx, s, dy, dx);
      const T gg = g[(b * C + ch) * HW + p];
      ay += gg * dy;
      ax += gg * dx;
    }
    gflow[b * 2 * HW + p] = dfx * ax;
    gflow[b * 2 * HW + HW + p] = dfy * ay;
  }
}

template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ flow, const T* __restrict__ g, int64_t B, int64_t C,
                                  int32_t H, int32_t W, bool border, bool align_corners, T* __restrict__ gx) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const T gg = g[i];
    if (gg == T(0)) continue;
    const int64_t p = i % HW, bc = i / HW, b = bc / C;
    T dfy, dfx, w00, w01, w10, w11;
    const auto c = flow_geometry<T>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    warp::corner_weights<T>(c, T(1), w00, w01, w10, w11);
    T* gp = gx + bc * HW;
    if (w00 != T(0)) atomicAdd(gp + c.r0 + c.c0, w00 * gg);
    if (w01 != T(0)) atomicAdd(gp + c.r0 + c.c1, w01 * gg);
    if (w10 != T(0)) atomicAdd(gp + c.r1 + c.c0, w10 * gg);
    if (w11 != T(0)) atomicAdd(gp + c.r1 + c.c1, w11 * gg);
  }
}

at::Tensor flow_warp_forward_cuda(const at::Tensor& x, const at::Tensor& flow, bool border, bool align_corners) {
  warp::check_flow_inputs("vpfast::flow_warp_forward", x, flow);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto X = x.contiguous(), FL = flow.contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3);
  auto out = at::empty_like(X);
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "flow_warp_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), FL.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W, border, align_corners,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_warp_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& flow, bool border, bool align_corners,
                                                           bool need_x, bool need_flow) {
  warp::check_flow_inputs("vpfast::flow_warp_backward", x, flow);
  TORCH_CHECK(grad.sizes() == x.sizes(), "vpfast::flow_warp_backward: grad must have the shape of x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (need_x) at::globalContext().alertNotDeterministic("vpfast::flow_warp_backward (CUDA input gradient)");
  const auto X = x.contiguous(), FL = flow.contiguous(), G = grad.to(x.scalar_type()).contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3);
  auto gx = need_x ? at::zeros_like(X) : at::empty({0}, X.options());
  auto gf = need_flow ? at::zeros_like(FL) : at::empty({0}, X.options());
  if (X.numel() == 0) return {gx, gf};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "flow_warp_backward_cuda", [&] {
    if (need_flow) {
      grad_flow_kernel<scalar_t><<<blocks_for(B * H * W), kThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), FL.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W,
          border, align_corners, gf.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_x) {
      grad_input_kernel<scalar_t><<<blocks_for(X.numel()), kThreads, 0, stream>>>(
          FL.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W, border, align_corners,
          gx.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gf};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("flow_warp_forward", &vpfast::flow_warp_forward_cuda);
  m.impl("flow_warp_backward", &vpfast::flow_warp_backward_cuda);
}
