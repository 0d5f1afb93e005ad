// mtpkern::tree_buffers: the CPU kernel and the CUDA entry point (kernel: cuda/tree_mask.cu).
// Both run the row logic of kernels.h and mark invalid nodes with depth -1.
#include <ATen/ops/empty.h>
#ifndef MTPKERN_CPU_ONLY  // CPU-only builds (setup.py's CppExtension fallback) leave out the CUDA side
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <vector>

#include "mtpkern.h"

namespace mtpkern {

using Buffers = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

static Buffers empty_buffers(const at::Tensor& parents, int64_t max_depth) {
  const int64_t T = parents.size(0);
  const auto opts = parents.options();
  return {at::empty({T, (T + 31) / 32}, opts.dtype(at::kInt)), at::empty({T}, opts),
          at::empty({T, max_depth + 1}, opts), at::empty({T}, opts.dtype(at::kBool))};
}

Buffers tree_buffers_cpu(const at::Tensor& parents, int64_t max_depth) {
  check_tree_buffers(parents, max_depth);
  auto [mask, depth, retrieve, is_leaf] = empty_buffers(parents, max_depth);
  const int64_t T = parents.size(0), W = mask.size(1);
  const int64_t* par = parents.data_ptr<int64_t>();
  int64_t* dep = depth.data_ptr<int64_t>();
  std::vector<bool> has_child(T, false);
  for (int64_t i = 0; i < T; ++i) {
    dep[i] = tree_row(par, max_depth, i, mask.data_ptr<int32_t>() + i * W, W,
                      retrieve.data_ptr<int64_t>() + i * (max_depth + 1));
    if (i > 0 && dep[i] >= 0) has_child[par[i]] = true;  // a valid node's parent is in [0, i)
  }
  bool* leaf = is_leaf.data_ptr<bool>();
  for (int64_t i = 0; i < T; ++i) leaf[i] = dep[i] >= 0 && !has_child[i];
  return {mask, depth, retrieve, is_leaf};
}

#ifndef MTPKERN_CPU_ONLY
Buffers tree_buffers_cuda(const at::Tensor& parents, int64_t max_depth) {
  check_tree_buffers(parents, max_depth);
  const c10::cuda::CUDAGuard guard(parents.device());
  auto out = empty_buffers(parents, max_depth);
  auto& [mask, depth, retrieve, is_leaf] = out;
  C10_CUDA_CHECK(launch_tree_buffers(parents.data_ptr<int64_t>(), parents.size(0), max_depth,
                                     mask.data_ptr<int32_t>(), depth.data_ptr<int64_t>(),
                                     retrieve.data_ptr<int64_t>(), is_leaf.data_ptr<bool>(),
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) { m.impl("tree_buffers", &tree_buffers_cuda); }
#endif  // MTPKERN_CPU_ONLY

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) { m.impl("tree_buffers", &tree_buffers_cpu); }

}  // namespace mtpkern
