// Flush-to-zero for the CPU kernels, scoped to the kernel.
//
// Arithmetic that produces or reads a denormal (|x| below 1.2e-38 in float32, 2.2e-308 in float64) takes a
// microcode assist on x86: tens to a hundred cycles instead of one. Softmax tails, saturated gates and tiny
// bilinear weights produce them in ordinary training (the DDR loss ran 4x slower on randn inputs with
// tau = 0.1), so every CPU kernel here runs its work with denormals flushed: results that would be denormal
// become 0 (FTZ) and denormal inputs read as 0 (DAZ). That changes a value only where it is below the
// smallest normal number, far inside every tolerance the ops are tested to, and keeps a kernel's time
// independent of its data.
//
// The mode is a per-thread register (MXCSR on x86, FPCR on AArch64), so it must be set in every thread that
// runs kernel work and put back afterwards: the caller (and PyTorch's own ops, which share the threads of
// at::parallel_for) keep whatever torch.set_flush_denormal set. FlushDenormals does that for one scope;
// cpu::parallel_for is at::parallel_for with one FlushDenormals around each worker's share.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace vpfast {
namespace cpu {

class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    const unsigned int want = saved_ | kFtz | kDaz;
    if (want != saved_) _mm_setcsr(want);  // writing MXCSR stalls the pipeline; skip it when already set
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t want = saved_ | kFz;
    if (want != saved_) __asm__ __volatile__("msr fpcr, %0" : : "r"(want));
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned int kDaz = 1u << 6, kFtz = 1u << 15;  // MXCSR bits
  unsigned int saved_ = 0;
#elif defined(__aarch64__)
  static constexpr uint64_t kFz = uint64_t(1) << 24;  // FPCR.FZ: flush inputs and results, single and double
  uint64_t saved_ = 0;
#endif
};

// at::parallel_for(begin, end, grain, f) with denormals flushed in each thread while it runs its part of f.
// Any code of a kernel that does floating-point work outside parallel_for needs its own FlushDenormals.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    FlushDenormals flushed;
    f(b, e);
  });
}

}  // namespace cpu
}  // namespace vpfast
