// mtpkern::kv_compact_: the CPU kernel and the CUDA entry point (kernel: cuda/kv_compact.cu).
// Unlike the CUDA kernel (which skips bad indices, as it cannot raise without a host sync), the
// CPU kernel raises on any move outside the cache.
#ifndef MTPKERN_CPU_ONLY  // CPU-only builds (setup.py's CppExtension fallback) leave out the CUDA side
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "mtpkern.h"

namespace mtpkern {

void kv_compact_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& path, const at::Tensor& prefix_len,
                    const at::Tensor& count) {
  check_kv_compact(k_cache, v_cache, path, prefix_len, count);
  const bool per_row = path.dim() == 2;
  const int64_t N = path.size(-1), S = k_cache.size(3), B = k_cache.size(1), H = k_cache.size(2);
  const int64_t rows = per_row ? B : 1;
  std::vector<int64_t> prefix(rows), n(rows);
  // Every row's values are checked before anything moves.
  for (int64_t b = 0; b < rows; ++b) {
    prefix[b] = load_row_index(prefix_len.data_ptr(), prefix_len.scalar_type() == at::kLong, b);
    n[b] = load_row_index(count.data_ptr(), count.scalar_type() == at::kLong, b);
    const std::string where = per_row ? c10::str(" (batch row ", b, ")") : std::string();
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= N, "kv_compact_: count = ", n[b], " is outside [0, ", N, "]", where);
    const int64_t* idx = path.data_ptr<int64_t>() + b * N;
    for (int64_t i = 0; i < n[b]; ++i) {
      TORCH_CHECK_VALUE(move_in_range(idx[i], i, prefix[b], S), "kv_compact_: path[", i, "] = ", idx[i],
                        " with prefix_len = ", prefix[b], " moves slot ", prefix[b] + idx[i], " to slot ", prefix[b] + i,
                        ", outside the cache's ", S, " slots", where);
    }
  }
  const int64_t row = k_cache.size(4) * k_cache.element_size();  // bytes per (slot) vector
  const int64_t slices = k_cache.size(0) * B * H;
  std::vector<char> staged(N * row);
  for (at::Tensor* cache : {&k_cache, &v_cache}) {
    char* base = static_cast<char*>(cache->data_ptr());
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t b = per_row ? (s / H) % B : 0;
      const int64_t* idx = path.data_ptr<int64_t>() + b * N;
      char* slice = base + s * S * row;
      // All reads before any write: sources and destinations may overlap.
      for (int64_t i = 0; i < n[b]; ++i) std::memcpy(staged.data() + i * row, slice + (prefix[b] + idx[i]) * row, row);
      for (int64_t i = 0; i < n[b]; ++i) std::memcpy(slice + (prefix[b] + i) * row, staged.data() + i * row, row);
    }
  }
}

#ifndef MTPKERN_CPU_ONLY
void kv_compact_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& path, const at::Tensor& prefix_len,
                     const at::Tensor& count) {
  check_kv_compact(k_cache, v_cache, path, prefix_len, count);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const CompactArgs a{k_cache.data_ptr(),
                      v_cache.data_ptr(),
                      path.data_ptr<int64_t>(),
                      prefix_len.data_ptr(),
                      prefix_len.scalar_type() == at::kLong,
                      count.data_ptr(),
                      count.scalar_type() == at::kLong,
                      k_cache.size(0) * k_cache.size(1) * k_cache.size(2),
                      path.size(-1),
                      k_cache.size(3),
                      k_cache.size(4) * static_cast<int64_t>(k_cache.element_size()),
                      path.dim() == 2,
                      k_cache.size(1),
                      k_cache.size(2)};
  C10_CUDA_CHECK(launch_kv_compact(a, c10::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) { m.impl("kv_compact_", &kv_compact_cuda); }
#endif  // MTPKERN_CPU_ONLY

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) { m.impl("kv_compact_", &kv_compact_cpu); }

}  // namespace mtpkern
