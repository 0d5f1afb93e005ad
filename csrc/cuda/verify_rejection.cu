// CUDA kernel of mtpkern::verify_rejection: one block per row of the batch (a 1-D tree is a
// batch of one), one launch, no host sync. The walk down the tree is sequential and every
// thread follows it in lockstep (the tree, the tokens and the uniforms are read by all); the
// work over the vocabulary (a row's mass, a residual update, the final inverse-CDF draw) is
// split across the block. The sums are of integer weights (kernels.h), so the block's
// reduction order does not matter and the results equal the CPU kernel's and the eager
// reference's bit for bit. Torch glue (checks, outputs, registration): csrc/verify_rejection_api.cpp.
#include "../kernels.h"

namespace mtpkern {

constexpr int kRejectionThreads = 512;

// The block's sum of v (every thread gets it); `any_bad` becomes whether any thread passed bad.
__device__ int64_t block_sum(int64_t v, bool bad, bool* any_bad, int64_t* warp_sums) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  *any_bad = __syncthreads_or(bad) != 0;  // also the barrier before warp_sums is read
  int64_t total = 0;
  for (int w = 0; w < kRejectionThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

// Mass of a probability row as weights; 0 when any entry is invalid (outside [0, 1], NaN).
__device__ int64_t row_mass(const void* row, int type, int64_t V, int64_t* warp_sums) {
  int64_t z = 0;
  bool bad = false;
  for (int64_t y = threadIdx.x; y < V; y += blockDim.x) {
    const int64_t w = prob_weight(load_prob(row, type, y));
    bad |= w < 0;
    z += w < 0 ? 0 : w;
  }
  bool any_bad;
  const int64_t total = block_sum(z, bad, &any_bad, warp_sums);
  return any_bad ? 0 : total;
}

__global__ void __launch_bounds__(kRejectionThreads, 1)
    verify_rejection_kernel(RejectionArgs a, int64_t* __restrict__ accept_len, int64_t* __restrict__ last_node,
                            int64_t* __restrict__ path, int64_t* __restrict__ tokens,
                            int64_t* __restrict__ n_emitted, int64_t* __restrict__ scratch) {
  __shared__ int64_t warp_sums[kRejectionThreads / 32];
  __shared__ int64_t segment[kRejectionThreads];  // the draw's per-thread masses, then their prefix sums
  __shared__ int64_t drawn;
  const int64_t b = blockIdx.x, T = a.T, V = a.V, D1 = a.max_depth + 1;
  const int type = a.prob_type;
  const int64_t* tok = a.tree_tokens + b * T;
  const float* u = a.uniforms + b * T;
  path += b * D1;
  tokens += b * D1;
  int64_t* R = scratch + 2 * b * V;  // the residual's weights once it differs from p
  int64_t* next_R = R + V;
  for (int64_t j = threadIdx.x; j < D1; j += blockDim.x) {
    path[j] = j == 0 ? 0 : -1;
    tokens[j] = -1;
  }
  __syncthreads();

  int64_t cur = 0, n = 0;
  const void* p = prob_row(a.target_probs, type, b * T, V);
  bool from_p = true;
  int64_t Z = row_mass(p, type, V, warp_sums);
  int64_t cached_row = -1, S = 0;
  while (n < a.max_depth && Z > 0) {
    int64_t accepted = -1, removed = 0;
    for (int64_t c = next_child(a.parents, T, cur, cur); c < T; c = next_child(a.parents, T, cur, c)) {
      const int64_t x = tok[c], row = a.draft_row[c];
      if (x < 0 || x >= V || row < 0 || row >= a.Q) continue;  // never proposed
      const void* q = prob_row(a.draft_probs, type, b * a.Q + row, V);
      if (row != cached_row) {
        S = row_mass(q, type, V, warp_sums);
        cached_row = row;
      }
      const int64_t qx = prob_weight(load_prob(q, type, x));
      if (S <= 0 || qx <= 0) continue;
      const int64_t M = S - removed > qx ? S - removed : qx;
      const int64_t rx = from_p ? prob_weight(load_prob(p, type, x)) : R[x];
      if (rejection_accepts(u[c], qx, M, rx, Z)) {
        accepted = c;
        break;
      }
      int64_t part = 0;
      for (int64_t y = threadIdx.x; y < V; y += blockDim.x) {
        const int64_t r = from_p ? prob_weight(load_prob(p, type, y)) : R[y];
        next_R[y] = residual_weight(r, Z, prob_weight(load_prob(q, type, y)), M);
        part += next_R[y];
      }
      bool unused;
      const int64_t Z_next = block_sum(part, false, &unused, warp_sums);  // its barriers publish next_R
      if (Z_next > 0) {  // else r == q_i up to rounding: the rejection had probability ~0
        int64_t* t = R;
        R = next_R;
        next_R = t;
        Z = Z_next;
        from_p = false;
      }
      removed += qx;
    }
    if (accepted < 0) break;
    if (threadIdx.x == 0) {
      tokens[n] = tok[accepted];
      path[n + 1] = accepted;
    }
    cur = accepted;
    ++n;
    p = prob_row(a.target_probs, type, b * T + cur, V);
    from_p = true;
    Z = row_mass(p, type, V, warp_sums);
  }

  if (Z > 0) {  // inverse CDF: each thread owns a contiguous segment of the vocabulary
    const int64_t th = draw_threshold(u[0], Z);
    const int64_t len = (V + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * len;
    const int64_t hi = lo + len < V ? lo + len : V;
    int64_t mass = 0;
    for (int64_t y = lo; y < hi; ++y) mass += from_p ? prob_weight(load_prob(p, type, y)) : R[y];
    segment[threadIdx.x] = mass;
    if (threadIdx.x == 0) drawn = -1;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t acc = 0;
      for (int i = 0; i < static_cast<int>(blockDim.x); ++i) {
        const int64_t m = segment[i];
        segment[i] = acc;  // exclusive prefix sum
        acc += m;
      }
    }
    __syncthreads();
    int64_t acc = segment[threadIdx.x];
    if (acc <= th && th < acc + mass) {  // exactly one thread's segment holds the crossing
      for (int64_t y = lo; y < hi; ++y) {
        acc += from_p ? prob_weight(load_prob(p, type, y)) : R[y];
        if (acc > th) {
          drawn = y;
          break;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) tokens[n] = drawn;
  }
  if (threadIdx.x == 0) {
    accept_len[b] = n;
    last_node[b] = cur;
    n_emitted[b] = n + 1;
  }
}

cudaError_t launch_verify_rejection(const RejectionArgs& a, int64_t B, int64_t* accept_len, int64_t* last_node,
                                   int64_t* path, int64_t* tokens, int64_t* n_emitted, int64_t* scratch,
                                   cudaStream_t stream) {
  verify_rejection_kernel<<<static_cast<unsigned>(B), kRejectionThreads, 0, stream>>>(
      a, accept_len, last_node, path, tokens, n_emitted, scratch);
  return cudaGetLastError();
}

}  // namespace mtpkern
