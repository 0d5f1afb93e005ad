// mtpkern::verify_greedy / verify_typical: the CPU kernels and the CUDA entry points (kernel:
// cuda/verify.cu). Both score rows with the logic of kernels.h.
#include <ATen/ops/empty.h>
#ifndef MTPKERN_CPU_ONLY  // CPU-only builds (setup.py's CppExtension fallback) leave out the CUDA side
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <algorithm>

#include "mtpkern.h"

namespace mtpkern {

using VerifyOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// 0-d / [Dp1] outputs for a 1-D tree, [B] / [B, Dp1] for a batch of B rows.
static VerifyOut empty_outputs(const at::Tensor& tree_tokens, const at::Tensor& paths) {
  const auto opts = paths.options();
  if (tree_tokens.dim() == 1) {
    return {at::empty({}, opts), at::empty({}, opts), at::empty({}, opts), at::empty({paths.size(1)}, opts)};
  }
  const int64_t B = tree_tokens.size(0);
  return {at::empty({B}, opts), at::empty({B}, opts), at::empty({B}, opts), at::empty({B, paths.size(1)}, opts)};
}

static VerifyOut verify_cpu(const VerifyArgs& args, const at::Tensor& tree_tokens, const at::Tensor& paths) {
  const int64_t P = paths.size(0), Dp1 = paths.size(1), B = tree_tokens.dim() == 1 ? 1 : tree_tokens.size(0);
  const int64_t* rows = paths.data_ptr<int64_t>();
  auto out = empty_outputs(tree_tokens, paths);
  auto& [accept_len, best_path, last_node, tokens] = out;
  for (int64_t r = 0; r < B; ++r) {
    const VerifyArgs a = row_args(args, r);
    uint64_t best = 0;
    for (int64_t p = 0; p < P; ++p) best = std::max(best, best_key(accept_length(a, rows + p * Dp1, Dp1), p));
    const int64_t b = key_row(best), n = key_length(best);
    const int64_t* row = rows + b * Dp1;
    accept_len.data_ptr<int64_t>()[r] = n;
    best_path.data_ptr<int64_t>()[r] = b;
    last_node.data_ptr<int64_t>()[r] = row[n];
    for (int64_t j = 0; j < Dp1; ++j) tokens.data_ptr<int64_t>()[r * Dp1 + j] = output_token(a, row, n, j);
  }
  return out;
}

#ifndef MTPKERN_CPU_ONLY
static VerifyOut verify_cuda(const VerifyArgs& a, const at::Tensor& tree_tokens, const at::Tensor& paths) {
  const c10::cuda::CUDAGuard guard(paths.device());
  auto out = empty_outputs(tree_tokens, paths);
  auto& [accept_len, best_path, last_node, tokens] = out;
  const int64_t B = tree_tokens.dim() == 1 ? 1 : tree_tokens.size(0);
  C10_CUDA_CHECK(launch_verify(a, B, paths.data_ptr<int64_t>(), paths.size(0), paths.size(1),
                               accept_len.data_ptr<int64_t>(), best_path.data_ptr<int64_t>(),
                               last_node.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
                               c10::cuda::getCurrentCUDAStream()));
  return out;
}
#endif

static VerifyArgs greedy_args(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths) {
  check_verify(tree_tokens, target_argmax, paths, "verify_greedy");
  return {tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), nullptr, nullptr, tree_tokens.size(-1),
          0.f, 0.f, false};
}

static VerifyArgs typical_args(const at::Tensor& tree_tokens, const at::Tensor& target_argmax,
                               const at::Tensor& node_prob, const at::Tensor& parent_entropy, const at::Tensor& paths,
                               double epsilon, double alpha) {
  check_verify(tree_tokens, target_argmax, paths, "verify_typical");
  check_verify_typical(tree_tokens, node_prob, parent_entropy, epsilon, alpha);
  return {tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), node_prob.data_ptr<float>(),
          parent_entropy.data_ptr<float>(), tree_tokens.size(-1), static_cast<float>(epsilon),
          static_cast<float>(alpha), true};
}

VerifyOut verify_greedy_cpu(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths) {
  return verify_cpu(greedy_args(tree_tokens, target_argmax, paths), tree_tokens, paths);
}

#ifndef MTPKERN_CPU_ONLY
VerifyOut verify_greedy_cuda(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths) {
  return verify_cuda(greedy_args(tree_tokens, target_argmax, paths), tree_tokens, paths);
}
#endif

VerifyOut verify_typical_cpu(const at::Tensor& tree_tokens, const at::Tensor& target_argmax,
                             const at::Tensor& node_prob, const at::Tensor& parent_entropy, const at::Tensor& paths,
                             double epsilon, double alpha) {
  return verify_cpu(typical_args(tree_tokens, target_argmax, node_prob, parent_entropy, paths, epsilon, alpha),
                    tree_tokens, paths);
}

#ifndef MTPKERN_CPU_ONLY
VerifyOut verify_typical_cuda(const at::Tensor& tree_tokens, const at::Tensor& target_argmax,
                              const at::Tensor& node_prob, const at::Tensor& parent_entropy, const at::Tensor& paths,
                              double epsilon, double alpha) {
  return verify_cuda(typical_args(tree_tokens, target_argmax, node_prob, parent_entropy, paths, epsilon, alpha),
                     tree_tokens, paths);
}
#endif

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) {
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_typical", &verify_typical_cpu);
}

#ifndef MTPKERN_CPU_ONLY
TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) {
  m.impl("verify_greedy", &verify_greedy_cuda);
  m.impl("verify_typical", &verify_typical_cuda);
}
#endif

}  // namespace mtpkern
