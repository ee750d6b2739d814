// GroupNorm + SiLU, CPU. Arithmetic in common/group_norm_silu.h.
//
// NCHW: one task per (sample, group), whose slice (C/groups channels x HW) is contiguous and small enough to
// stay in L2: the statistics sweep reads it from memory once, the normalise+activate sweep (forward) or the
// input-gradient sweep (backward) reads it again from cache.
// channels_last (4-D): one task per sample; the sample [HW, C] is one contiguous run in which element i
// belongs to channel i % C. The sweeps run over that flat run in blocks of P "lanes" (P a multiple of C:
// 32 or 64 when C divides it, so the per-lane accumulators are compile-time arrays kept in vector registers;
// C otherwise), each lane with its channel's parameters, and per-lane sums are folded per channel/group
// afterwards in a fixed order. No conversion to NCHW.
//
// The backward pass writes dL/da into grad_x in its first sweep (with the per-channel sums), then turns it
// into grad_x in a second sweep over data still in cache. grad_weight/grad_bias: per-(sample, channel)
// partial sums in double, summed over the batch in order (deterministic for any thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "cpu/denormals.h"
#include "common/group_norm_silu.h"
#include "cpu/output_cache.h"

namespace vpfast {
namespace {

using gns::check_backward;
using gns::check_param;
using gns::dense;
using gns::Geometry;
using gns::geometry;

// Every task runs with denormals flushed (cpu::parallel_for, cpu/denormals.h). Here it matters even for
// ordinary inputs: GCC if-converts the clamps inside fast_exp and evaluates every branch for every lane; the
// branch for a clamped argument folds sigmoid to the denormal constant 1 / (1 + exp(88.38)) and multiplies by
// it, which cost a microcode assist per vector (the forward sweep ran 5x slower). The only numerical change:
// |values| < FLT_MIN (DBL_MIN) read or produced by these loops count as 0, so silu(a) for a < -87 (float) is
// 0 instead of a number below 1e-36.

constexpr int kLanes = 32;  // NCHW: lanes per block (all lanes share the channel's parameters)

// s1[j] += sum (x - K[j]), s2[j] += sum (x - K[j])^2 over the elements of lane j (i % P == j).
template <typename T, int L>
VPFAST_CPU_CLONES void stats_sweep(const T* __restrict__ x, int64_t len, int64_t P_, const T* __restrict__ K,
                                   double* __restrict__ s1, double* __restrict__ s2) {
  if constexpr (L > 0) {
    double a[L] = {}, b[L] = {}, k[L];
    for (int j = 0; j < L; ++j) k[j] = static_cast<double>(K[j]);
    int64_t i = 0;
    for (; i + L <= len; i += L) {
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        const double d = static_cast<double>(x[i + j]) - k[j];
        a[j] += d;
        b[j] += d * d;
      }
    }
    for (int j = 0; i + j < len; ++j) {
      const double d = static_cast<double>(x[i + j]) - k[j];
      a[j] += d;
      b[j] += d * d;
    }
    for (int j = 0; j < L; ++j) {
      s1[j] += a[j];
      s2[j] += b[j];
    }
  } else {
    const int64_t P = P_;
    for (int64_t i = 0; i < len; i += P) {
#pragma omp simd
      for (int64_t j = 0; j < P; ++j) {
        const double d = static_cast<double>(x[i + j]) - static_cast<double>(K[j]);
        s1[j] += d;
        s2[j] += d * d;
      }
    }
  }
}

// y = silu((x - mean) * rw + b), lane parameters indexed by i % P
template <typename T, int L>
VPFAST_CPU_CLONES void forward_sweep(const T* __restrict__ x, T* __restrict__ y, int64_t len, int64_t P_,
                                     const T* __restrict__ mean, const T* __restrict__ rw,
                                     const T* __restrict__ b) {
  const int64_t P = L > 0 ? L : P_;
  int64_t i = 0;
  for (; i + P <= len; i += P) {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) y[i + j] = gns::silu<T>(gns::affine<T>(x[i + j], mean[j], rw[j], b[j]));
  }
  const int64_t rem = len - i;
#pragma omp simd
  for (int64_t j = 0; j < rem; ++j) y[i + j] = gns::silu<T>(gns::affine<T>(x[i + j], mean[j], rw[j], b[j]));
}

// dy = dL/da into dy_out; A[j] += sum dy, B[j] += sum dy * (x - mean) per lane
template <typename T, int L>
VPFAST_CPU_CLONES void backward_sums(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dy_out,
                                     int64_t len, int64_t P_, const T* __restrict__ mean,
                                     const T* __restrict__ rw, const T* __restrict__ b, double* __restrict__ A,
                                     double* __restrict__ B) {
  if constexpr (L > 0) {
    double sa[L] = {}, sb[L] = {};
    int64_t i = 0;
    for (; i + L <= len; i += L) {
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        const T xc = x[i + j] - mean[j];
        const T dy = gns::silu_backward<T>(g[i + j], xc * rw[j] + b[j]);
        dy_out[i + j] = dy;
        sa[j] += static_cast<double>(dy);
        sb[j] += static_cast<double>(dy) * static_cast<double>(xc);
      }
    }
    for (int j = 0; i + j < len; ++j) {
      const T xc = x[i + j] - mean[j];
      const T dy = gns::silu_backward<T>(g[i + j], xc * rw[j] + b[j]);
      dy_out[i + j] = dy;
      sa[j] += static_cast<double>(dy);
      sb[j] += static_cast<double>(dy) * static_cast<double>(xc);
    }
    for (int j = 0; j < L; ++j) {
      A[j] += sa[j];
      B[j] += sb[j];
    }
  } else {
    const int64_t P = P_;
    for (int64_t i = 0; i < len; i += P) {
#pragma omp simd
      for (int64_t j = 0; j < P; ++j) {
        const T xc = x[i + j] - mean[j];
        const T dy = gns::silu_backward<T>(g[i + j], xc * rw[j] + b[j]);
        dy_out[i + j] = dy;
        A[j] += static_cast<double>(dy);
        B[j] += static_cast<double>(dy) * static_cast<double>(xc);
      }
    }
  }
}

// gx = dy * cdy + (x - mean) * cx + c0, in place over gx (which holds dy)
template <typename T, int L>
VPFAST_CPU_CLONES void input_grad_sweep(const T* __restrict__ x, T* __restrict__ gx, int64_t len, int64_t P_,
                                        const T* __restrict__ mean, const T* __restrict__ cdy,
                                        const T* __restrict__ cx, const T* __restrict__ c0) {
  const int64_t P = L > 0 ? L : P_;
  int64_t i = 0;
  for (; i + P <= len; i += P) {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) gx[i + j] = gns::input_grad<T>(gx[i + j], x[i + j], mean[j], cdy[j], cx[j], c0[j]);
  }
  const int64_t rem = len - i;
#pragma omp simd
  for (int64_t j = 0; j < rem; ++j) gx[i + j] = gns::input_grad<T>(gx[i + j], x[i + j], mean[j], cdy[j], cx[j], c0[j]);
}

template <typename T>
std::vector<T> param_values(const c10::optional<at::Tensor>& p, int64_t C, T fill) {
  std::vector<T> out(C, fill);
  if (p.has_value() && p->defined()) {
    const auto t = p->contiguous();
    const T* d = t.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) out[c] = d[c];
  }
  return out;
}

// lanes for the channels_last sweeps: a compile-time 32 or 64 when C divides it, else C
int64_t cl_lanes(int64_t C) { return 32 % C == 0 ? 32 : (64 % C == 0 ? 64 : C); }

template <typename F>
void with_cl_lanes(int64_t P, F&& f) {
  if (P == 32)
    f(std::integral_constant<int, 32>{});
  else if (P == 64)
    f(std::integral_constant<int, 64>{});
  else
    f(std::integral_constant<int, 0>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cpu(
    const at::Tensor& x_, int64_t groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const Geometry geo = geometry(x_, groups, "vpfast::group_norm_silu_forward");
  check_param(weight, x_, geo.C, "weight");
  check_param(bias, x_, geo.C, "bias");
  const at::Tensor x = dense(x_, geo.channels_last);
  auto y = cpu::empty_output_like(x);
  auto mean = at::empty({geo.N, geo.G}, x.options());
  auto rstd = at::empty({geo.N, geo.G}, x.options());
  const int64_t N = geo.N, C = geo.C, HW = geo.HW, G = geo.G, Cg = geo.Cg;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_silu_forward_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    T* mp = mean.data_ptr<T>();
    T* rp = rstd.data_ptr<T>();
    const auto w = param_values<T>(weight, C, T(1));
    const auto b = param_values<T>(bias, C, T(0));
    if (!geo.channels_last) {
      const int64_t M = Cg * HW;
      cpu::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
        T K[kLanes], mv[kLanes], rw[kLanes], bv[kLanes];
        double s1[kLanes], s2[kLanes];
        for (int64_t t = begin; t < end; ++t) {
          const T* xs = xp + t * M;
          T* ys = yp + t * M;
          const int64_t g = t % G;
          for (int j = 0; j < kLanes; ++j) {
            K[j] = xs[0];
            s1[j] = s2[j] = 0;
          }
          stats_sweep<T, kLanes>(xs, M, kLanes, K, s1, s2);
          double a1 = 0, a2 = 0;
          for (int j = 0; j < kLanes; ++j) {
            a1 += s1[j];
            a2 += s2[j];
          }
          double m, r;
          gns::finish_stats(a1, a2, static_cast<double>(xs[0]), static_cast<double>(M), eps, m, r);
          const T mT = static_cast<T>(m), rT = static_cast<T>(r);
          mp[t] = mT;
          rp[t] = rT;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl;
            for (int j = 0; j < kLanes; ++j) {
              mv[j] = mT;
              rw[j] = rT * w[c];
              bv[j] = b[c];
            }
            forward_sweep<T, kLanes>(xs + cl * HW, ys + cl * HW, HW, kLanes, mv, rw, bv);
          }
        }
      });
    } else {
      const int64_t P = cl_lanes(C), len = HW * C;
      with_cl_lanes(P, [&](auto lanes) {
        constexpr int L = decltype(lanes)::value;
        cpu::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
          std::vector<T> K(P), mv(P), rw(P), bv(P);
          std::vector<double> s1(P), s2(P), g1(G), g2(G);
          for (int64_t n = begin; n < end; ++n) {
            const T* xs = xp + n * len;
            T* ys = yp + n * len;
            for (int64_t j = 0; j < P; ++j) {
              K[j] = xs[(j % C) / Cg * Cg];  // the group's first element
              s1[j] = s2[j] = 0;
            }
            stats_sweep<T, L>(xs, len, P, K.data(), s1.data(), s2.data());
            std::fill(g1.begin(), g1.end(), 0.0);
            std::fill(g2.begin(), g2.end(), 0.0);
            for (int64_t j = 0; j < P; ++j) {
              g1[(j % C) / Cg] += s1[j];
              g2[(j % C) / Cg] += s2[j];
            }
            for (int64_t g = 0; g < G; ++g) {
              double m, r;
              gns::finish_stats(g1[g], g2[g], static_cast<double>(xs[g * Cg]), static_cast<double>(Cg * HW), eps,
                                m, r);
              mp[n * G + g] = static_cast<T>(m);
              rp[n * G + g] = static_cast<T>(r);
            }
            for (int64_t j = 0; j < P; ++j) {
              const int64_t c = j % C, g = c / Cg;
              mv[j] = mp[n * G + g];
              rw[j] = rp[n * G + g] * w[c];
              bv[j] = b[c];
            }
            forward_sweep<T, L>(xs, ys, len, P, mv.data(), rw.data(), bv.data());
          }
        });
      });
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_, const at::Tensor& rstd_, int64_t groups,
    std::array<bool, 3> output_mask) {
  const Geometry geo = geometry(x_, groups, "vpfast::group_norm_silu_backward");
  check_param(weight, x_, geo.C, "weight");
  check_param(bias, x_, geo.C, "bias");
  check_backward(grad, x_, mean_, rstd_, geo);
  const at::Tensor x = dense(x_, geo.channels_last);
  const at::Tensor g_ = dense(grad, geo.channels_last);
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t N = geo.N, C = geo.C, HW = geo.HW, G = geo.G, Cg = geo.Cg;
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  const bool need_x = output_mask[0], need_w = output_mask[1] && has_w, need_b = output_mask[2] && has_b;
  auto gx = cpu::empty_output_like(x);
  auto partA = at::empty({N, C}, x.options().dtype(at::kDouble));  // sum dy      per (n, c)
  auto partB = at::empty({N, C}, x.options().dtype(at::kDouble));  // sum dy xhat per (n, c)
  at::Tensor gw = at::empty({0}, x.options()), gb = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* gp = g_.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    const T* rp = rstd.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    double* Ap = partA.data_ptr<double>();
    double* Bp = partB.data_ptr<double>();
    const auto w = param_values<T>(weight, C, T(1));
    const auto b = param_values<T>(bias, C, T(0));
    const double M = static_cast<double>(Cg * HW);
    if (!geo.channels_last) {
      const int64_t Mi = Cg * HW;
      cpu::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
        T mv[kLanes], rw[kLanes], bv[kLanes], cdy[kLanes], cx[kLanes], c0[kLanes];
        double sa[kLanes], sb[kLanes];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / G, g = t % G;
          const T* xs = xp + t * Mi;
          const T* gs = gp + t * Mi;
          T* gxs = gxp + t * Mi;
          const T mT = mp[t], rT = rp[t];
          double S1 = 0, S2 = 0;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl;
            for (int j = 0; j < kLanes; ++j) {
              mv[j] = mT;
              rw[j] = rT * w[c];
              bv[j] = b[c];
              sa[j] = sb[j] = 0;
            }
            backward_sums<T, kLanes>(gs + cl * HW, xs + cl * HW, gxs + cl * HW, HW, kLanes, mv, rw, bv, sa, sb);
            double A = 0, B = 0;
            for (int j = 0; j < kLanes; ++j) {
              A += sa[j];
              B += sb[j];
            }
            B *= static_cast<double>(rT);
            Ap[n * C + c] = A;
            Bp[n * C + c] = B;
            S1 += static_cast<double>(w[c]) * A;
            S2 += static_cast<double>(w[c]) * B;
          }
          if (!need_x) continue;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl;
            const auto k = gns::input_grad_coef(static_cast<double>(rT), static_cast<double>(w[c]), S1, S2, M);
            for (int j = 0; j < kLanes; ++j) {
              cdy[j] = static_cast<T>(k.cdy);
              cx[j] = static_cast<T>(k.cx);
              c0[j] = static_cast<T>(k.c0);
            }
            input_grad_sweep<T, kLanes>(xs + cl * HW, gxs + cl * HW, HW, kLanes, mv, cdy, cx, c0);
          }
        }
      });
    } else {
      const int64_t P = cl_lanes(C), len = HW * C;
      with_cl_lanes(P, [&](auto lanes) {
        constexpr int L = decltype(lanes)::value;
        cpu::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
          std::vector<T> mv(P), rw(P), bv(P), cdy(P), cx(P), c0(P);
          std::vector<double> sa(P), sb(P), S1(G), S2(G);
          for (int64_t n = begin; n < end; ++n) {
            const T* xs = xp + n * len;
            const T* gs = gp + n * len;
            T* gxs = gxp + n * len;
            for (int64_t j = 0; j < P; ++j) {
              const int64_t c = j % C, g = c / Cg;
              mv[j] = mp[n * G + g];
              rw[j] = rp[n * G + g] * w[c];
              bv[j] = b[c];
              sa[j] = sb[j] = 0;
            }
            backward_sums<T, L>(gs, xs, gxs, len, P, mv.data(), rw.data(), bv.data(), sa.data(), sb.data());
            double* A = Ap + n * C;
            double* B = Bp + n * C;
            for (int64_t c = 0; c < C; ++c) A[c] = B[c] = 0;
            for (int64_t j = 0; j < P; ++j) {
              A[j % C] += sa[j];
              B[j % C] += sb[j];
            }
            std::fill(S1.begin(), S1.end(), 0.0);
            std::fill(S2.begin(), S2.end(), 0.0);
            for (int64_t c = 0; c < C; ++c) {
              const int64_t g = c / Cg;
              B[c] *= static_cast<double>(rp[n * G + g]);
              S1[g] += static_cast<double>(w[c]) * A[c];
              S2[g] += static_cast<double>(w[c]) * B[c];
            }
            if (!need_x) continue;
            for (int64_t j = 0; j < P; ++j) {
              const int64_t c = j % C, g = c / Cg;
              const auto k = gns::input_grad_coef(static_cast<double>(rp[n * G + g]), static_cast<double>(w[c]),
                                                  S1[g], S2[g], M);
              cdy[j] = static_cast<T>(k.cdy);
              cx[j] = static_cast<T>(k.cx);
              c0[j] = static_cast<T>(k.c0);
            }
            input_grad_sweep<T, L>(xs, gxs, len, P, mv.data(), cdy.data(), cx.data(), c0.data());
          }
        });
      });
    }
    // batch sums in a fixed order: the same bits for any thread count
    if (need_w || need_b) {
      std::vector<double> sw(C, 0.0), sbias(C, 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          sbias[c] += Ap[n * C + c];
          sw[c] += Bp[n * C + c];
        }
      if (need_w) {
        gw = at::empty({C}, x.options());
        T* p = gw.data_ptr<T>();
        for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sw[c]);
      }
      if (need_b) {
        gb = at::empty({C}, x.options());
        T* p = gb.data_ptr<T>();
        for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sbias[c]);
      }
    }
  });
  if (!need_x) gx = at::empty({0}, x.options());
  return {gx, gw, gb};
}

}  // namespace
}  // namespace vpfast

TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("group_norm_silu_forward", &vpfast::group_norm_silu_forward_cpu);
  m.impl("group_norm_silu_backward", &vpfast::group_norm_silu_backward_cpu);
}
