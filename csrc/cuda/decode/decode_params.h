// Plain parameter structs of the decode (flash-decoding), attention-state
// merge and KV-append kernels. Torch-free, like params.h.
#pragma once
#include <cstdint>

#include "cuda/common/fast_div.h"
#include "cuda/common/params.h"

namespace fastattn {

// Split-KV attention of a few new query tokens over a KV cache.
//
// q (batch, seqlen_q, heads_q, head_dim) by the q_* strides; the caches are
// (cache_batch, seqlen_k_max, heads_kv, head_dim) by the k_* / v_* strides
// (element units, last dim contiguous). Sequence b reads cache row
// cb = cache_batch_idx ? cache_batch_idx[b] : b and has
// sk = seqlens_k ? clamp(seqlens_k[b], 0, seqlen_k_max) : seqlen_k_max keys;
// a cache_batch_idx outside [0, cache_batch) makes the sequence empty
// (out 0, lse -inf) instead of reading out of bounds. The mask is MaskParams
// with bottom_right = true and (sq, sk) = (seqlen_q, sk).
//
// GQA packing: the group = heads_q / heads_kv query heads of one KV head and
// the seqlen_q queries form the M rows of one tile, row r <-> (query i = r / group,
// head hk * group + r % group), so each K/V byte is read once per KV head
// (per m-block; more than 64 rows need several m-blocks).
//
// Work: grid (num_m_blocks * num_splits, heads_kv, batch). The key blocks
// (of kBlockN) that the sequence's queries can see are divided evenly among
// num_splits splits PER SEQUENCE, on the device (sk is device data); a split
// with no blocks writes an empty partial (lse = -inf, o_partial untouched).
// num_splits == 1: out / lse are written directly. combine_in_cluster (sm90,
// num_splits <= kMaxClusterSplits): the splits of one (m-block, KV head,
// sequence) are one thread-block cluster and merge through distributed shared
// memory into out / lse (any out strides, no workspace). Else each split writes
// fp32 partials to the workspace
//   o_partial   (num_splits, batch, seqlen_q, heads_q, head_dim)  contiguous
//   lse_partial (num_splits, batch, heads_q, seqlen_q)            contiguous
// and the merge kernel (run_merge) combines them into out / lse.
// Most splits the cluster combine merges: one batch of the merge kernel, whose
// arithmetic it repeats (a portable cluster size).
constexpr int kMaxClusterSplits = 8;

struct DecodeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // (batch, seqlen_q, heads_q, head_dim) by the o_* strides
  float* lse = nullptr;  // (batch, heads_q, seqlen_q) by the lse_* strides
  float* o_partial = nullptr;
  float* lse_partial = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  const int* seqlens_k = nullptr;        // (batch) int32, device; nullptr: all seqlen_k_max
  // Ragged queries (the decode rows of a mixed batch, flash_mixed_kernel.cuh):
  // sequence b's queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of
  // q / out and the same columns of lse (at most seqlen_q of them are read; the
  // host sets the q / o / lse batch strides to 0). Only with num_splits == 1 or
  // combine_in_cluster: the combine kernel's partials are per batch row.
  // nullptr: every sequence has seqlen_q queries.
  const int* cu_seqlens_q = nullptr;
  const int* cache_batch_idx = nullptr;  // (batch) int32, device; nullptr: identity
  // Paged KV: block_table (batch, max_blocks) int32; the caches are then
  // (num_pages, page_size, heads_kv, head_dim): the k_/v_ batch strides are
  // the page strides, the row strides the slot strides, cache_batch the number
  // of pages and seqlen_k_max = max_blocks * page_size. Key row r of sequence b
  // lives in page block_table[b][r / page_size], slot r % page_size; a page id
  // outside [0, cache_batch) reads as zeros (never out of bounds).
  // Per-KV-head tables (B, heads_kv, max_blocks): KV head hk of sequence b
  // reads row b * batch stride + hk * block_table_head_stride (0: one table
  // row for all heads). Query-aware sparse decode gives each head its pages.
  const int* block_table = nullptr;  // nullptr: contiguous cache
  int64_t block_table_batch_stride = 0;
  int64_t block_table_head_stride = 0;
  int page_size = 0;

  int batch = 0;
  int seqlen_q = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int head_dim = 0;      // kernel-visible (multiple of 8, <= the kernel's head dim)
  int cache_batch = 0;   // rows of the contiguous cache (paged: number of pages)
  int seqlen_k_max = 0;  // S_max

  float scale = 1.f;       // >= 0 (the glue folds a negative scale into q)
  float scale_log2 = 1.f;  // scale * log2(e)
  float softcap_in = 0.f, softcap_out = 0.f;  // as FwdParams (cuda/common/softcap.h)
  // flash-attn's ALiBi: -slope * |i + sk - sq - j| on the scaled scores, slope =
  // alibi_slopes[b * alibi_batch_stride + h] (float32; nullptr: none).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  // Left padding (contiguous caches): sequence b's keys start at cache row
  // cache_leftpad[b] (clamped into [0, its seqlens_k]); nullptr: at 0.
  const int* cache_leftpad = nullptr;
  MaskParams mask;         // bottom_right is always true for decode
  ElemType dtype = ElemType::kFloat16;
  // FP8 caches (kv_kind != kSame): k / v hold e4m3 or e5m2 codes, element
  // strides as above (in codes), head_dim a multiple of 16. The value of a
  // K element of (sequence b, KV head hk) is code * k_descale[b * k_descale_batch_stride
  // + hk * k_descale_head_stride] (float32, device; nullptr: 1), likewise V.
  // The kernel folds the K factor into the score scale and the V factor into
  // the output (flash_decode_kernel.cuh), so both must be >= 0: a negative
  // factor makes that (sequence, KV head)'s output NaN.
  KvKind kv_kind = KvKind::kSame;
  // Speculative verification: the last seqlen_q keys of each sequence are the
  // draft tokens, and query i sees draft key j (0-based among them) only if
  // bit j of tree_mask[b * tree_mask_batch_stride + i] is set (seqlen_q <= 64),
  // on top of the mask above (nullptr: no tree mask).
  const uint64_t* tree_mask = nullptr;
  int64_t tree_mask_batch_stride = 0;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;
  int64_t k_descale_batch_stride = 0, k_descale_head_stride = 0;
  int64_t v_descale_batch_stride = 0, v_descale_head_stride = 0;
  int num_sms = 0;

  // Launch plan (gpu::plan_decode fills these from the sizes above).
  int num_splits = 1;
  int num_m_blocks = 1;
  int warps_m = 1;  // warps along M (rows per CTA = 16 * warps_m); the rest split the keys
  int stages = 2;   // K/V pipeline stages in shared memory
  // sm90 copy-engine path (contiguous caches, kernel head dims 64 / 128; the
  // plan decides): K and V reach shared memory as TMA boxes. The launcher
  // fills k_tma / v_tma (CUtensorMap blobs over the caches viewed as
  // (head_dim, heads_kv, seqlen_k_max, cache_batch)).
  bool use_tma = false;
  // Splits merged inside a cluster of num_splits CTAs (launched as one).
  bool combine_in_cluster = false;
  // heads_q / heads_kv (the GQA group) and num_splits as multiply-high
  // divisors; the launcher (run_decode_hdim) fills them.
  FastDiv group_div;
  FastDiv split_div;

  alignas(64) unsigned char k_tma[128] = {};
  alignas(64) unsigned char v_tma[128] = {};
};

// Element types the merge kernel reads / writes.
enum class MergeType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// LSE-weighted merge of num_parts partial attention results over disjoint key
// sets: lse = log(sum_p exp(lse_p)), out = sum_p exp(lse_p - lse) * out_p,
// parts with lse_p = -inf weigh 0 and their out_p is never read; all parts
// empty gives out = 0 and lse = -inf.
//
// Rows are (o, s, h) with o < outer, s < seqlen, h < heads; columns d < head_dim.
// Part p's out element (o, s, h, d) lives at (element units of in_type)
//   in[v] + q * in_part_stride + o * in_outer_stride[v] + s * in_seq_stride[v]
//         + h * in_head_stride[v] + d
// and its lse at
//   lse_in[v] + q * lse_part_stride + o * lse_outer_stride[v] + h * lse_head_stride[v]
//             + s * lse_seq_stride[v]
// with (v, q) = two_views ? (p, 0) : (0, p): either two separate tensors
// (merge_states; num_parts == 2) or one stacked tensor (merge_states_n and the
// decode combine). out is (outer, seqlen, heads, head_dim) contiguous in
// out_type and lse_out (outer, heads, seqlen) contiguous fp32.
struct MergeParams {
  const void* in[2] = {nullptr, nullptr};
  int64_t in_outer_stride[2] = {0, 0}, in_seq_stride[2] = {0, 0}, in_head_stride[2] = {0, 0};
  int64_t in_part_stride = 0;
  const float* lse_in[2] = {nullptr, nullptr};
  int64_t lse_outer_stride[2] = {0, 0}, lse_head_stride[2] = {0, 0}, lse_seq_stride[2] = {0, 0};
  int64_t lse_part_stride = 0;
  bool two_views = false;
  int num_parts = 0;

  void* out = nullptr;
  float* lse_out = nullptr;
  int64_t outer = 0;
  int seqlen = 0;
  int heads = 0;
  int head_dim = 0;
  MergeType in_type = MergeType::kFloat32;
  MergeType out_type = MergeType::kFloat32;
};

// Copies new tokens into a cache in place. k, v (num_tokens, heads_kv,
// head_dim) and the caches (rows, row_len, heads_kv, head_dim) by their
// strides (element units; last dim contiguous), elements of elem_bytes
// (2, 4 or 8: the copy is dtype-agnostic). Token n goes to slot
// s = slot_mapping[n]: row s / row_len, position s % row_len; slots < 0
// (padding) and >= rows * row_len (out of range) are skipped. Two tokens with
// one slot race (either may win).
struct AppendKvParams {
  const void* k = nullptr;
  const void* v = nullptr;
  const int64_t* slot_mapping = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t k_token_stride = 0, k_head_stride = 0;
  int64_t v_token_stride = 0, v_head_stride = 0;
  int64_t kc_row_stride = 0, kc_pos_stride = 0, kc_head_stride = 0;
  int64_t vc_row_stride = 0, vc_pos_stride = 0, vc_head_stride = 0;
  int64_t num_tokens = 0;
  int64_t rows = 0;
  int64_t row_len = 0;
  int heads_kv = 0;
  int head_dim = 0;
  int elem_bytes = 2;
  // Quantizing append into an FP8 cache (cache_kind != kSame): k / v are
  // src_dtype elements, the caches FP8 codes; element (n, h, :) is stored as
  // the code nearest to x / scale[n * scale_token_stride + h * scale_head_stride]
  // (round to nearest even, saturated to the largest finite code; scale
  // nullptr: 1). elem_bytes is then unused.
  KvKind cache_kind = KvKind::kSame;
  ElemType src_dtype = ElemType::kFloat16;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t k_scale_token_stride = 0, k_scale_head_stride = 0;
  int64_t v_scale_token_stride = 0, v_scale_head_stride = 0;
};

}  // namespace fastattn
