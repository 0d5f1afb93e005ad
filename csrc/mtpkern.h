// Shared by the CPU (.cpp) and CUDA (.cu) kernels of mtpkern: the input checks at the C++
// boundary, and the per-row logic written once as host+device functions, so the CPU kernels
// that CI runs exercise the same checks and the same arithmetic as the GPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MTPKERN_HD __host__ __device__ __forceinline__
#else
#define MTPKERN_HD inline
#endif

namespace mtpkern {

constexpr int64_t kMaxTreeNodes = 4096;  // one thread block handles a whole tree
constexpr int64_t kMaxCompactPath = 1024;  // the compaction kernel stages the whole path in shared memory

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

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but the other inputs are on ",
              a.device());
}

inline void check_tree_buffers(const at::Tensor& parents, int64_t max_depth) {
  check_vector(parents, "tree_buffers", "parents", at::kLong);
  const int64_t T = parents.size(0);
  TORCH_CHECK_VALUE(T >= 1 && T <= kMaxTreeNodes, "tree_buffers: a tree has 1..", kMaxTreeNodes, " nodes, got ", T);
  TORCH_CHECK_VALUE(max_depth >= 0 && max_depth < kMaxTreeNodes, "tree_buffers: max_depth must be in [0, ",
                    kMaxTreeNodes, "), got ", max_depth);
}

inline void check_verify(const at::Tensor& tree_tokens, const at::Tensor& target_argmax, const at::Tensor& paths,
                         const char* op) {
  check_vector(tree_tokens, op, "tree_tokens", at::kLong);
  check_vector(target_argmax, op, "target_argmax", at::kLong);
  const int64_t T = tree_tokens.size(0);
  TORCH_CHECK_VALUE(T >= 1, op, ": the tree has no nodes");
  TORCH_CHECK_VALUE(target_argmax.size(0) == T, op, ": target_argmax has ", target_argmax.size(0),
                    " entries but tree_tokens has ", T);
  TORCH_CHECK_VALUE(paths.dim() == 2, op, ": paths must be 2-D [P, max_depth + 1], got shape ", paths.sizes());
  TORCH_CHECK_TYPE(paths.scalar_type() == at::kLong, op, ": paths must be int64, got ",
                   dtype_name(paths.scalar_type()));
  TORCH_CHECK_VALUE(paths.is_contiguous(), op, ": paths must be contiguous");
  TORCH_CHECK_VALUE(paths.size(0) >= 1 && paths.size(1) >= 1, op, ": paths must have at least one row and column, got ",
                    paths.sizes());
  TORCH_CHECK_VALUE(paths.size(0) < (int64_t(1) << 31), op, ": too many paths");
  check_same_device(tree_tokens, target_argmax, op, "target_argmax");
  check_same_device(tree_tokens, paths, op, "paths");
}

inline void check_verify_typical(const at::Tensor& tree_tokens, const at::Tensor& node_prob,
                                 const at::Tensor& parent_entropy) {
  const char* op = "verify_typical";
  check_vector(node_prob, op, "node_prob", at::kFloat);
  check_vector(parent_entropy, op, "parent_entropy", at::kFloat);
  TORCH_CHECK_VALUE(node_prob.size(0) == tree_tokens.size(0) && parent_entropy.size(0) == tree_tokens.size(0), op,
                    ": node_prob and parent_entropy need one entry per node (", tree_tokens.size(0), ")");
  check_same_device(tree_tokens, node_prob, op, "node_prob");
  check_same_device(tree_tokens, parent_entropy, op, "parent_entropy");
}

inline void check_scalar_index(const at::Tensor& cache, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 0, "kv_compact_: ", name, " must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "kv_compact_: ", name,
                   " must be int64 or int32, got ", dtype_name(t.scalar_type()));
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
  check_vector(path, "kv_compact_", "path", at::kLong);
  TORCH_CHECK_VALUE(path.size(0) <= kMaxCompactPath, "kv_compact_: path has ", path.size(0), " entries, at most ",
                    kMaxCompactPath, " are supported");
  check_same_device(k, path, "kv_compact_", "path");
  check_scalar_index(k, prefix_len, "prefix_len");
  check_scalar_index(k, count, "count");
}

// ---------------------------------------------------------------- tree buffers

// Depth of node i, or -1 when the chain i -> parent -> ... -> 0 is not a valid tree path
// (a parent outside [0, node), root parent != -1, or deeper than max_depth). Parents point
// strictly backwards, so the walk takes at most min(i, max_depth + 1) steps on any input.
MTPKERN_HD int64_t node_depth(const int64_t* parents, int64_t i, int64_t max_depth) {
  int64_t depth = 0;
  for (int64_t node = i; node != 0;) {
    const int64_t p = parents[node];
    if (p < 0 || p >= node || ++depth > max_depth) return -1;
    node = p;
  }
  return parents[0] == -1 ? depth : -1;
}

// Row i of the buffers: its depth, its packed ancestor-mask row (W words) and its retrieve row
// (max_depth + 1 entries, the path root..i then -1). Invalid nodes get depth -1, an empty mask
// row and an all -1 retrieve row. Returns the depth.
MTPKERN_HD int64_t tree_row(const int64_t* parents, int64_t max_depth, int64_t i, int32_t* mask_row, int64_t W,
                            int64_t* retrieve_row) {
  const int64_t d = node_depth(parents, i, max_depth);
  for (int64_t w = 0; w < W; ++w) mask_row[w] = 0;
  for (int64_t c = 0; c <= max_depth; ++c) retrieve_row[c] = -1;
  int64_t node = i;
  for (int64_t c = d; c >= 0; --c) {  // no iterations when d == -1
    retrieve_row[c] = node;
    mask_row[node >> 5] |= static_cast<int32_t>(1u << (node & 31));
    node = parents[node];
  }
  return d;
}

// ---------------------------------------------------------------- verification

struct VerifyArgs {
  const int64_t* tree_tokens;
  const int64_t* target_argmax;
  const float* node_prob;       // typical acceptance only
  const float* parent_entropy;  // typical acceptance only
  int64_t T;
  float epsilon, alpha;
  bool typical;
};

// Whether the draft at `node`, child of `parent` on a path, is accepted. Indices outside
// [0, T) (padding or bad input) are never dereferenced: such a draft is simply rejected.
MTPKERN_HD bool draft_accepted(const VerifyArgs& a, int64_t parent, int64_t node) {
  if (parent < 0 || parent >= a.T || node < 0 || node >= a.T) return false;
  if (a.typical) return a.node_prob[node] > fminf(a.epsilon, a.alpha * expf(-a.parent_entropy[node]));
  return a.tree_tokens[node] == a.target_argmax[parent];
}

// Number of leading drafts accepted along one path row of Dp1 entries (column 0 = root).
MTPKERN_HD int64_t accept_length(const VerifyArgs& a, const int64_t* row, int64_t Dp1) {
  int64_t n = 0;
  while (n + 1 < Dp1 && draft_accepted(a, row[n], row[n + 1])) ++n;
  return n;
}

// The best row wins on accept length, ties going to the smaller row index: maximise this key.
MTPKERN_HD uint64_t best_key(int64_t n, int64_t p) {
  return (static_cast<uint64_t>(n) << 32) | (0xffffffffull - static_cast<uint64_t>(p));
}
MTPKERN_HD int64_t key_row(uint64_t key) { return static_cast<int64_t>(0xffffffffull - (key & 0xffffffffull)); }
MTPKERN_HD int64_t key_length(uint64_t key) { return static_cast<int64_t>(key >> 32); }

// Entry j of the output tokens for chosen row `row` with n accepted drafts: the drafts, then
// the bonus token (the target's argmax at the last accepted node), then -1.
MTPKERN_HD int64_t output_token(const VerifyArgs& a, const int64_t* row, int64_t n, int64_t j) {
  if (j < n) return a.tree_tokens[row[j + 1]];  // accepted, hence in range
  if (j > n) return -1;
  const int64_t last = row[n];
  return (last >= 0 && last < a.T) ? a.target_argmax[last] : -1;
}

// ---------------------------------------------------------------- KV compaction

// Whether path entry i (node index `node`) names a move from and to slots inside the cache.
MTPKERN_HD bool move_in_range(int64_t node, int64_t i, int64_t prefix, int64_t S) {
  const int64_t src = prefix + node, dst = prefix + i;
  return node >= 0 && src >= 0 && src < S && dst >= 0 && dst < S;
}

MTPKERN_HD int64_t load_index(const void* p, bool is64) {
  return is64 ? *static_cast<const int64_t*>(p) : static_cast<int64_t>(*static_cast<const int32_t*>(p));
}

}  // namespace mtpkern
