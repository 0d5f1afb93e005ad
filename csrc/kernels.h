// The arithmetic of mtpkern's kernels, written once as host+device functions, so the CPU
// kernels that CI runs execute the same logic as the GPU kernels; and the raw-pointer launchers
// of csrc/cuda/*.cu. Torch-free on purpose: nvcc parses a .cu file once per GPU architecture,
// so the .cu files include only this header and stay quick to build.
#pragma once

#ifndef MTPKERN_CPU_ONLY  // CPU-only builds (setup.py's CppExtension fallback) leave out the CUDA side
#include <cuda_runtime_api.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MTPKERN_HD __host__ __device__ __forceinline__
#else
#define MTPKERN_HD inline
#endif

namespace mtpkern {

constexpr int64_t kMaxTreeNodes = 4096;    // one thread block handles a whole tree
constexpr int64_t kMaxCompactPath = 1024;  // the compaction kernel stages the whole path in shared memory

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
// A NaN never accepts: fminf would drop a NaN threshold (NaN entropy), so it is tested first.
MTPKERN_HD bool draft_accepted(const VerifyArgs& a, int64_t parent, int64_t node) {
  if (parent < 0 || parent >= a.T || node < 0 || node >= a.T) return false;
  if (a.typical) {
    const float t = a.alpha * expf(-a.parent_entropy[node]);
    return t == t && a.node_prob[node] > fminf(a.epsilon, t);  // t == t: not NaN, on host and device
  }
  return a.tree_tokens[node] == a.target_argmax[parent];
}

// Row b of a batch of B trees stored [B, T]: the same arguments, offset to its nodes.
MTPKERN_HD VerifyArgs row_args(VerifyArgs a, int64_t b) {
  a.tree_tokens += b * a.T;
  a.target_argmax += b * a.T;
  if (a.typical) {
    a.node_prob += b * a.T;
    a.parent_entropy += b * a.T;
  }
  return a;
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

// Entry b of a 0-d / [B] int64-or-int32 index tensor.
MTPKERN_HD int64_t load_row_index(const void* p, bool is64, int64_t b) {
  return is64 ? static_cast<const int64_t*>(p)[b] : static_cast<int64_t>(static_cast<const int32_t*>(p)[b]);
}

// ---------------------------------------------------------------- rejection sampling (verify_rejection)

// Probabilities enter the walk as integer weights of 40 fractional bits, floor(p * 2^40),
// so that every sum over the vocabulary is exact whatever its order: the CPU loop, the CUDA
// block reduction and the eager reference's torch.sum agree bit for bit. Everything else is
// elementwise, in double, each product and quotient rounded once (no fused multiply-add: the
// device side spells its roundings out), so the three give identical results. V < 2^23 keeps
// every sum (at most V * 2^40) below 2^63.
constexpr double kProbScale = 1099511627776.0;  // 2^40
constexpr int64_t kMaxRejectionVocab = int64_t(1) << 23;

enum ProbType : int { kProbF32 = 0, kProbF16 = 1, kProbBF16 = 2 };

MTPKERN_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

MTPKERN_HD double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

MTPKERN_HD float float_from_bits(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// IEEE binary16 -> float, exactly (subnormals, inf and NaN included).
MTPKERN_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return float_from_bits(sign | 0x7f800000u | (mant << 13));
  return float_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

MTPKERN_HD float load_prob(const void* base, int type, int64_t i) {
  if (type == kProbF32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return type == kProbF16 ? half_to_float(h) : float_from_bits(static_cast<uint32_t>(h) << 16);
}

// Row `row` (of V entries) of a probability matrix of the given type.
MTPKERN_HD const void* prob_row(const void* base, int type, int64_t row, int64_t V) {
  return static_cast<const char*>(base) + row * V * (type == kProbF32 ? 4 : 2);
}

// A probability's weight floor(w * 2^40) (exact: a power-of-two scaling, then the conversion's
// truncation, which is floor for values >= 0); -1 for a value outside [0, 1] (NaN included),
// which makes its whole row invalid.
MTPKERN_HD int64_t prob_weight(float w) {
  if (!(w >= 0.f && w <= 1.f)) return -1;
  return static_cast<int64_t>(static_cast<double>(w) * kProbScale);
}

// Weight of y in max(0, r - q_i) with r = R / Z and q_i = Q / M (Z, M > 0), before the renormalising.
// The shortcuts give the same bits as the full expression (0 / Z = 0, then d <= 0; a - 0 = a)
// and skip the divisions outside a top-k / top-p support.
MTPKERN_HD int64_t residual_weight(int64_t R, int64_t Z, int64_t Q, int64_t M) {
  if (R == 0) return 0;
  const double a = div_rn(static_cast<double>(R), static_cast<double>(Z));
  const double d = Q == 0 ? a : a - div_rn(static_cast<double>(Q), static_cast<double>(M));
  return d > 0 ? static_cast<int64_t>(mul_rn(d, kProbScale)) : 0;  // truncation: floor, as d > 0
}

// The test u q_i(x) < r(x), i.e. u (qx / M) < rx / Z, as (u * qx) * Z < rx * M in double.
MTPKERN_HD bool rejection_accepts(float u, int64_t qx, int64_t M, int64_t rx, int64_t Z) {
  const double lhs = mul_rn(mul_rn(static_cast<double>(u), static_cast<double>(qx)), static_cast<double>(Z));
  return lhs < mul_rn(static_cast<double>(rx), static_cast<double>(M));
}

// Inverse CDF threshold of u over a mass Z > 0: floor(u * Z) clamped into [0, Z - 1] (NaN -> 0).
// The drawn token is the first y whose inclusive prefix sum of weights exceeds it.
MTPKERN_HD int64_t draw_threshold(float u, int64_t Z) {
  const double t = mul_rn(static_cast<double>(u), static_cast<double>(Z));
  if (!(t > 0)) return 0;
  if (t >= 9.0e18) return Z - 1;
  const int64_t th = static_cast<int64_t>(floor(t));
  return th < Z - 1 ? th : Z - 1;
}

// The next child of `node` after node `after` (children in index order), or T. A node t is a
// child of its parent only when 0 <= parents[t] < t, so the walk always moves forwards.
MTPKERN_HD int64_t next_child(const int64_t* parents, int64_t T, int64_t node, int64_t after) {
  for (int64_t t = after + 1; t < T; ++t)
    if (parents[t] == node) return t;
  return T;
}

struct RejectionArgs {
  const int64_t* tree_tokens;  // [B, T]
  const void* target_probs;    // [B, T, V] of prob_type
  const void* draft_probs;     // [B, Q, V] of prob_type
  const int64_t* draft_row;    // [T]
  const int64_t* parents;      // [T]
  const float* uniforms;       // [B, T]
  int64_t T, Q, V, max_depth;
  int prob_type;
};

// ---------------------------------------------------------------- launchers (csrc/cuda/*.cu)

#ifndef MTPKERN_CPU_ONLY

cudaError_t launch_tree_buffers(const int64_t* parents, int64_t T, int64_t max_depth, int32_t* mask, int64_t* depth,
                                int64_t* retrieve, bool* is_leaf, cudaStream_t stream);

// Outputs of B rows: accept_len, last_node, n_emitted [B]; path, tokens [B, max_depth + 1];
// scratch: 2 * B * V int64 (the residual's double buffer).
cudaError_t launch_verify_rejection(const RejectionArgs& a, int64_t B, int64_t* accept_len, int64_t* last_node,
                                   int64_t* path, int64_t* tokens, int64_t* n_emitted, int64_t* scratch,
                                   cudaStream_t stream);

cudaError_t launch_verify(const VerifyArgs& a, int64_t B, const int64_t* paths, int64_t P, int64_t Dp1,
                          int64_t* accept_len, int64_t* best_path, int64_t* last_node, int64_t* tokens,
                          cudaStream_t stream);

struct CompactArgs {
  void* k;  // [slices, S, row_bytes] raw bytes, whatever the dtype
  void* v;
  const int64_t* path;  // [N], or [B, N] with one row per batch row (per_row)
  const void* prefix_len;  // 0-d (or [B]: per_row) int64 or int32 on the device
  bool prefix64;
  const void* count;
  bool count64;
  int64_t slices, N, S, row_bytes;
  bool per_row;  // slice s = (layer, b, head) reads path row b, prefix_len[b], count[b]
  int64_t B, H;
};

// Batch row of slice s of a [L, B, H] grid of slices.
MTPKERN_HD int64_t slice_row(const CompactArgs& a, int64_t s) { return a.per_row ? (s / a.H) % a.B : 0; }

cudaError_t launch_kv_compact(const CompactArgs& a, cudaStream_t stream);
#endif  // MTPKERN_CPU_ONLY

}  // namespace mtpkern
