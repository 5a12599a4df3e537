#include "torch/paged_problem.h"

#include <cmath>
#include <utility>

#include "torch/decode_problem.h"
#include "torch/index_checks.h"

namespace fastattn {

PagedFwdProblem check_paged_fwd_args(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& seqlens_k, const at::Tensor& block_table,
                                     int64_t max_seqlen_q, double scale, bool causal,
                                     int64_t window_left, int64_t window_right) {
  check_q_and_caches(q, k_cache, v_cache, 3, "paged prefill q",
                     "(total_tokens, heads, head_dim), packed by cu_seqlens_q",
                     "paged cache (num_blocks, block_size, heads_kv, head_dim)");

  PagedFwdProblem p;
  AttnProblem& a = p.attn;
  a.varlen = true;
  a.bottom_right = true;
  a.total_q = q.size(0);
  a.heads_q = q.size(1);
  a.head_dim = q.size(2);
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  a.heads_kv = k_cache.size(2);
  TORCH_CHECK(p.block_size >= 1, "fastattn: the paged cache's block_size must be >= 1");
  TORCH_CHECK(std::isfinite(scale), "fastattn: scale must be finite, got ", scale);

  check_cu_seqlens(cu_seqlens_q, q, "cu_seqlens_q");
  a.batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(max_seqlen_q >= 0, "fastattn: max_seqlen_q must be >= 0, got ", max_seqlen_q);
  check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", a.total_q, max_seqlen_q);
  check_index_tensor(block_table, q, "block_table", at::kInt, 2, a.batch);
  check_index_tensor(seqlens_k, q, "seqlens_k", at::kInt, 1, a.batch);
  p.max_blocks = block_table.size(1);
  const int64_t max_keys = p.max_blocks * p.block_size;
  TORCH_CHECK(max_keys <= INT32_MAX, "fastattn: max_blocks * block_size must fit in int32, got ",
              max_keys);
  check_index_values(seqlens_k, "seqlens_k", 0, max_keys,
                     "keys per sequence, at most max_blocks * block_size");
  check_block_table_values(block_table, seqlens_k, p.block_size, p.num_blocks);

  a.seqlen_q = max_seqlen_q;
  a.seqlen_k = max_keys;
  a.scale = scale;
  a.window_left = window_left < 0 ? -1 : window_left;
  a.window_right = causal ? 0 : (window_right < 0 ? -1 : window_right);
  return p;
}

void check_mixed_plan_args(const at::Tensor& q, const at::Tensor& work, int64_t max_seqlen_q,
                           int64_t decode_max_q, int64_t num_splits, int64_t warps_m) {
  TORCH_CHECK(work.scalar_type() == at::kInt && work.dim() == 2 && work.size(1) == 4 &&
                  work.is_contiguous(),
              "fastattn: mixed_fwd: work must be a contiguous int32 (num_work, 4) table (a "
              "BatchAttention plan), got ", work.scalar_type(), " of shape ", work.sizes());
  TORCH_CHECK(num_splits >= 1 && num_splits <= 8, "fastattn: mixed_fwd: num_splits must be in "
              "[1, 8] (the splits merge in one thread-block cluster), got ", num_splits);
  TORCH_CHECK(work.size(0) % num_splits == 0 && work.size(0) <= INT32_MAX,
              "fastattn: mixed_fwd: the work table's ", work.size(0),
              " rows must be a multiple of num_splits = ", num_splits);
  TORCH_CHECK(warps_m == 1 || warps_m == 2 || warps_m == 4,
              "fastattn: mixed_fwd: warps_m must be 1, 2 or 4, got ", warps_m);
  TORCH_CHECK(decode_max_q >= 0 && decode_max_q <= max_seqlen_q,
              "fastattn: mixed_fwd: decode_max_q must be in [0, max_seqlen_q = ", max_seqlen_q,
              "], got ", decode_max_q);
  (void)q;
}

}  // namespace fastattn
