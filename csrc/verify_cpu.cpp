// CPU kernels of mtpkern::verify_greedy / verify_typical (same logic as csrc/cuda/verify.cu).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "mtpkern.h"

namespace mtpkern {

using VerifyOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

static VerifyOut verify_cpu(const VerifyArgs& a, const at::Tensor& paths) {
  const int64_t P = paths.size(0), Dp1 = paths.size(1);
  const int64_t* rows = paths.data_ptr<int64_t>();
  uint64_t best = 0;
  for (int64_t p = 0; p < P; ++p) best = std::max(best, best_key(accept_length(a, rows + p * Dp1, Dp1), p));
  const int64_t b = key_row(best), n = key_length(best);
  const int64_t* row = rows + b * Dp1;

  const auto opts = paths.options();
  at::Tensor tokens = at::empty({Dp1}, opts);
  for (int64_t j = 0; j < Dp1; ++j) tokens.data_ptr<int64_t>()[j] = output_token(a, row, n, j);
  auto scalar = [&](int64_t x) {
    at::Tensor t = at::empty({}, opts);
    *t.data_ptr<int64_t>() = x;
    return t;
  };
  return {scalar(n), scalar(b), scalar(row[n]), tokens};
}

VerifyOut verify_greedy_cpu(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths) {
  check_verify(tree_tokens, target_argmax, paths, "verify_greedy");
  const VerifyArgs a{tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), nullptr, nullptr,
                     tree_tokens.size(0), 0.f, 0.f, false};
  return verify_cpu(a, paths);
}

VerifyOut verify_typical_cpu(const at::Tensor& tree_tokens, const at::Tensor& target_argmax,
                             const at::Tensor& node_prob, const at::Tensor& parent_entropy, const at::Tensor& paths,
                             double epsilon, double alpha) {
  check_verify(tree_tokens, target_argmax, paths, "verify_typical");
  check_verify_typical(tree_tokens, node_prob, parent_entropy);
  const VerifyArgs a{tree_tokens.data_ptr<int64_t>(), target_argmax.data_ptr<int64_t>(), node_prob.data_ptr<float>(),
                     parent_entropy.data_ptr<float>(), tree_tokens.size(0), static_cast<float>(epsilon),
                     static_cast<float>(alpha), true};
  return verify_cpu(a, paths);
}

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) {
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_typical", &verify_typical_cpu);
}

}  // namespace mtpkern
