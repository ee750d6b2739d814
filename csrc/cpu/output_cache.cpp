#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>
#include <list>
#include <mutex>

namespace vpfast::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // below this the default allocator's cost is negligible
constexpr size_t kAlign = 64;

struct Block {
  void* ptr;
  size_t bytes;
};

int64_t limit_from_env() {
  const char* s = std::getenv("VPFAST_CPU_OUTPUT_CACHE_MB");
  if (s == nullptr || *s == '\0') return int64_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0,
              "VPFAST_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got '", s, "'");
  return int64_t(mb) << 20;
}

struct Pool {
  std::mutex mu;
  std::list<Block*> blocks;  // cached, most recently freed first
  std::atomic<int64_t> limit{limit_from_env()};
  int64_t cached = 0, hits = 0, misses = 0;
  size_t live = 0;  // bytes held by tensors, for the profiler's running total

  // with mu held: free cached blocks, oldest first, until `cached + extra <= limit`
  void evict(int64_t extra) {
    while (!blocks.empty() && cached + extra > limit) {
      Block* b = blocks.back();
      blocks.pop_back();
      cached -= int64_t(b->bytes);
      std::free(b->ptr);
      delete b;
    }
  }
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void release(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  Pool& p = pool();
  size_t live;
  bool keep;
  {
    std::lock_guard<std::mutex> g(p.mu);
    p.live -= b->bytes;
    live = p.live;
    keep = int64_t(b->bytes) <= p.limit;
    if (keep) {
      p.evict(int64_t(b->bytes));
      p.blocks.push_front(b);
      p.cached += int64_t(b->bytes);
    }
  }
  c10::reportMemoryUsageToProfiler(b->ptr, -int64_t(b->bytes), live, 0, c10::Device(c10::DeviceType::CPU));
  if (!keep) {
    std::free(b->ptr);
    delete b;
  }
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    Pool& p = pool();
    Block* b = nullptr;
    size_t live;
    {
      std::lock_guard<std::mutex> g(p.mu);
      for (auto it = p.blocks.begin(); it != p.blocks.end(); ++it) {
        if ((*it)->bytes == n) {
          b = *it;
          p.blocks.erase(it);
          p.cached -= int64_t(n);
          break;
        }
      }
      (b ? p.hits : p.misses) += 1;
      p.live += n;
      live = p.live;
    }
    if (b == nullptr) {
      void* ptr = nullptr;
      if (posix_memalign(&ptr, kAlign, n) != 0 || ptr == nullptr) {
        std::lock_guard<std::mutex> g(p.mu);
        p.live -= n;
        TORCH_CHECK(false, "vpfast: out of memory allocating ", n, " bytes on the CPU");
      }
      b = new Block{ptr, n};
    }
    c10::reportMemoryUsageToProfiler(b->ptr, int64_t(n), live, 0, c10::Device(c10::DeviceType::CPU));
    return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        std::optional<at::MemoryFormat> memory_format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  if (pool().limit.load() == 0) return at::empty(sizes, options, memory_format);
  return at::Tensor(at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()), memory_format));
}

OutputCacheStats output_cache_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  return {p.limit.load(), p.cached, int64_t(p.blocks.size()), p.hits, p.misses};
}

void output_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "vpfast: the output cache limit must be >= 0 bytes, got ", bytes);
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  p.limit = bytes;
  p.evict(0);
}

void output_cache_clear() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  const int64_t keep = p.limit.load();
  p.limit = 0;
  p.evict(0);
  p.limit = keep;
}

}  // namespace vpfast::cpu
