// Validation of the decode / merge_states / append_kv op arguments (schemas in
// csrc/ops.cpp) and the normalized problems they describe. Shared by the CPU
// and CUDA implementations so both reject bad input with the same messages.
// Torch code (like attention_problem.h); device-specific checks (CUDA dtypes,
// alignment) stay in the backends.
//
//   DecodeProblem check_decode_args(q, k_cache, v_cache, seqlens_k, cache_batch_idx,
//                                   block_table, scale, causal, wl, wr, num_splits)
//   std::tuple<out, lse> empty_decode_outputs(prob, q)       fresh contiguous out/lse
//   MergeProblem  check_merge_args(out_a, lse_a, out_b, lse_b)
//   MergeProblem  check_merge_n_args(outs, lses)
//   std::tuple<out, lse> empty_merge_outputs(prob, like)     fresh contiguous out/lse
//   AppendProblem check_append_args(k, v, slot_mapping, k_cache, v_cache)
//
// Device data: index tensors (seqlens_k, cache_batch_idx, block_table,
// slot_mapping) may live on the GPU, where their values cannot be checked
// without a host sync. Their VALUES are checked here only for CPU tensors;
// the CUDA kernels instead make bad values harmless (documented in
// torch/decode_cuda.cpp): seqlens_k is clamped into [0, S_max], a
// cache_batch_idx outside [0, B_cache) makes that sequence empty (out 0,
// lse -inf), slots outside [0, rows * S) are skipped.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastattn {

// Rank, dtype, device, shape and last-dim checks shared by the decode and
// paged_fwd ops: q of rank q_rank (named q_name, laid out as q_layout), 4-D
// k_cache / v_cache of one shape (laid out as cache_layout), one supported
// dtype, one device, contiguous last dims, and head counts / head dims that
// match (q's heads and head dim are its last two dims; query heads a
// multiple of the cache's, head dim in [1, kMaxHeadDim]).
// allow_fp8_cache: the caches may instead be FP8 (float8_e4m3fn or
// float8_e5m2, both the same) with a head dim that is a multiple of 16.
void check_q_and_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t q_rank, const char* q_name, const char* q_layout,
                        const char* cache_layout, bool allow_fp8_cache = false);

// float8_e4m3fn / float8_e5m2: the FP8 KV-cache element types.
bool is_fp8_kv_dtype(at::ScalarType t);

// A per-tensor / per-KV-head / per-(row, KV head) float32 scale of an FP8
// cache (decode's k_descale / v_descale: rows = sequences; append_kv's
// k_scale / v_scale: rows = tokens): shape with one element, (Hkv) or
// (rows, Hkv), on `like`'s device; CPU values must be finite and > 0 (the
// GPU cannot check without a sync). The element of (row r, KV head h) is
// t[r * row_stride + h * head_stride]. Undefined t: no scale (1).
struct KvScale {
  at::Tensor t;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
};
KvScale checked_kv_scale(const std::optional<at::Tensor>& scale, const char* name, bool fp8_cache,
                         int64_t rows, const char* rows_name, int64_t heads_kv,
                         const at::Tensor& like);

struct DecodeProblem {
  int64_t batch = 0;      // B (sequences; q.size(0))
  int64_t seqlen_q = 0;   // Sq (new query tokens per sequence)
  int64_t heads_q = 0;    // Hq
  int64_t heads_kv = 0;   // Hkv (divides Hq)
  int64_t head_dim = 0;   // D (q and caches)
  // Contiguous cache: (cache_rows = B_cache, cache_seqlen = S_max, Hkv, D).
  // Paged cache: (cache_rows = num_blocks, cache_seqlen = block_size, Hkv, D).
  int64_t cache_rows = 0;
  int64_t cache_seqlen = 0;
  // Largest number of keys one sequence can have: S_max, or
  // max_blocks_per_seq * block_size when paged.
  int64_t max_seqlen_k = 0;
  bool paged = false;
  int64_t max_blocks_per_seq = 0;  // paged: block_table.size(1)
  bool has_seqlens_k = false;      // else every sequence has max_seqlen_k keys
  bool has_cache_batch_idx = false;  // else sequence b reads cache row b
  double scale = 1.0;
  double softcap = 0.0;  // as AttnProblem::softcap
  // Normalized window (MaskParams of csrc/cuda/common/params.h, always bottom-right
  // aligned with sk = seqlens_k[b]): causal folds into window_right == 0;
  // negative means unbounded.
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t num_splits = 0;  // as given (>= 0; 0 = backend heuristic)
  bool fp8_kv = false;     // the caches hold FP8 codes (is_fp8_kv_dtype)
};

// q (B, Sq, Hq, D); k_cache, v_cache (B_cache, S_max, Hkv, D), or paged
// (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks) int32
// (or (B, Hkv, max_blocks): a row per KV head);
// seqlens_k (B) int32; cache_batch_idx (B) int32 (not with block_table).
// Any strides with a contiguous last dim; one dtype for q and the caches; all
// tensors on q's device. CPU index tensors also get their values checked:
// 0 <= seqlens_k[b] <= max_seqlen_k, 0 <= cache_batch_idx[b] < B_cache,
// 0 <= block_table entries < num_blocks.
DecodeProblem check_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache,
                                const std::optional<at::Tensor>& seqlens_k,
                                const std::optional<at::Tensor>& cache_batch_idx,
                                const std::optional<at::Tensor>& block_table, double scale,
                                bool causal, int64_t window_left, int64_t window_right,
                                int64_t num_splits);

// out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) (float32; float64 for
// float64 q), both fresh and contiguous: the shapes/strides of the fake kernel.
std::tuple<at::Tensor, at::Tensor> empty_decode_outputs(const DecodeProblem& p,
                                                        const at::Tensor& q);

struct MergeProblem {
  int64_t parts = 0;     // 2 for merge_states, N for merge_states_n
  int64_t outer = 0;     // product of the leading dims "..." (1 if none)
  int64_t seqlen = 0;    // S
  int64_t heads = 0;     // H
  int64_t head_dim = 0;  // D
  std::vector<int64_t> out_sizes;  // (..., S, H, D) of the merged out
  std::vector<int64_t> lse_sizes;  // (..., H, S) of the merged lse
};

// out_a, out_b (..., S, H, D) (rank >= 3, e.g. dense (B, S, H, D) or varlen
// (T, H, D)), lse_a, lse_b (..., H, S); the two parts have equal shapes, one
// dtype (float16/bfloat16/float32/float64) and one device; lse dtype is
// float32 (float64 for float64 outs, as fwd returns it). outs need a
// contiguous last dim; lse strides are free.
MergeProblem check_merge_args(const at::Tensor& out_a, const at::Tensor& lse_a,
                              const at::Tensor& out_b, const at::Tensor& lse_b);

// outs (N, ..., S, H, D), lses (N, ..., H, S) with N >= 1; same rules.
MergeProblem check_merge_n_args(const at::Tensor& outs, const at::Tensor& lses);

// Merged out (out_sizes, dtype of `like`) and lse (lse_sizes, lse dtype), fresh, contiguous.
std::tuple<at::Tensor, at::Tensor> empty_merge_outputs(const MergeProblem& p,
                                                       const at::Tensor& like);

struct AppendProblem {
  int64_t num_tokens = 0;  // N
  int64_t heads_kv = 0;
  int64_t head_dim = 0;
  int64_t rows = 0;        // cache.size(0): B_cache or num_blocks
  int64_t row_len = 0;     // cache.size(1): S_max or block_size
  bool fp8_cache = false;  // quantizing append (k, v float16 / bfloat16 / float32)
};

// k, v (N, Hkv, D); slot_mapping (N) int64; k_cache, v_cache (rows, S, Hkv, D)
// of one shape; one dtype for k, v and the caches (or FP8 caches, both of one
// FP8 dtype, head_dim a multiple of 16, k / v of one float dtype); all on one device; last
// dims contiguous (other strides free). Negative slots are padding and are
// skipped. Slots >= rows * S are out of range: the CPU backend raises (it can
// check without a device sync); the CUDA kernel cannot check them without a
// sync and skips them instead.
AppendProblem check_append_args(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                                const at::Tensor& v_cache);

// tree_mask (decode): (B, Sq, Sq) bool on q's device with Sq <= 64 (see the
// decode schema). Returns it contiguous (undefined when absent).
at::Tensor checked_tree_mask(const std::optional<at::Tensor>& tree_mask, const DecodeProblem& p,
                             const at::Tensor& q);

// cache_leftpad (decode): (B) int32 on q's device, contiguous caches only
// (NotImplementedError with a block table); CPU values in [0, max_seqlen_k].
// Returns it contiguous (undefined when absent).
at::Tensor checked_cache_leftpad(const std::optional<at::Tensor>& cache_leftpad,
                                 const DecodeProblem& p, const at::Tensor& q);

}  // namespace fastattn
