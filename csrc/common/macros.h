// Shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#if defined(__CUDACC__)
#define VPFAST_HD __host__ __device__ __forceinline__
#else
#define VPFAST_HD inline __attribute__((always_inline))
#endif

// CPU kernels are compiled once per instruction set and picked at load time (GCC function multiversioning),
// so one portable binary still runs AVX-512 code on this machine. Functions called from a cloned kernel
// must be VPFAST_HD (always_inline) so that they are compiled for the clone's instruction set too.
// The AVX2 + FMA clone is "arch=x86-64-v3", dispatched on the CPU's features. It was "arch=haswell", which
// GCC dispatches on the CPU model (__builtin_cpu_is("haswell")): every AMD CPU and every Intel model other
// than Haswell itself (e.g. Skylake client) without AVX-512 ran the SSE2 default clone, whose floor() is a
// libm call that stops vectorisation. GCC before 12 cannot dispatch on x86-64-v3 and keeps the old list.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#if __GNUC__ >= 12
#define VPFAST_CPU_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define VPFAST_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
#else
#define VPFAST_CPU_CLONES
#endif
