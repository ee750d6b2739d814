// Large CPU outputs (and per-call scratch such as the warps' column buffers) from a small cache of freed blocks.
//
// A training loop asks for the same output sizes every step. glibc serves multi-megabyte blocks from mmap or
// from the top of the heap and hands them back to the kernel when they are freed (trim), so in many process
// states each step page-faults its outputs in afresh: ~2000 faults per 8 MiB, which cost more than the
// depthwise kernels themselves on this machine. Blocks of at least kMinBytes freed by a tensor are kept (up to
// a byte limit, least recently freed first out) and handed to the next request of the same size, so a steady
// loop reuses resident pages. Smaller requests go straight to the default CPU allocator.
//
// The tensors are ordinary resizable CPU tensors; only their storage's allocator differs. Allocation and free
// are reported to the profiler like the default allocator's, so memory profiles count live tensors, not the
// cached blocks. Limit: $VPFAST_CPU_OUTPUT_CACHE_MB (default 256; 0 turns the cache off).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vpfast::cpu {

// at::empty(sizes, options) for a CPU tensor, served from the cache when the block is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        std::optional<at::MemoryFormat> memory_format = std::nullopt);
// the same for a dense tensor shaped and laid out like t (contiguous or channels_last)
inline at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options(), t.suggest_memory_format());
}

struct OutputCacheStats {
  int64_t limit_bytes, cached_bytes, cached_blocks, hits, misses;
};
OutputCacheStats output_cache_stats();
void output_cache_set_limit(int64_t bytes);  // evicts down to the new limit
void output_cache_clear();                   // frees every cached block (live tensors are untouched)

}  // namespace vpfast::cpu
