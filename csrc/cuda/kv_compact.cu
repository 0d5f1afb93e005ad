// CUDA kernel of mtpkern::kv_compact_: for every (layer, batch row, head) slice of K and V,
// slot prefix_len + path[i] moves to slot prefix_len + i for i < count, in one launch.
// Sources and destinations overlap (path [0, 2, 3]: slot p+2 -> p+1 while p+3 -> p+2), so each
// block owns a whole (slice, dim chunk), stages every source vector in shared memory, syncs,
// and only then writes. prefix_len and count are read on the device (no host sync, CUDA-graph
// safe); moves with a slot outside [0, S) are skipped, never performed out of bounds.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mtpkern.h"

namespace mtpkern {

constexpr int64_t kStageBytes = 16384;  // shared memory per block for staged vectors

// Vec is the copy unit (2..16 bytes): data is moved as raw bytes, whatever the dtype.
template <typename Vec>
__global__ void kv_compact_kernel(Vec* __restrict__ k, Vec* __restrict__ v, const int64_t* __restrict__ path,
                                  const void* prefix_ptr, bool prefix64, const void* count_ptr, bool count64,
                                  int64_t N, int64_t S, int64_t row_vecs, int64_t chunk_vecs) {
  extern __shared__ __align__(16) unsigned char stage_raw[];
  Vec* stage = reinterpret_cast<Vec*>(stage_raw);
  Vec* slice = (blockIdx.y == 0 ? k : v) + static_cast<int64_t>(blockIdx.x) * S * row_vecs;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * chunk_vecs;
  const int64_t width = min(chunk_vecs, row_vecs - c0);
  const int64_t prefix = load_index(prefix_ptr, prefix64);
  const int64_t n = max(int64_t(0), min(load_index(count_ptr, count64), N));

  // Both phases walk the same (i, c) pairs with the same validity test.
  for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
    const int64_t i = e / width;
    if (move_in_range(path[i], i, prefix, S)) stage[e] = slice[(prefix + path[i]) * row_vecs + c0 + e % width];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
    const int64_t i = e / width;
    if (move_in_range(path[i], i, prefix, S)) slice[(prefix + i) * row_vecs + c0 + e % width] = stage[e];
  }
}

template <typename Vec>
static void launch(at::Tensor& k, at::Tensor& v, const at::Tensor& path, const at::Tensor& prefix_len,
                   const at::Tensor& count) {
  const int64_t N = path.size(0), S = k.size(3);
  const int64_t slices = k.size(0) * k.size(1) * k.size(2);
  const int64_t row_vecs = k.size(4) * k.element_size() / static_cast<int64_t>(sizeof(Vec));
  const int64_t chunk_vecs =
      std::max<int64_t>(1, std::min<int64_t>(row_vecs, kStageBytes / (N * static_cast<int64_t>(sizeof(Vec)))));
  const int64_t chunks = (row_vecs + chunk_vecs - 1) / chunk_vecs;
  TORCH_CHECK_VALUE(slices <= INT32_MAX && chunks <= 65535, "kv_compact_: cache shape ", k.sizes(), " is too large");
  const dim3 grid(static_cast<unsigned>(slices), 2, static_cast<unsigned>(chunks));
  const int threads = static_cast<int>(std::min<int64_t>(256, (N * chunk_vecs + 31) / 32 * 32));
  const size_t smem = N * chunk_vecs * sizeof(Vec);
  kv_compact_kernel<Vec><<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<Vec*>(k.data_ptr()), static_cast<Vec*>(v.data_ptr()), path.data_ptr<int64_t>(),
      prefix_len.data_ptr(), prefix_len.scalar_type() == at::kLong, count.data_ptr(),
      count.scalar_type() == at::kLong, N, S, row_vecs, chunk_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_compact_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& path, const at::Tensor& prefix_len,
                     const at::Tensor& count) {
  check_kv_compact(k_cache, v_cache, path, prefix_len, count);
  if (k_cache.numel() == 0 || path.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  // The widest copy unit that divides a row and both base addresses.
  const int64_t row_bytes = k_cache.size(4) * k_cache.element_size();
  const auto addr = reinterpret_cast<uintptr_t>(k_cache.data_ptr()) | reinterpret_cast<uintptr_t>(v_cache.data_ptr());
  auto fits = [&](int64_t unit) { return row_bytes % unit == 0 && addr % unit == 0; };
  if (fits(16)) {
    launch<uint4>(k_cache, v_cache, path, prefix_len, count);
  } else if (fits(8)) {
    launch<uint2>(k_cache, v_cache, path, prefix_len, count);
  } else if (fits(4)) {
    launch<uint32_t>(k_cache, v_cache, path, prefix_len, count);
  } else {
    launch<uint16_t>(k_cache, v_cache, path, prefix_len, count);
  }
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) { m.impl("kv_compact_", &kv_compact_cuda); }

}  // namespace mtpkern
