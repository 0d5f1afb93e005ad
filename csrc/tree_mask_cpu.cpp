// CPU kernel of mtpkern::tree_buffers (same row logic as csrc/cuda/tree_mask.cu, see mtpkern.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "mtpkern.h"

namespace mtpkern {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_buffers_cpu(const at::Tensor& parents,
                                                                           int64_t max_depth) {
  check_tree_buffers(parents, max_depth);
  const int64_t T = parents.size(0), W = (T + 31) / 32;
  const auto opts = parents.options();
  at::Tensor mask = at::empty({T, W}, opts.dtype(at::kInt));
  at::Tensor depth = at::empty({T}, opts);
  at::Tensor retrieve = at::empty({T, max_depth + 1}, opts);
  at::Tensor is_leaf = at::empty({T}, opts.dtype(at::kBool));

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

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) { m.impl("tree_buffers", &tree_buffers_cpu); }

}  // namespace mtpkern
