// CUDA kernels of mtpkern::verify_greedy / verify_typical: one block, one launch, no host sync.
// Each thread scores whole path rows (rows are short: max_depth + 1 <= a few dozen), the block
// reduces (accept length, -row) to the best row, then writes the four outputs.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mtpkern.h"

namespace mtpkern {

constexpr int kVerifyThreads = 256;

__global__ void verify_kernel(VerifyArgs a, const int64_t* __restrict__ paths, int64_t P, int64_t Dp1,
                              int64_t* __restrict__ accept_len, int64_t* __restrict__ best_path,
                              int64_t* __restrict__ last_node, int64_t* __restrict__ tokens) {
  __shared__ uint64_t warp_best[kVerifyThreads / 32];
  __shared__ uint64_t best;
  uint64_t key = 0;  // below every real key, since row indices are < 2^31
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const uint64_t k = best_key(accept_length(a, paths + p * Dp1, Dp1), p);
    key = k > key ? k : key;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const uint64_t other = __shfl_down_sync(0xffffffffu, key, offset);
    key = other > key ? other : key;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = key;
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

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_verify(const VerifyArgs& a,
                                                                               const at::Tensor& paths) {
  const int64_t P = paths.size(0), Dp1 = paths.size(1);
  const auto opts = paths.options();
  at::Tensor accept_len = at::empty({}, opts), best_path = at::empty({}, opts), last_node = at::empty({}, opts);
  at::Tensor tokens = at::empty({Dp1}, opts);
  const int threads = static_cast<int>(std::min<int64_t>(kVerifyThreads, (P + 31) / 32 * 32));
  verify_kernel<<<1, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a, paths.data_ptr<int64_t>(), P, Dp1, accept_len.data_ptr<int64_t>(), best_path.data_ptr<int64_t>(),
      last_node.data_ptr<int64_t>(), tokens.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accept_len, best_path, last_node, tokens};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tree_tokens,
                                                                             const at::Tensor& target_argmax,
                                                                             const at::Tensor& paths) {
  check_verify(tree_tokens, target_argmax, paths, "verify_greedy");
  const c10::cuda::CUDAGuard guard(paths.device());
  const VerifyArgs a{tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), nullptr, nullptr,
                     tree_tokens.size(0), 0.f, 0.f, false};
  return launch_verify(a, paths);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_typical_cuda(
    const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& node_prob,
    const at::Tensor& parent_entropy, const at::Tensor& paths, double epsilon, double alpha) {
  check_verify(tree_tokens, target_argmax, paths, "verify_typical");
  check_verify_typical(tree_tokens, node_prob, parent_entropy);
  const c10::cuda::CUDAGuard guard(paths.device());
  const VerifyArgs a{tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), node_prob.data_ptr<float>(),
                     parent_entropy.data_ptr<float>(), tree_tokens.size(0), static_cast<float>(epsilon),
                     static_cast<float>(alpha), true};
  return launch_verify(a, paths);
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) {
  m.impl("verify_greedy", &verify_greedy_cuda);
  m.impl("verify_typical", &verify_typical_cuda);
}

}  // namespace mtpkern
