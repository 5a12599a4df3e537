// Validation of the paged_fwd op (schema in csrc/ops.cpp): chunked prefill /
// mixed prefill+decode over a paged KV cache. Shared by the CPU and CUDA
// backends so both reject bad input with the same messages. (Paged decode is
// the decode op with a block_table: decode_problem.h.)
#pragma once
#include <ATen/ATen.h>

#include "torch/attention_problem.h"

namespace fastattn {

struct PagedFwdProblem {
  // The attention problem as the forward kernels see it: varlen queries,
  // bottom-right aligned mask, seqlen_q = max_seqlen_q, seqlen_k = the most
  // keys a sequence can have (max_blocks * block_size).
  AttnProblem attn;
  int64_t num_blocks = 0;  // pages in the pool
  int64_t block_size = 0;  // rows per page
  int64_t max_blocks = 0;  // block_table.size(1)
};

// q (total_q, Hq, D) packed by cu_seqlens_q (B + 1) int32; k_cache, v_cache
// (num_blocks, block_size, Hkv, D); seqlens_k (B) int32: keys of each
// sequence (cached context + its new chunk, already appended); block_table
// (B, max_blocks) int32. One dtype, one device, last dims contiguous. CPU
// index tensors also get their values checked (cu_seqlens_q consistent with
// q and max_seqlen_q, 0 <= seqlens_k <= max_blocks * block_size, the table
// entries each sequence reads inside the pool).
PagedFwdProblem check_paged_fwd_args(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& seqlens_k, const at::Tensor& block_table,
                                     int64_t max_seqlen_q, double scale, bool causal,
                                     int64_t window_left, int64_t window_right);

// The plan arguments of the mixed_fwd op (schema in csrc/ops.cpp): work an
// int32 (num_work, 4) contiguous table whose rows are a multiple of
// num_splits (1..8), warps_m in {1, 2, 4}, 0 <= decode_max_q <= max_seqlen_q.
// (The table's entries are the planner's; the kernels trust them.)
void check_mixed_plan_args(const at::Tensor& q, const at::Tensor& work, int64_t max_seqlen_q,
                           int64_t decode_max_q, int64_t num_splits, int64_t warps_m);

}  // namespace fastattn
