// Deformable warp, CPU.
//
// Forward, per chunk of images (sized so the column buffer stays near 32 MB): one task per (image,
// neighbour n[, channel block]) computes the n-th sample geometry of every pixel once (four corner indices
// and four weights with the mask folded in, common/deform_warp.h), then fills the column rows (c, n) of
// every channel with four gathers each; the contraction out[b] = W[O, C k²] x col[b][C k², HW] is a GEMM.
// Backward: grad_col = W^T x grad_out (GEMM); one task per (image, neighbour) recomputes the samples,
// rebuilds the column buffer for the weight gradient (GEMM, accumulated image after image) and reduces the
// offset and mask gradients over channels; one task per (image, channel) scatters that channel's input
// gradient in a fixed order. No task writes where another does, so the result does not depend on the
// thread count or timing (deterministic, no atomics).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "cpu/denormals.h"
#include "common/deform_warp.h"
#include "cpu/output_cache.h"
#include "cpu/warp_gather.h"

namespace vpfast {
namespace {

constexpr int64_t kColBytes = 32 << 20;

// Sample geometry of neighbour (ny, nx) for every pixel of one image: idx/wt hold 4 planes of HW entries
// (corners 00, 01, 10, 11); the weights include validity and the mask.
template <typename T>
VPFAST_CPU_CLONES void build_table(const T* off_y, const T* off_x, const T* mask, int32_t H, int32_t W, T ny,
                                   T nx, int32_t* idx, T* wt) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  for (int32_t h = 0; h < H; ++h) {
    const int64_t row = static_cast<int64_t>(h) * W;
#pragma omp simd
    for (int32_t w = 0; w < W; ++w) {
      const int64_t p = row + w;
      const auto c = warp::corners<T>(T(h) + ny + off_y[p], T(w) + nx + off_x[p], H, W, true);
      T w00, w01, w10, w11;
      warp::corner_weights<T>(c, mask[p], w00, w01, w10, w11);
      idx[p] = c.r0 + c.c0;
      idx[HW + p] = c.r0 + c.c1;
      idx[2 * HW + p] = c.r1 + c.c0;
      idx[3 * HW + p] = c.r1 + c.c1;
      wt[p] = w00;
      wt[HW + p] = w01;
      wt[2 * HW + p] = w10;
      wt[3 * HW + p] = w11;
    }
  }
}

// col rows (c, n) for channels [c0, c1): row c sits at col + c * N * HW.
template <typename T>
VPFAST_CPU_CLONES void sample_rows_generic(const T* x, int64_t HW, const int32_t* idx, const T* wt, int64_t c0,
                                           int64_t c1, int64_t N, T* col) {
  const int32_t *i0 = idx, *i1 = idx + HW, *i2 = idx + 2 * HW, *i3 = idx + 3 * HW;
  const T *w0 = wt, *w1 = wt + HW, *w2 = wt + 2 * HW, *w3 = wt + 3 * HW;
  for (int64_t c = c0; c < c1; ++c) {
    const T* xc = x + c * HW;
    T* out = col + c * N * HW;
#pragma omp simd
    for (int64_t p = 0; p < HW; ++p) {
      out[p] = w0[p] * xc[i0[p]] + w1[p] * xc[i1[p]] + w2[p] * xc[i2[p]] + w3[p] * xc[i3[p]];
    }
  }
}

template <typename T>
void sample_rows(const T* x, int64_t HW, const int32_t* idx, const T* wt, int64_t c0, int64_t c1, int64_t N, T* col) {
  if (!warp::cpu_has_avx512()) return sample_rows_generic<T>(x, HW, idx, wt, c0, c1, N, col);
  const int32_t* ip[4] = {idx, idx + HW, idx + 2 * HW, idx + 3 * HW};
  const T* wp[4] = {wt, wt + HW, wt + 2 * HW, wt + 3 * HW};
  for (int64_t c = c0; c < c1; ++c) warp::gather4<T>(x + c * HW, ip, wp, col + c * N * HW, HW);
}

// Backward for one (image, neighbour): geometry, optional column rows for the weight gradient, and the
// offset/mask gradients reduced over channels in channel order. Leaves the forward-style table (idx, wt)
// for the input-gradient scatter. scratch: 9 * HW entries.
template <typename T, bool kCol>
VPFAST_CPU_CLONES void grad_neighbour(const T* x, const T* off_y, const T* off_x, const T* mask, int32_t H, int32_t W,
                                      T ny, T nx, int64_t C, int64_t N, const T* gcol, T* col, T* g_off_y,
                                      T* g_off_x, T* g_mask, int32_t* idx, T* wt, T* scratch) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  T *m0 = scratch, *m1 = scratch + HW, *m2 = scratch + 2 * HW, *m3 = scratch + 3 * HW;
  T *ly = scratch + 4 * HW, *lx = scratch + 5 * HW;
  T *ay = scratch + 6 * HW, *ax = scratch + 7 * HW, *am = scratch + 8 * HW;
  int32_t *i0 = idx, *i1 = idx + HW, *i2 = idx + 2 * HW, *i3 = idx + 3 * HW;
  for (int32_t h = 0; h < H; ++h) {
    const int64_t row = static_cast<int64_t>(h) * W;
#pragma omp simd
    for (int32_t w = 0; w < W; ++w) {
      const int64_t p = row + w;
      const auto c = warp::corners<T>(T(h) + ny + off_y[p], T(w) + nx + off_x[p], H, W, true);
      i0[p] = c.r0 + c.c0;
      i1[p] = c.r0 + c.c1;
      i2[p] = c.r1 + c.c0;
      i3[p] = c.r1 + c.c1;
      m0[p] = c.vy0 * c.vx0;
      m1[p] = c.vy0 * c.vx1;
      m2[p] = c.vy1 * c.vx0;
      m3[p] = c.vy1 * c.vx1;
      ly[p] = c.ly;
      lx[p] = c.lx;
      T w00, w01, w10, w11;
      warp::corner_weights<T>(c, mask[p], w00, w01, w10, w11);
      wt[p] = w00;
      wt[HW + p] = w01;
      wt[2 * HW + p] = w10;
      wt[3 * HW + p] = w11;
      ay[p] = T(0);
      ax[p] = T(0);
      am[p] = T(0);
    }
  }
  bool done = false;
#ifdef VPFAST_X86_GATHER
  if constexpr (std::is_same_v<T, float>) {
    if (warp::cpu_has_avx512()) {
      const int32_t* ip[4] = {i0, i1, i2, i3};
      const T* mp[4] = {m0, m1, m2, m3};
      warp::grad_channels_f32(x, HW, gcol, N * HW, kCol ? col : nullptr, N * HW, mask, C, ip, mp, ly, lx, am, ay, ax,
                              0, HW);
      done = true;
    }
  }
#endif
  for (int64_t ch = 0; ch < C && !done; ++ch) {
    const T* xc = x + ch * HW;
    const T* g = gcol + ch * N * HW;
    T* out = kCol ? col + ch * N * HW : nullptr;
#pragma omp simd
    for (int64_t p = 0; p < HW; ++p) {
      T s, dy, dx;
      warp::sample_grad<T>(m0[p] * xc[i0[p]], m1[p] * xc[i1[p]], m2[p] * xc[i2[p]], m3[p] * xc[i3[p]], ly[p], lx[p],
                           s, dy, dx);
      if (kCol) out[p] = mask[p] * s;
      const T gg = g[p];
      am[p] += gg * s;
      ay[p] += gg * dy;
      ax[p] += gg * dx;
    }
  }
#pragma omp simd
  for (int64_t p = 0; p < HW; ++p) {
    g_mask[p] = am[p];
    g_off_y[p] = mask[p] * ay[p];
    g_off_x[p] = mask[p] * ax[p];
  }
}

// Input gradient of one (image, channel) plane: every sample of the channel adds its share to its four
// corners, in a fixed order.
template <typename T>
void scatter_plane(const T* gcol, int64_t N, int64_t HW, const int32_t* idx, const T* wt, T* gx) {
  std::fill(gx, gx + HW, T(0));
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* id = idx + n * 4 * HW;
    const T* w = wt + n * 4 * HW;
    const int32_t* ip[4] = {id, id + HW, id + 2 * HW, id + 3 * HW};
    const T* wp[4] = {w, w + HW, w + 2 * HW, w + 3 * HW};
    warp::scatter4<T>(gx, ip, wp, gcol + n * HW, HW);
  }
}

at::Tensor deform_warp_forward_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
                                   const at::Tensor& weight) {
  const auto [X, OFF, M, Wm, B, C, H, W, O, k, N, HW, K] =
      warp::deform_forward_operands(x, offset, mask, weight);
  auto out = cpu::empty_output({B, O, H, W}, X.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  const int64_t bc = warp::chunk_images(B, K * HW * static_cast<int64_t>(X.element_size()), 1, kColBytes);
  auto col = cpu::empty_output({bc, K, HW}, X.options());
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "deform_warp_forward_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* op = OFF.data_ptr<scalar_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* cp = col.data_ptr<scalar_t>();
    const scalar_t half = static_cast<scalar_t>(k / 2);
    for (int64_t b0 = 0; b0 < B; b0 += bc) {
      const int64_t nb = std::min(bc, B - b0), tasks_bn = nb * N;
      const int64_t ncb = std::min<int64_t>(C, std::max<int64_t>(1, (4 * threads + tasks_bn - 1) / tasks_bn));
      const int64_t cper = (C + ncb - 1) / ncb;
      cpu::parallel_for(0, tasks_bn * ncb, 1, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> idx(4 * HW);
        std::vector<scalar_t> wt(4 * HW);
        int64_t last = -1;
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bn = t / ncb, cb = t % ncb, b = bn / N, n = bn % N;
          const int64_t gb = b0 + b;
          if (bn != last) {
            const scalar_t* ob = op + gb * 2 * N * HW;
            build_table<scalar_t>(ob + n * HW, ob + (N + n) * HW, mp + (gb * N + n) * HW, (int32_t)H, (int32_t)W,
                                  static_cast<scalar_t>(n / k) - half, static_cast<scalar_t>(n % k) - half,
                                  idx.data(), wt.data());
            last = bn;
          }
          const int64_t c0 = cb * cper, c1 = std::min(C, c0 + cper);
          if (c0 < c1)
            sample_rows<scalar_t>(xp + gb * C * HW, HW, idx.data(), wt.data(), c0, c1, N, cp + b * K * HW + n * HW);
        }
      });
      for (int64_t b = 0; b < nb; ++b) {
        auto ob = out[b0 + b].view({O, HW});
        at::mm_out(ob, Wm, col[b]);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_warp_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask,
    const at::Tensor& weight, std::array<bool, 4> needs) {
  const auto [X, OFF, M, Wm, B, C, H, W, O, k, N, HW, K] =
      warp::deform_backward_operands(grad, x, offset, mask, weight);
  const auto G = grad.to(X.scalar_type()).contiguous();
  // every entry of gx (if needed), goff and gm is written below, unless the early return zeroes them
  auto gx = cpu::empty_output(X.sizes(), X.options());
  auto goff = cpu::empty_output(OFF.sizes(), OFF.options());
  auto gm = cpu::empty_output(M.sizes(), M.options());
  auto gw = at::zeros({O, K}, X.options());
  auto empty = at::empty({0}, X.options());
  auto result = [&]() {
    // outputs that are not needed are distinct empty tensors (outputs must not alias)
    auto none = [&]() { return at::empty({0}, X.options()); };
    return std::make_tuple(needs[0] ? gx : none(), needs[1] ? goff : none(), needs[2] ? gm : none(),
                           needs[3] ? gw.view(weight.sizes()) : none());
  };
  if (B == 0 || HW == 0 || K == 0 || O == 0) {
    gx.zero_();
    goff.zero_();
    gm.zero_();
    return result();
  }
  const bool want_col = needs[3];
  const int64_t bc = warp::chunk_images(B, K * HW * static_cast<int64_t>(X.element_size()), want_col ? 2 : 1, kColBytes);
  auto gcol = cpu::empty_output({bc, K, HW}, X.options());
  auto col = want_col ? cpu::empty_output({bc, K, HW}, X.options()) : empty;
  auto idx = cpu::empty_output({bc, N, 4, HW}, X.options().dtype(at::kInt));
  auto wt = cpu::empty_output({bc, N, 4, HW}, X.options());
  const auto Wt = Wm.t();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "deform_warp_backward_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* op = OFF.data_ptr<scalar_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* gcp = gcol.data_ptr<scalar_t>();
    scalar_t* cp = want_col ? col.data_ptr<scalar_t>() : nullptr;
    int32_t* ip = idx.data_ptr<int32_t>();
    scalar_t* wp = wt.data_ptr<scalar_t>();
    scalar_t* gop = goff.data_ptr<scalar_t>();
    scalar_t* gmp = gm.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const scalar_t half = static_cast<scalar_t>(k / 2);
    for (int64_t b0 = 0; b0 < B; b0 += bc) {
      const int64_t nb = std::min(bc, B - b0);
      for (int64_t b = 0; b < nb; ++b) {
        auto gb = gcol[b];
        at::mm_out(gb, Wt, G[b0 + b].view({O, HW}));
      }
      cpu::parallel_for(0, nb * N, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(9 * HW);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / N, n = t % N, gb = b0 + b;
          const scalar_t* ob = op + gb * 2 * N * HW;
          scalar_t* gob = gop + gb * 2 * N * HW;
          const scalar_t ny = static_cast<scalar_t>(n / k) - half, nx = static_cast<scalar_t>(n % k) - half;
          auto run = [&](auto col_flag) {
            constexpr bool kCol = decltype(col_flag)::value;
            grad_neighbour<scalar_t, kCol>(xp + gb * C * HW, ob + n * HW, ob + (N + n) * HW, mp + (gb * N + n) * HW,
                                           (int32_t)H, (int32_t)W, ny, nx, C, N, gcp + b * K * HW + n * HW,
                                           kCol ? cp + b * K * HW + n * HW : nullptr, gob + n * HW,
                                           gob + (N + n) * HW, gmp + (gb * N + n) * HW, ip + t * 4 * HW,
                                           wp + t * 4 * HW, scratch.data());
          };
          if (want_col)
            run(std::true_type{});
          else
            run(std::false_type{});
        }
      });
      if (want_col)
        for (int64_t b = 0; b < nb; ++b) gw.addmm_(G[b0 + b].view({O, HW}), col[b].t());
      if (needs[0]) {
        cpu::parallel_for(0, nb * C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / C, c = t % C;
            scatter_plane<scalar_t>(gcp + b * K * HW + c * N * HW, N, HW, ip + b * N * 4 * HW, wp + b * N * 4 * HW,
                                    gxp + ((b0 + b) * C + c) * HW);
          }
        });
      }
    }
  });
  return result();
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("deform_warp_forward", &vpfast::deform_warp_forward_cpu);
  m.impl("deform_warp_backward", &vpfast::deform_warp_backward_cpu);
}
