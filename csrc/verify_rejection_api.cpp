// mtpkern::verify_rejection: recursive rejection sampling of a sampled tree (the scheme:
// mtpkern/ops/verify_sampled.py). The CPU kernel and the CUDA entry point (kernel:
// cuda/verify_rejection.cu); both walk a row with the arithmetic of kernels.h, on integer
// weights, so they and the eager reference give identical results for the same uniforms.
#include <ATen/ops/empty.h>
#ifndef MTPKERN_CPU_ONLY  // CPU-only builds (setup.py's CppExtension fallback) leave out the CUDA side
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <utility>
#include <vector>

#include "mtpkern.h"

namespace mtpkern {

using RejectionOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

static int prob_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? kProbF32 : t.scalar_type() == at::kHalf ? kProbF16 : kProbBF16;
}

static RejectionArgs rejection_args(const at::Tensor& tree_tokens, const at::Tensor& target_probs,
                                    const at::Tensor& draft_probs, const at::Tensor& draft_row,
                                    const at::Tensor& parents, const at::Tensor& uniforms, int64_t max_depth) {
  check_verify_rejection(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth);
  return {tree_tokens.data_ptr<int64_t>(), target_probs.data_ptr(), draft_probs.data_ptr(),
          draft_row.data_ptr<int64_t>(), parents.data_ptr<int64_t>(), uniforms.data_ptr<float>(),
          tree_tokens.size(-1), draft_probs.size(-2), target_probs.size(-1), max_depth, prob_type(target_probs)};
}

// 0-d / [max_depth + 1] outputs for a 1-D tree, [B] / [B, max_depth + 1] for a batch.
static RejectionOut empty_outputs(const at::Tensor& tree_tokens, int64_t max_depth) {
  const auto opts = tree_tokens.options();
  std::vector<int64_t> lead(tree_tokens.sizes().begin(), tree_tokens.sizes().end() - 1), rows = lead;
  rows.push_back(max_depth + 1);
  return {at::empty(lead, opts), at::empty(lead, opts), at::empty(rows, opts), at::empty(rows, opts),
          at::empty(lead, opts)};
}

// W[y] = the weight of row[y]; returns the row's mass, 0 when any entry is invalid (outside
// [0, 1], NaN: W is then partly written and must not be read). One loop per dtype.
template <typename Load>
static int64_t fill_weights(Load load, int64_t V, int64_t* W) {
  int64_t z = 0;
  for (int64_t y = 0; y < V; ++y) {
    W[y] = prob_weight(load(y));
    if (W[y] < 0) return 0;
    z += W[y];
  }
  return z;
}

static int64_t row_weights(const void* row, int type, int64_t V, int64_t* W) {
  if (type == kProbF32) return fill_weights([row](int64_t y) { return static_cast<const float*>(row)[y]; }, V, W);
  if (type == kProbF16) return fill_weights([row](int64_t y) { return load_prob(row, kProbF16, y); }, V, W);
  return fill_weights([row](int64_t y) { return load_prob(row, kProbBF16, y); }, V, W);
}

// The weights of one row's walk: the residual R (double-buffered with next_R) and the cached
// draft row's weights Wq.
struct RowScratch {
  std::vector<int64_t> R, next_R, Wq;
  explicit RowScratch(int64_t V) : R(V), next_R(V), Wq(V) {}
};

// One row's walk: path[0..n] and tokens[0..n] (n accepted drafts, then the drawn token); the
// rest of both stay -1. Returns n.
static int64_t rejection_row(const RejectionArgs& a, int64_t b, int64_t* path, int64_t* tokens, RowScratch& s) {
  const int64_t T = a.T, V = a.V;
  const int type = a.prob_type;
  const int64_t* tok = a.tree_tokens + b * T;
  const float* u = a.uniforms + b * T;
  for (int64_t j = 0; j <= a.max_depth; ++j) path[j] = tokens[j] = -1;
  path[0] = 0;
  int64_t cur = 0, n = 0;
  int64_t Z = row_weights(prob_row(a.target_probs, type, b * T, V), type, V, s.R.data());  // r = R / Z
  int64_t cached_row = -1, S = 0;  // S: the mass of draft row cached_row, whose weights are s.Wq
  while (n < a.max_depth && Z > 0) {
    int64_t accepted = -1, removed = 0;  // removed: the proposal mass of the rejected siblings
    for (int64_t c = next_child(a.parents, T, cur, cur); c < T; c = next_child(a.parents, T, cur, c)) {
      const int64_t x = tok[c], row = a.draft_row[c];
      if (x < 0 || x >= V || row < 0 || row >= a.Q) continue;  // never proposed
      if (row != cached_row) {
        S = row_weights(prob_row(a.draft_probs, type, b * a.Q + row, V), type, V, s.Wq.data());
        cached_row = row;
      }
      if (S <= 0 || s.Wq[x] <= 0) continue;  // an invalid row, or beyond q's support: never proposed
      const int64_t qx = s.Wq[x], M = S - removed > qx ? S - removed : qx;
      if (rejection_accepts(u[c], qx, M, s.R[x], Z)) {
        accepted = c;
        break;
      }
      int64_t Z_next = 0;
      for (int64_t y = 0; y < V; ++y) {
        s.next_R[y] = residual_weight(s.R[y], Z, s.Wq[y], M);
        Z_next += s.next_R[y];
      }
      if (Z_next > 0) {  // else r == q_i up to rounding: the rejection had probability ~0
        std::swap(s.R, s.next_R);
        Z = Z_next;
      }
      removed += qx;
    }
    if (accepted < 0) break;
    tokens[n] = tok[accepted];
    cur = accepted;
    path[++n] = cur;
    Z = row_weights(prob_row(a.target_probs, type, b * T + cur, V), type, V, s.R.data());
  }
  if (Z > 0) {
    const int64_t th = draw_threshold(u[0], Z);
    int64_t acc = 0;
    for (int64_t y = 0; y < V; ++y) {
      acc += s.R[y];
      if (acc > th) {
        tokens[n] = y;
        break;
      }
    }
  }
  return n;
}

RejectionOut verify_rejection_cpu(const at::Tensor& tree_tokens, const at::Tensor& target_probs,
                                  const at::Tensor& draft_probs, const at::Tensor& draft_row, const at::Tensor& parents,
                                  const at::Tensor& uniforms, int64_t max_depth) {
  const RejectionArgs a =
      rejection_args(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth);
  auto out = empty_outputs(tree_tokens, max_depth);
  auto& [accept_len, last_node, path, tokens, n_emitted] = out;
  const int64_t B = tree_tokens.dim() == 1 ? 1 : tree_tokens.size(0), D1 = max_depth + 1;
  RowScratch scratch(a.V);
  for (int64_t b = 0; b < B; ++b) {
    int64_t* row_path = path.data_ptr<int64_t>() + b * D1;
    const int64_t n = rejection_row(a, b, row_path, tokens.data_ptr<int64_t>() + b * D1, scratch);
    accept_len.data_ptr<int64_t>()[b] = n;
    last_node.data_ptr<int64_t>()[b] = row_path[n];
    n_emitted.data_ptr<int64_t>()[b] = n + 1;
  }
  return out;
}

#ifndef MTPKERN_CPU_ONLY
RejectionOut verify_rejection_cuda(const at::Tensor& tree_tokens, const at::Tensor& target_probs,
                                   const at::Tensor& draft_probs, const at::Tensor& draft_row,
                                   const at::Tensor& parents, const at::Tensor& uniforms, int64_t max_depth) {
  const RejectionArgs a =
      rejection_args(tree_tokens, target_probs, draft_probs, draft_row, parents, uniforms, max_depth);
  const c10::cuda::CUDAGuard guard(tree_tokens.device());
  auto out = empty_outputs(tree_tokens, max_depth);
  auto& [accept_len, last_node, path, tokens, n_emitted] = out;
  const int64_t B = tree_tokens.dim() == 1 ? 1 : tree_tokens.size(0);
  at::Tensor scratch = at::empty({2 * B * a.V}, tree_tokens.options());  // the residual's double buffer
  C10_CUDA_CHECK(launch_verify_rejection(a, B, accept_len.data_ptr<int64_t>(), last_node.data_ptr<int64_t>(),
                                         path.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
                                         n_emitted.data_ptr<int64_t>(), scratch.data_ptr<int64_t>(),
                                         c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(mtpkern, CUDA, m) { m.impl("verify_rejection", &verify_rejection_cuda); }
#endif  // MTPKERN_CPU_ONLY

TORCH_LIBRARY_IMPL(mtpkern, CPU, m) { m.impl("verify_rejection", &verify_rejection_cpu); }

}  // namespace mtpkern
