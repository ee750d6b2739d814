// Flow warp, CUDA. Forward: one thread per output element, position and corners from common/flow_warp.h
// (no grid tensor). Backward: one thread per (image, pixel) reduces the flow gradient over channels in order
// (deterministic); the input gradient scatters with atomicAdd (not deterministic: reported to
// torch.use_deterministic_algorithms, which then raises).
//
// Storage type T (float, double, Half, BFloat16), arithmetic in A = at::opmath_type<T> (float for the half
// types): positions and corner weights are never rounded to 16 bits (a bf16 coordinate near 60 is a quarter
// pixel off), channel sums accumulate in A, and the input gradient of a half type is scattered into a float
// buffer (16-bit atomics would round every partial sum) that is cast once at the end.
// Launches: 1-D grids of at most 2^20 blocks with grid-stride loops and 64-bit element indices; within a
// plane indices are 32-bit (H*W < 2^31 is checked on the host).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include "common/flow_warp.h"

namespace vpfast {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

// Geometry of pixel p of image b, in the arithmetic type A whatever the storage type T of the flow.
template <typename T, typename A>
__device__ __forceinline__ warp::Corners<A> flow_geometry(const T* flow, int64_t b, int64_t p, int32_t H, int32_t W,
                                                          bool border, bool align_corners, A& dfy, A& dfx) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int32_t h = static_cast<int32_t>(p / W), w = static_cast<int32_t>(p % W);
  const T* fb = flow + b * 2 * HW;
  const A py = warp::flow_coord<A>(A(h), static_cast<A>(fb[HW + p]), H, border, align_corners, dfy);
  const A px = warp::flow_coord<A>(A(w), static_cast<A>(fb[p]), W, border, align_corners, dfx);
  return warp::corners<A>(py, px, H, W);
}

template <typename T, typename A>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ flow, int64_t B, int64_t C, int32_t H,
                               int32_t W, bool border, bool align_corners, T* __restrict__ out) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % HW, bc = i / HW, b = bc / C;
    A dfy, dfx, w00, w01, w10, w11;
    const auto c = flow_geometry<T, A>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    warp::corner_weights<A>(c, A(1), w00, w01, w10, w11);
    const T* xc = x + bc * HW;
    out[i] = static_cast<T>(w00 * static_cast<A>(xc[c.r0 + c.c0]) + w01 * static_cast<A>(xc[c.r0 + c.c1]) +
                            w10 * static_cast<A>(xc[c.r1 + c.c0]) + w11 * static_cast<A>(xc[c.r1 + c.c1]));
  }
}

template <typename T, typename A>
__global__ void grad_flow_kernel(const T* __restrict__ x, const T* __restrict__ flow, const T* __restrict__ g,
                                 int64_t B, int64_t C, int32_t H, int32_t W, bool border, bool align_corners,
                                 T* __restrict__ gflow) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % HW, b = i / HW;
    A dfy, dfx;
    const auto c = flow_geometry<T, A>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    const A m00 = c.vy0 * c.vx0, m01 = c.vy0 * c.vx1, m10 = c.vy1 * c.vx0, m11 = c.vy1 * c.vx1;
    A ay = 0, ax = 0;
    for (int64_t ch = 0; ch < C; ++ch) {
      const T* xc = x + (b * C + ch) * HW;
      A s, dy, dx;
      warp::sample_grad<A>(m00 * static_cast<A>(xc[c.r0 + c.c0]), m01 * static_cast<A>(xc[c.r0 + c.c1]),
                           m10 * static_cast<A>(xc[c.r1 + c.c0]), m11 * static_cast<A>(xc[c.r1 + c.c1]), c.ly, c.lx,
                           s, dy, dx);
      const A gg = static_cast<A>(g[(b * C + ch) * HW + p]);
      ay += gg * dy;
      ax += gg * dx;
    }
    gflow[b * 2 * HW + p] = static_cast<T>(dfx * ax);
    gflow[b * 2 * HW + HW + p] = static_cast<T>(dfy * ay);
  }
}

// gx is in the arithmetic type A (a float buffer for the half types).
template <typename T, typename A>
__global__ void grad_input_kernel(const T* __restrict__ flow, const T* __restrict__ g, int64_t B, int64_t C,
                                  int32_t H, int32_t W, bool border, bool align_corners, A* __restrict__ gx) {
  const int64_t HW = static_cast<int64_t>(H) * W, total = B * C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const A gg = static_cast<A>(g[i]);
    if (gg == A(0)) continue;
    const int64_t p = i % HW, bc = i / HW, b = bc / C;
    A dfy, dfx, w00, w01, w10, w11;
    const auto c = flow_geometry<T, A>(flow, b, p, H, W, border, align_corners, dfy, dfx);
    warp::corner_weights<A>(c, A(1), w00, w01, w10, w11);
    A* gp = gx + bc * HW;
    if (w00 != A(0)) atomicAdd(gp + c.r0 + c.c0, w00 * gg);
    if (w01 != A(0)) atomicAdd(gp + c.r0 + c.c1, w01 * gg);
    if (w10 != A(0)) atomicAdd(gp + c.r1 + c.c0, w10 * gg);
    if (w11 != A(0)) atomicAdd(gp + c.r1 + c.c1, w11 * gg);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "flow_warp_forward_cuda", [&] {
    forward_kernel<scalar_t, at::opmath_type<scalar_t>><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), FL.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W, border, align_corners,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_warp_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& flow, bool border, bool align_corners,
                                                           bool need_x, bool need_flow) {
  warp::check_flow_backward("vpfast::flow_warp_backward", grad, x, flow);
  const c10::cuda::CUDAGuard guard(x.device());
  if (need_x) at::globalContext().alertNotDeterministic("vpfast::flow_warp_backward (CUDA input gradient)");
  const auto X = x.contiguous(), FL = flow.contiguous(), G = grad.to(x.scalar_type()).contiguous();
  const int64_t B = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3);
  // the input gradient accumulates in the arithmetic type (float for the half types), cast at the end
  const auto acc = at::toOpMathType(X.scalar_type());
  auto gx = need_x ? at::zeros(X.sizes(), X.options().dtype(acc)) : at::empty({0}, X.options());
  auto gf = need_flow ? at::zeros_like(FL) : at::empty({0}, X.options());
  if (X.numel() == 0) return {gx.to(X.scalar_type()), gf};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "flow_warp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (need_flow) {
      grad_flow_kernel<scalar_t, acc_t><<<blocks_for(B * H * W), kThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), FL.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W,
          border, align_corners, gf.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_x) {
      grad_input_kernel<scalar_t, acc_t><<<blocks_for(X.numel()), kThreads, 0, stream>>>(
          FL.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), B, C, (int32_t)H, (int32_t)W, border, align_corners,
          gx.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx.to(X.scalar_type()), gf};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("flow_warp_forward", &vpfast::flow_warp_forward_cuda);
  m.impl("flow_warp_backward", &vpfast::flow_warp_backward_cuda);
}
