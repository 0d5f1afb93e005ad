// CUDA kernel of mtpkern::tree_buffers: one block builds the whole tree's buffers (T <= 4096),
// one thread per node walking its (at most max_depth + 1) ancestors. Invalid nodes get depth -1
// and are never followed out of bounds; the Python wrapper turns them into a ValueError.
// Torch glue (checks, outputs, registration): csrc/tree_mask_api.cpp.
#include "../kernels.h"

namespace mtpkern {

__global__ void tree_buffers_kernel(const int64_t* __restrict__ parents, int64_t T, int64_t W, int64_t max_depth,
                                    int32_t* __restrict__ mask, int64_t* __restrict__ depth,
                                    int64_t* __restrict__ retrieve, bool* __restrict__ is_leaf) {
  __shared__ bool has_child[kMaxTreeNodes];
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) has_child[i] = false;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) {
    const int64_t d = tree_row(parents, max_depth, i, mask + i * W, W, retrieve + i * (max_depth + 1));
    depth[i] = d;
    if (i > 0 && d >= 0) has_child[parents[i]] = true;  // same value from every writer: no race
  }
  __syncthreads();
  // Each thread reads back only the depths it wrote itself.
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) is_leaf[i] = depth[i] >= 0 && !has_child[i];
}

cudaError_t launch_tree_buffers(const int64_t* parents, int64_t T, int64_t max_depth, int32_t* mask, int64_t* depth,
                                int64_t* retrieve, bool* is_leaf, cudaStream_t stream) {
  const int threads = static_cast<int>(T >= 1024 ? 1024 : (T + 31) / 32 * 32);
  tree_buffers_kernel<<<1, threads, 0, stream>>>(parents, T, (T + 31) / 32, max_depth, mask, depth, retrieve,
                                                 is_leaf);
  return cudaGetLastError();
}

}  // namespace mtpkern
