// CUDA kernel of mtpkern::kv_compact_: for every (layer, batch row, head) slice of K and V,
// slot prefix_len + path[i] moves to slot prefix_len + i for i < count, in one launch (with a
// path, prefix_len and count per batch row, each slice reads its row's).
// Sources and destinations overlap (path [0, 2, 3]: slot p+2 -> p+1 while p+3 -> p+2), so each
// block owns a whole (slice, dim chunk), stages every source vector in shared memory, syncs,
// and only then writes. prefix_len and count are read on the device (no host sync, CUDA-graph
// safe); moves with a slot outside [0, S) are skipped, never performed out of bounds.
// Torch glue (checks, registration): csrc/kv_compact_api.cpp.
#include "../kernels.h"

namespace mtpkern {

constexpr int64_t kStageBytes = 16384;  // shared memory per block for staged vectors

// Vec is the copy unit (2..16 bytes): data moves as raw bytes, whatever the dtype.
template <typename Vec>
__global__ void kv_compact_kernel(CompactArgs a, int64_t row_vecs, int64_t chunk_vecs) {
  extern __shared__ __align__(16) unsigned char stage_raw[];
  Vec* stage = reinterpret_cast<Vec*>(stage_raw);
  Vec* slice = static_cast<Vec*>(blockIdx.y == 0 ? a.k : a.v) + static_cast<int64_t>(blockIdx.x) * a.S * row_vecs;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * chunk_vecs;
  const int64_t width = min(chunk_vecs, row_vecs - c0);
  const int64_t b = slice_row(a, blockIdx.x);  // 0 unless every batch row has its own path
  const int64_t* path = a.path + b * a.N;
  const int64_t prefix = load_row_index(a.prefix_len, a.prefix64, b);
  const int64_t n = max(int64_t(0), min(load_row_index(a.count, a.count64, b), a.N));

  // Both phases walk the same (i, c) pairs with the same validity test.
  for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
    const int64_t i = e / width;
    if (move_in_range(path[i], i, prefix, a.S)) stage[e] = slice[(prefix + path[i]) * row_vecs + c0 + e % width];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
    const int64_t i = e / width;
    if (move_in_range(path[i], i, prefix, a.S)) slice[(prefix + i) * row_vecs + c0 + e % width] = stage[e];
  }
}

template <typename Vec>
static cudaError_t launch(const CompactArgs& a, cudaStream_t stream) {
  const int64_t unit = sizeof(Vec), row_vecs = a.row_bytes / unit;
  int64_t chunk_vecs = kStageBytes / (a.N * unit);  // as much of a row as fits the stage
  chunk_vecs = chunk_vecs < 1 ? 1 : (chunk_vecs > row_vecs ? row_vecs : chunk_vecs);
  const dim3 grid(static_cast<unsigned>(a.slices), 2, static_cast<unsigned>((row_vecs + chunk_vecs - 1) / chunk_vecs));
  const int64_t work = a.N * chunk_vecs;
  const int threads = static_cast<int>(work >= 256 ? 256 : (work + 31) / 32 * 32);
  kv_compact_kernel<Vec><<<grid, threads, a.N * chunk_vecs * unit, stream>>>(a, row_vecs, chunk_vecs);
  return cudaGetLastError();
}

cudaError_t launch_kv_compact(const CompactArgs& a, cudaStream_t stream) {
  if (a.slices == 0 || a.S == 0 || a.N == 0 || a.row_bytes == 0) return cudaSuccess;
  // The widest copy unit that divides a row and both base addresses.
  const auto addr = reinterpret_cast<uintptr_t>(a.k) | reinterpret_cast<uintptr_t>(a.v);
  auto fits = [&](int64_t unit) { return a.row_bytes % unit == 0 && addr % unit == 0; };
  if (fits(16)) return launch<uint4>(a, stream);
  if (fits(8)) return launch<uint2>(a, stream);
  if (fits(4)) return launch<uint32_t>(a, stream);
  return launch<uint16_t>(a, stream);
}

}  // namespace mtpkern
