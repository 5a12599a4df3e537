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

}  // namespace fastattn
