// Validation of the sparse_fwd / sparse_bwd arguments (csrc/ops.cpp), shared
// by the CPU and CUDA implementations so both reject bad input alike.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "torch/attention_problem.h"

namespace fastattn {

// One direction of a block mask: per (batch, head, row block) its partial and
// full column blocks. Forward: rows = query blocks, columns = KV blocks;
// backward: the transposed lists. Tensors are int32 and contiguous (the
// kernels index them with the sizes below; batch / head dims of size 1
// broadcast).
struct SparseLists {
  at::Tensor num, idx, full_num, full_idx;
  at::Tensor bits_index;  // aligned with idx; undefined: no bits
  int64_t bm = 1, hm = 1;  // batch / head dims of the lists (1 = broadcast)
  int64_t rows = 0;        // row blocks
  int64_t cols = 0;        // column blocks (valid ids are [0, cols))
  int64_t width = 0, full_width = 0;  // last dims of idx / full_idx
};

struct SparseProblem {
  AttnProblem attn;
  int64_t block_q = 0, block_kv = 0;
  SparseLists lists;
  at::Tensor bits;      // (NP, block_q, words) int32, or undefined
  int64_t words = 0;    // ceil(block_kv / 32)
  // The additive bias: an attn_mask, expanded (B, Hq, Sq, Sk) view of the
  // caller's (B|1, Hq|1, Sq, Sk) bias_raw; or (bias_relative) a relative-
  // position table, bias(b, h, i, j) = t[h, j - i + Sq - 1], expanded
  // (Hq, Sq + Sk - 1) view of the caller's (Hq|1, Sq + Sk - 1) one. Undefined: none.
  at::Tensor bias;
  at::Tensor bias_raw;
  bool bias_relative = false;
  at::Tensor alibi;  // (Hq|1) float32 contiguous ALiBi slopes, or undefined
};

// transposed: the lists are the backward's (per KV block its query blocks),
// named q_* in messages; otherwise the forward's kv_*.
SparseProblem check_sparse_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& num, const at::Tensor& idx,
                                const at::Tensor& full_num, const at::Tensor& full_idx,
                                const std::optional<at::Tensor>& bits_index,
                                const std::optional<at::Tensor>& bits, int64_t block_q,
                                int64_t block_kv, double scale, bool causal, int64_t window_left,
                                int64_t window_right, bool bottom_right,
                                const std::optional<at::Tensor>& bias, bool bias_relative,
                                const std::optional<at::Tensor>& alibi_slopes, bool transposed);

// The relative table's gradient (Hq, Sq + Sk - 1) from the dense dL/dbias
// (B, Hq, Sq, Sk): every diagonal j - i summed, deterministically.
at::Tensor relative_bias_grad(const at::Tensor& dense);

// Host-side check that every listed block id is in range and every count fits
// its list (CPU tensors only: on CUDA that would be a sync; the kernels skip
// out-of-range entries instead).
void check_sparse_list_values(const SparseProblem& sp, bool transposed);

}  // namespace fastattn
