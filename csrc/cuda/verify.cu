// CUDA kernel of mtpkern::verify_greedy / verify_typical: one block per tree of the batch (a
// 1-D tree is a batch of one), one launch, no host sync.
// Each thread scores whole path rows (rows are short: max_depth + 1 is a few dozen at most),
// the block reduces (accept length, -row) to the best row, then writes the four outputs.
// Torch glue (checks, outputs, registration): csrc/verify_api.cpp.
#include "../kernels.h"

namespace mtpkern {

constexpr int kVerifyThreads = 256;

__global__ void verify_kernel(VerifyArgs a, const int64_t* __restrict__ paths, int64_t P, int64_t Dp1,
                              int64_t* __restrict__ accept_len, int64_t* __restrict__ best_path,
                              int64_t* __restrict__ last_node, int64_t* __restrict__ tokens) {
  __shared__ uint64_t warp_best[kVerifyThreads / 32];
  __shared__ uint64_t best;
  const int64_t r = blockIdx.x;  // this block's tree of the batch
  a = row_args(a, r);
  accept_len += r;
  best_path += r;
  last_node += r;
  tokens += r * Dp1;
  uint64_t key = 0;  // below every real key, since row indices are < 2^31
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const uint64_t k = best_key(accept_length(a, paths + p * Dp1, Dp1), p);
    key = k > key ? k : key;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const uint64_t other = __shfl_down_sync(0xffffffffu, key, offset);
    key = other > key ? other : key;
  }
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = key;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t k = warp_best[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) k = warp_best[w] > k ? warp_best[w] : k;
    best = k;
  }
  __syncthreads();
  const int64_t b = key_row(best), n = key_length(best);
  const int64_t* row = paths + b * Dp1;
  for (int64_t j = threadIdx.x; j < Dp1; j += blockDim.x) tokens[j] = output_token(a, row, n, j);
  if (threadIdx.x == 0) {
    *accept_len = n;
    *best_path = b;
    *last_node = row[n];
  }
}

cudaError_t launch_verify(const VerifyArgs& a, int64_t B, const int64_t* paths, int64_t P, int64_t Dp1,
                          int64_t* accept_len, int64_t* best_path, int64_t* last_node, int64_t* tokens,
                          cudaStream_t stream) {
  const int threads = static_cast<int>(P >= kVerifyThreads ? kVerifyThreads : (P + 31) / 32 * 32);
  verify_kernel<<<static_cast<unsigned>(B), threads, 0, stream>>>(a, paths, P, Dp1, accept_len, best_path, last_node,
                                                                  tokens);
  return cudaGetLastError();
}

}  // namespace mtpkern
