// Deformable warp, CUDA. Forward: one thread per column entry (image, channel, neighbour, pixel) samples
// straight into the column buffer (geometry from common/deform_warp.h, as on the CPU), then a GEMM per image.
// Backward: grad_col = W^T x grad_out (GEMM); one thread per (image, neighbour, pixel) reduces the offset and
// mask gradients over channels in order (deterministic) and rebuilds the column buffer for the weight
// gradient (GEMMs accumulated image after image); the input gradient scatters with atomicAdd, which is not
// deterministic, so it reports itself to torch.use_deterministic_algorithms (an error when that is on).
//
// Storage type T (float, double, Half, BFloat16), arithmetic in A = at::opmath_type<T> (float for the half
// types): sample positions and corner weights are never rounded to 16 bits, channel sums accumulate in A.
// The column buffer of the forward pass and grad_col are in T (inputs of T GEMMs, which accumulate in float,
// as a convolution under autocast); the column buffer of the weight gradient and the weight gradient itself
// are in A (float GEMMs accumulated image after image in a fixed order: deterministic), and the input
// gradient of a half type is scattered into a float buffer; both are cast to T once at the end.
// Launches: 1-D grids of at most 2^20 blocks with grid-stride loops and 64-bit element indices (the largest
// grids are nb*C*k²*H*W threads: 18.9M at (8, 64, 64, 64) k=3, so 2^20 blocks of 256 do them in a handful of
// strides); within a plane indices are 32-bit (H*W < 2^31 is checked on the host).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>

#include "common/deform_warp.h"

namespace vpfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kColBytes = 64 << 20;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

struct Geo {
  int64_t C, N, HW;
  int32_t H, W, k;
};

// Sample geometry of neighbour n at pixel p of image b (b relative to the pointers), in the arithmetic type A.
template <typename T, typename A>
__device__ __forceinline__ warp::Corners<A> geometry(const T* off, const Geo& g, int64_t b, int64_t n, int64_t p) {
  const A half = A(g.k / 2);
  const int32_t h = static_cast<int32_t>(p / g.W), w = static_cast<int32_t>(p % g.W);
  const T* ob = off + b * 2 * g.N * g.HW;
  return warp::corners<A>(A(h) + A(n / g.k) - half + static_cast<A>(ob[n * g.HW + p]),
                          A(w) + A(n % g.k) - half + static_cast<A>(ob[(g.N + n) * g.HW + p]), g.H, g.W, true);
}

template <typename T, typename A>
__global__ void im2col_kernel(const T* __restrict__ x, const T* __restrict__ off, const T* __restrict__ mask,
                              int64_t nb, Geo g, T* __restrict__ col) {
  const int64_t total = nb * g.C * g.N * g.HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % g.HW, r = i / g.HW, n = r % g.N, bc = r / g.N, b = bc / g.C;
    const auto c = geometry<T, A>(off, g, b, n, p);
    A w00, w01, w10, w11;
    warp::corner_weights<A>(c, static_cast<A>(mask[(b * g.N + n) * g.HW + p]), w00, w01, w10, w11);
    const T* xc = x + bc * g.HW;
    col[i] = static_cast<T>(w00 * static_cast<A>(xc[c.r0 + c.c0]) + w01 * static_cast<A>(xc[c.r0 + c.c1]) +
                            w10 * static_cast<A>(xc[c.r1 + c.c0]) + w11 * static_cast<A>(xc[c.r1 + c.c1]));
  }
}

// col (the weight gradient's column buffer, optional) is in the arithmetic type A.
template <typename T, typename A>
__global__ void grad_offset_kernel(const T* __restrict__ x, const T* __restrict__ off, const T* __restrict__ mask,
                                   const T* __restrict__ gcol, int64_t nb, Geo g, A* __restrict__ col,
                                   T* __restrict__ g_off, T* __restrict__ g_mask) {
  const int64_t total = nb * g.N * g.HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % g.HW, r = i / g.HW, n = r % g.N, b = r / g.N;
    const auto c = geometry<T, A>(off, g, b, n, p);
    const A m = static_cast<A>(mask[(b * g.N + n) * g.HW + p]);
    const A m00 = c.vy0 * c.vx0, m01 = c.vy0 * c.vx1, m10 = c.vy1 * c.vx0, m11 = c.vy1 * c.vx1;
    A am = 0, ay = 0, ax = 0;
    for (int64_t ch = 0; ch < g.C; ++ch) {
      const T* xc = x + (b * g.C + ch) * g.HW;
      const int64_t j = ((b * g.C + ch) * g.N + n) * g.HW + p;
      A s, dy, dx;
      warp::sample_grad<A>(m00 * static_cast<A>(xc[c.r0 + c.c0]), m01 * static_cast<A>(xc[c.r0 + c.c1]),
                           m10 * static_cast<A>(xc[c.r1 + c.c0]), m11 * static_cast<A>(xc[c.r1 + c.c1]), c.ly,
                           c.lx, s, dy, dx);
      if (col) col[j] = m * s;
      const A gg = static_cast<A>(gcol[j]);
      am += gg * s;
      ay += gg * dy;
      ax += gg * dx;
    }
    g_mask[(b * g.N + n) * g.HW + p] = static_cast<T>(am);
    g_off[(b * 2 * g.N + n) * g.HW + p] = static_cast<T>(m * ay);
    g_off[(b * 2 * g.N + g.N + n) * g.HW + p] = static_cast<T>(m * ax);
  }
}

// gx is in the arithmetic type A (a float buffer for the half types).
template <typename T, typename A>
__global__ void grad_input_kernel(const T* __restrict__ off, const T* __restrict__ mask, const T* __restrict__ gcol,
                                  int64_t nb, Geo g, A* __restrict__ gx) {
  const int64_t total = nb * g.C * g.N * g.HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % g.HW, r = i / g.HW, n = r % g.N, bc = r / g.N, b = bc / g.C;
    const A gg = static_cast<A>(gcol[i]);
    if (gg == A(0)) continue;
    const auto c = geometry<T, A>(off, g, b, n, p);
    A w00, w01, w10, w11;
    warp::corner_weights<A>(c, static_cast<A>(mask[(b * g.N + n) * g.HW + p]), w00, w01, w10, w11);
    A* gp = gx + bc * g.HW;
    if (w00 != A(0)) atomicAdd(gp + c.r0 + c.c0, w00 * gg);
    if (w01 != A(0)) atomicAdd(gp + c.r0 + c.c1, w01 * gg);
    if (w10 != A(0)) atomicAdd(gp + c.r1 + c.c0, w10 * gg);
    if (w11 != A(0)) atomicAdd(gp + c.r1 + c.c1, w11 * gg);
  }
}

at::Tensor deform_warp_forward_cuda(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
                                    const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [X, OFF, M, Wm, B, C, H, W, O, k, N, HW, K] =
      warp::deform_forward_operands(x, offset, mask, weight);
  auto out = at::empty({B, O, H, W}, X.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  const int64_t bc = warp::chunk_images(B, K * HW * static_cast<int64_t>(X.element_size()), 1, kColBytes);
  auto col = at::empty({bc, K, HW}, X.options());
  const Geo g{C, N, HW, (int32_t)H, (int32_t)W, (int32_t)k};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "deform_warp_forward_cuda", [&] {
    for (int64_t b0 = 0; b0 < B; b0 += bc) {
      const int64_t nb = std::min(bc, B - b0);
      im2col_kernel<scalar_t, at::opmath_type<scalar_t>><<<blocks_for(nb * K * HW), kThreads, 0, stream>>>(
          X.data_ptr<scalar_t>() + b0 * C * HW, OFF.data_ptr<scalar_t>() + b0 * 2 * N * HW,
          M.data_ptr<scalar_t>() + b0 * N * HW, nb, g, col.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int64_t b = 0; b < nb; ++b) {
        auto ob = out[b0 + b].view({O, HW});
        at::mm_out(ob, Wm, col[b]);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_warp_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, std::array<bool, 4> needs) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [X, OFF, M, Wm, B, C, H, W, O, k, N, HW, K] =
      warp::deform_backward_operands(grad, x, offset, mask, weight);
  if (needs[0]) at::globalContext().alertNotDeterministic("vpfast::deform_warp_backward (CUDA input gradient)");
  const auto G = grad.to(X.scalar_type()).contiguous();
  // the input and weight gradients accumulate in the arithmetic type (float for the half types)
  const auto acc = X.options().dtype(at::toOpMathType(X.scalar_type()));
  auto gx = needs[0] ? at::zeros(X.sizes(), acc) : at::empty({0}, acc);
  auto goff = at::zeros_like(OFF);
  auto gm = at::zeros_like(M);
  auto gw = at::zeros({O, K}, acc);
  auto empty = at::empty({0}, X.options());
  auto result = [&]() {
    // outputs that are not needed are distinct empty tensors (outputs must not alias)
    auto none = [&]() { return at::empty({0}, X.options()); };
    return std::make_tuple(needs[0] ? gx.to(X.scalar_type()) : none(), needs[1] ? goff : none(),
                           needs[2] ? gm : none(), needs[3] ? gw.to(X.scalar_type()).view(weight.sizes()) : none());
  };
  if (B == 0 || HW == 0 || K == 0 || O == 0) return result();
  const bool want_col = needs[3];
  const int64_t col_bytes = c10::elementSize(at::toOpMathType(X.scalar_type()));
  const int64_t bc = warp::chunk_images(
      B, K * HW * (static_cast<int64_t>(X.element_size()) + (want_col ? col_bytes : 0)), 1, kColBytes);
  auto gcol = at::empty({bc, K, HW}, X.options());
  auto col = want_col ? at::empty({bc, K, HW}, acc) : empty;
  // the weight gradient's GEMMs read grad_out in the arithmetic type too (no copy for float/double)
  const auto Ga = want_col ? G.to(at::toOpMathType(X.scalar_type())) : G;
  const auto Wt = Wm.t();
  const Geo g{C, N, HW, (int32_t)H, (int32_t)W, (int32_t)k};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, X.scalar_type(),
                                  "deform_warp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t b0 = 0; b0 < B; b0 += bc) {
      const int64_t nb = std::min(bc, B - b0);
      for (int64_t b = 0; b < nb; ++b) {
        auto gb = gcol[b];
        at::mm_out(gb, Wt, G[b0 + b].view({O, HW}));
      }
      const scalar_t* xp = X.data_ptr<scalar_t>() + b0 * C * HW;
      const scalar_t* op = OFF.data_ptr<scalar_t>() + b0 * 2 * N * HW;
      const scalar_t* mp = M.data_ptr<scalar_t>() + b0 * N * HW;
      grad_offset_kernel<scalar_t, acc_t><<<blocks_for(nb * N * HW), kThreads, 0, stream>>>(
          xp, op, mp, gcol.data_ptr<scalar_t>(), nb, g, want_col ? col.data_ptr<acc_t>() : nullptr,
          goff.data_ptr<scalar_t>() + b0 * 2 * N * HW, gm.data_ptr<scalar_t>() + b0 * N * HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (want_col)
        for (int64_t b = 0; b < nb; ++b) gw.addmm_(Ga[b0 + b].view({O, HW}), col[b].t());
      if (needs[0]) {
        grad_input_kernel<scalar_t, acc_t><<<blocks_for(nb * K * HW), kThreads, 0, stream>>>(
            op, mp, gcol.data_ptr<scalar_t>(), nb, g, gx.data_ptr<acc_t>() + b0 * C * HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return result();
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("deform_warp_forward", &vpfast::deform_warp_forward_cuda);
  m.impl("deform_warp_backward", &vpfast::deform_warp_backward_cuda);
}
