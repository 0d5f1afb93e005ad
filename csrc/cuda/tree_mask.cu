// CUDA kernel of mtpkern::tree_buffers: one block builds the whole tree's buffers (T <= 4096),
// one thread per node walking its (at most max_depth + 1) ancestors. Invalid nodes get depth -1
// and are never followed out of bounds; the Python wrapper turns them into a ValueError.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mtpkern.h"

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_buffers_cuda(const at::Tensor& parents,
                                                                            int64_t max_depth) {
  check_tree_buffers(parents, max_depth);
  const c10::cuda::CUDAGuard guard(parents.device());
  const int64_t T = parents.size(0), W = (T + 31) / 32;
  const auto opts = parents.options();
  at::Tensor mask = at::empty({T, W}, opts.dtype(at::kInt));
  at::Tensor depth = at::empty({T}, opts);
  at::Tensor retrieve = at::empty({T, max_depth + 1}, opts);
  at::Tensor is_leaf = at::empty({T}, opts.dtype(at::kBool));
  const int threads = static_cast<int>(std::min<int64_t>(1024, (T + 31) / 32 * 32));
  tree_buffers_kernel<<<1, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      parents.data_ptr<int64_t>(), T, W, max_depth, mask.data_ptr<int32_t>(), depth.data_ptr<int64_t>(),
      retrieve.data_ptr<int64_t>(), is_leaf.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, depth, retrieve, is_leaf};
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) { m.impl("tree_buffers", &tree_buffers_cuda); }

}  // namespace mtpkern
