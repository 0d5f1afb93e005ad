// mtpkern::accept_greedy: a greedy speculative step's whole verification on the CPU in one call
// (head 0's logits over the tree's nodes, their argmax, the best path, the step's output), where
// eager PyTorch spends a dozen small ops (and their dispatch, which is most of their cost at the
// shapes of a decode step). The CUDA side of the op is its eager reference (mtpkern/ops/verify.py):
// on a GPU the step is one CUDA graph anyway.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "mtpkern.h"

namespace mtpkern {

using AcceptOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argmax of one row of V logits; -1 when the row holds a NaN (the ops' NaN contract). Ties go to
// the first maximum, as torch.max does.
static int64_t row_argmax(const float* z, int64_t V) {
  int64_t best = 0;
  float top = -std::numeric_limits<float>::infinity();
  bool seen = false;
  for (int64_t v = 0; v < V; ++v) {
    const float x = z[v];
    if (std::isnan(x)) return -1;
    if (!seen || x > top) {
      top = x;
      best = v;
      seen = true;
    }
  }
  return best;
}

AcceptOut accept_greedy_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& tree_tokens,
                            const at::Tensor& paths) {
  check_accept_greedy(hidden, weight, tree_tokens, paths);
  const int64_t T = hidden.size(0), V = weight.size(0), P = paths.size(0), Dp1 = paths.size(1);
  // Head 0's logits in float32: [T, V], multiplied in the layout of the weight given
  // (mtpkern/cpu_matmul.py): as stored ([V, D], rows contiguous) as (weight @ hidden^T)^T, a
  // transposed view of a [D, V] copy as hidden @ copy.
  const at::Tensor w = weight.to(at::kFloat), h = hidden.to(at::kFloat);
  const at::Tensor z = (w.is_contiguous() ? at::mm(w, h.t()).t() : at::mm(h, w.t())).contiguous();
  std::vector<int64_t> target(T);
  const float* zp = z.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) target[t] = row_argmax(zp + t * V, V);

  const VerifyArgs a{tree_tokens.data_ptr<int64_t>(), target.data(), nullptr, nullptr, T, 0.f, 0.f, false};
  const int64_t* rows = paths.data_ptr<int64_t>();
  uint64_t best = 0;
  for (int64_t p = 0; p < P; ++p) best = std::max(best, best_key(accept_length(a, rows + p * Dp1, Dp1), p));
  const int64_t b = key_row(best), n = key_length(best);
  const int64_t* row = rows + b * Dp1;

  const auto opts = paths.options();
  at::Tensor out = at::empty({1 + Dp1}, opts), root = at::empty({1}, opts);
  at::Tensor last_node = at::empty({}, opts), best_path = at::empty({}, opts);
  int64_t* o = out.data_ptr<int64_t>();
  o[0] = n + 1;
  for (int64_t j = 0; j < Dp1; ++j) o[1 + j] = output_token(a, row, n, j);
  root.data_ptr<int64_t>()[0] = o[1 + n];
  last_node.data_ptr<int64_t>()[0] = row[n];
  best_path.data_ptr<int64_t>()[0] = b;
  return {out, root, last_node, best_path};
}

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) { m.impl("accept_greedy", &accept_greedy_cpu); }

}  // namespace mtpkern
