// The input checks at the C++ boundary, shared by the CPU and CUDA entry points of every op
// (csrc/<op>_api.cpp), so the CPU kernels that CI runs exercise the GPU path's checks too.
// mtpkern/ops/_checks.py and the ops' eager references run the same checks in the same order,
// with the same exception types (TORCH_CHECK_TYPE -> TypeError for dtypes, TORCH_CHECK_VALUE ->
// ValueError for everything else) and messages: keep the two in step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <string>
#include <utility>

#include "kernels.h"

namespace mtpkern {

// ---------------------------------------------------------------- input checks (host only)

// dtype names as Python spells them (torch.int64, not Long), so messages match the Python side.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline void check_vector(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// [T] or [B, T] (one row per sequence of a batch), of `dtype`, contiguous.
inline void check_rows(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 || t.dim() == 2, op, ": ", name, " must be 1-D [T] or 2-D [B, T], got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but the other inputs are on ",
              a.device());
}

inline void check_tree_buffers(const at::Tensor& parents, int64_t max_depth) {
  check_vector(parents, "tree_buffers", "parents", at::kLong);
  const int64_t T = parents.size(0);
  TORCH_CHECK_VALUE(T >= 1 && T <= kMaxTreeNodes, "tree_buffers: a tree has 1..", kMaxTreeNodes, " nodes, got ", T);
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth < kMaxTreeNodes, "tree_buffers: max_depth must be in [0, ",
                    kMaxTreeNodes, "), got ", max_depth);
}

inline void check_float_matrix(const at::Tensor& t, const char* op, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dtype_name(dt));
}

inline void check_paths(const at::Tensor& paths, const char* op) {
  TORCH_CHECK_VALUE(paths.dim() == 2, op, ": paths must be 2-D [P, max_depth + 1], got shape ", paths.sizes());
  TORCH_CHECK_TYPE(paths.scalar_type() == at::kLong, op, ": paths must be int64, got ",
                   dtype_name(paths.scalar_type()));
  TORCH_CHECK_VALUE(paths.is_contiguous(), op, ": paths must be contiguous");
  TORCH_CHECK_VALUE(paths.size(0) >= 1 && paths.size(1) >= 1, op, ": paths must have at least one row and column, got ",
                    paths.sizes());
  TORCH_CHECK_VALUE(paths.size(0) < (int64_t(1) << 31), op, ": too many paths");
}

inline void check_verify(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths,
                         const char* op) {
  check_rows(tree_tokens, op, "tree_tokens", at::kLong);
  check_rows(target_argmax, op, "target_argmax", at::kLong);
  const int64_t T = tree_tokens.size(-1);
  TORCH_CHECK_VALUE(T >= 1, op, ": the tree has no nodes");
  TORCH_CHECK_VALUE(tree_tokens.size(0) >= 1, op, ": the batch is empty (tree_tokens ", tree_tokens.sizes(), ")");
  if (tree_tokens.dim() == 1 && target_argmax.dim() == 1) {
    TORCH_CHECK_VALUE(target_argmax.size(0) == T, op, ": target_argmax has ", target_argmax.size(0),
                      " entries but tree_tokens has ", T);
  } else {
    TORCH_CHECK_VALUE(target_argmax.sizes() == tree_tokens.sizes(), op, ": target_argmax has shape ",
                      target_argmax.sizes(), " but tree_tokens has shape ", tree_tokens.sizes());
  }
  check_paths(paths, op);
  check_same_device(tree_tokens, target_argmax, op, "target_argmax");
  check_same_device(tree_tokens, paths, op, "paths");
}

// accept_greedy: hidden [T, D] and weight [V, D] (any strides), one tree's tokens [T], paths.
inline void check_accept_greedy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& tree_tokens,
                                const at::Tensor& paths) {
  const char* op = "accept_greedy";
  check_float_matrix(hidden, op, "hidden", "[T, D]");
  check_float_matrix(weight, op, "weight", "[V, D]");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), op, ": weight has ", weight.size(1),
                    " columns but hidden has D = ", hidden.size(1));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, op, ": weight has no rows (an empty vocabulary)");
  check_vector(tree_tokens, op, "tree_tokens", at::kLong);
  TORCH_CHECK_VALUE(tree_tokens.size(0) >= 1, op, ": the tree has no nodes");
  TORCH_CHECK_VALUE(tree_tokens.size(0) == hidden.size(0), op, ": tree_tokens has ", tree_tokens.size(0),
                    " entries but hidden has ", hidden.size(0), " rows");
  check_paths(paths, op);
  check_same_device(hidden, weight, op, "weight");
  check_same_device(hidden, tree_tokens, op, "tree_tokens");
  check_same_device(hidden, paths, op, "paths");
}

// A finite number >= 0. NaN prints without a sign, as Python's "%g" prints it.
inline void check_nonnegative_finite(double v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, op, ": ", name, " must be finite and non-negative, got ",
                    std::isnan(v) ? std::string("nan") : c10::str(v));
}

inline void check_verify_typical(const at::Tensor& tree_tokens, const at::Tensor& node_prob,
                                 const at::Tensor& parent_entropy, double epsilon, double alpha) {
  const char* op = "verify_typical";
  check_rows(node_prob, op, "node_prob", at::kFloat);
  check_rows(parent_entropy, op, "parent_entropy", at::kFloat);
  TORCH_CHECK_VALUE(node_prob.sizes() == tree_tokens.sizes() && parent_entropy.sizes() == tree_tokens.sizes(), op,
                    ": node_prob and parent_entropy need one entry per node, tree_tokens' shape ", tree_tokens.sizes());
  check_same_device(tree_tokens, node_prob, op, "node_prob");
  check_same_device(tree_tokens, parent_entropy, op, "parent_entropy");
  check_nonnegative_finite(epsilon, op, "epsilon");
  check_nonnegative_finite(alpha, op, "alpha");
}

// verify_rejection: tree_tokens [T] / [B, T]; target_probs [(B,) T, V] and draft_probs [(B,) Q, V]
// of one float dtype; draft_row and parents [T]; uniforms like tree_tokens; 0 <= max_depth < 4096.
inline void check_verify_rejection(const at::Tensor& tree_tokens, const at::Tensor& target_probs,
                                   const at::Tensor& draft_probs, const at::Tensor& draft_row, const at::Tensor& parents,
                                   const at::Tensor& uniforms, int64_t max_depth) {
  const char* op = "verify_rejection";
  check_rows(tree_tokens, op, "tree_tokens", at::kLong);
  const int64_t T = tree_tokens.size(-1);
  const bool batch = tree_tokens.dim() == 2;
  TORCH_CHECK_VALUE(T >= 1 && (!batch || tree_tokens.size(0) >= 1), op,
                    ": the tree has no nodes or the batch is empty (tree_tokens ", tree_tokens.sizes(), ")");
  const std::string dims = batch ? c10::str("[", tree_tokens.size(0), ", N, V]") : std::string("[N, V]");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{target_probs, "target_probs"},
                                std::pair<const at::Tensor&, const char*>{draft_probs, "draft_probs"}}) {
    TORCH_CHECK_VALUE(t.dim() == tree_tokens.dim() + 1 && (!batch || t.size(0) == tree_tokens.size(0)), op, ": ",
                      name, " must have shape ", dims, " (tree_tokens has shape ", tree_tokens.sizes(), "), got ",
                      t.sizes());
    const auto dt = t.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                     " must be float32, float16 or bfloat16, got ", dtype_name(dt));
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK_TYPE(draft_probs.scalar_type() == target_probs.scalar_type(), op, ": draft_probs is ",
                   dtype_name(draft_probs.scalar_type()), " but target_probs is ",
                   dtype_name(target_probs.scalar_type()));
  const int64_t V = target_probs.size(-1);
  TORCH_CHECK_VALUE(target_probs.size(-2) == T && V >= 1, op, ": target_probs needs ", T,
                    " rows of V >= 1, got shape ", target_probs.sizes());
  TORCH_CHECK_VALUE(V < kMaxRejectionVocab, op, ": a vocabulary of ", V, " is too large (at most ",
                    kMaxRejectionVocab - 1, ")");
  TORCH_CHECK_VALUE(draft_probs.size(-1) == V && draft_probs.size(-2) >= 1, op, ": draft_probs must have rows of V = ",
                    V, ", got ", draft_probs.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{draft_row, "draft_row"},
                                std::pair<const at::Tensor&, const char*>{parents, "parents"}}) {
    check_vector(t, op, name, at::kLong);
    TORCH_CHECK_VALUE(t.size(0) == T, op, ": ", name, " has ", t.size(0), " entries but the tree has ", T, " nodes");
  }
  check_rows(uniforms, op, "uniforms", at::kFloat);
  TORCH_CHECK_VALUE(uniforms.sizes() == tree_tokens.sizes(), op, ": uniforms has shape ", uniforms.sizes(),
                    " but tree_tokens has ", tree_tokens.sizes());
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth < kMaxTreeNodes, op, ": max_depth must be an int in [0, ",
                    kMaxTreeNodes, "), got ", max_depth);
  check_same_device(tree_tokens, target_probs, op, "target_probs");
  check_same_device(tree_tokens, draft_probs, op, "draft_probs");
  check_same_device(tree_tokens, draft_row, op, "draft_row");
  check_same_device(tree_tokens, parents, op, "parents");
  check_same_device(tree_tokens, uniforms, op, "uniforms");
}

inline void check_scalar_index(const at::Tensor& cache, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 0, "kv_compact_: ", name, " must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "kv_compact_: ", name,
                   " must be int64 or int32, got ", dtype_name(t.scalar_type()));
  check_same_device(cache, t, "kv_compact_", name);
}

// One index per batch row: [B] int64 or int32, contiguous.
inline void check_row_index(const at::Tensor& cache, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == cache.size(1), "kv_compact_: with a path per batch row, ", name,
                    " must be 1-D [", cache.size(1), "], got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "kv_compact_: ", name,
                   " must be int64 or int32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_contiguous(), "kv_compact_: ", name, " must be contiguous");
  check_same_device(cache, t, "kv_compact_", name);
}

inline void check_kv_compact(const at::Tensor& k, const at::Tensor& v, const at::Tensor& path,
                             const at::Tensor& prefix_len, const at::Tensor& count) {
  TORCH_CHECK_VALUE(k.dim() == 5, "kv_compact_: k_cache must be 5-D [L, B, H, S, Dh], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "kv_compact_: v_cache has shape ", v.sizes(), " but k_cache has ",
                    k.sizes());
  const auto dt = k.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "kv_compact_: caches must be float32, float16 or bfloat16, got ", dtype_name(dt));
  TORCH_CHECK_TYPE(v.scalar_type() == dt, "kv_compact_: v_cache is ", dtype_name(v.scalar_type()), " but k_cache is ",
                   dtype_name(dt));
  TORCH_CHECK_VALUE(k.is_contiguous() && v.is_contiguous(), "kv_compact_: k_cache and v_cache must be contiguous");
  check_same_device(k, v, "kv_compact_", "v_cache");
  // One buffer passed twice would be compacted twice, and raced on by the K and V blocks.
  TORCH_CHECK_VALUE(k.numel() == 0 || k.data_ptr() != v.data_ptr(), "kv_compact_: k_cache and v_cache must be "
                    "different tensors");
  check_rows(path, "kv_compact_", "path", at::kLong);
  TORCH_CHECK_VALUE(path.size(-1) <= kMaxCompactPath, "kv_compact_: path has ", path.size(-1), " entries, at most ",
                    kMaxCompactPath, " are supported");
  check_same_device(k, path, "kv_compact_", "path");
  if (path.dim() == 1) {  // one path for every batch row
    check_scalar_index(k, prefix_len, "prefix_len");
    check_scalar_index(k, count, "count");
  } else {  // a path, prefix length and count per batch row
    TORCH_CHECK_VALUE(path.size(0) == k.size(1), "kv_compact_: path has ", path.size(0),
                      " rows but the caches have ", k.size(1), " batch rows");
    check_row_index(k, prefix_len, "prefix_len");
    check_row_index(k, count, "count");
  }
  TORCH_CHECK_VALUE(k.size(0) * k.size(1) * k.size(2) <= INT32_MAX && k.size(4) * k.element_size() <= 2 * 65535,
                    "kv_compact_: cache shape ", k.sizes(), " is too large for one launch");
}

}  // namespace mtpkern
