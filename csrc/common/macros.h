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
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define VPFAST_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define VPFAST_CPU_CLONES
#endif
