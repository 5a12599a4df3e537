// Plain parameter structs shared by the torch glue and the CUDA kernels.
// This header must stay torch-free: kernels include it, and so may a future
// non-torch frontend.
#pragma once
#include <cstdint>

namespace fastattn {

// Element type of q/k/v/out/dout and of dq/dk/dv. Accumulation is always fp32.
enum class ElemType : int { kFloat16 = 0, kBFloat16 = 1 };

// Element type of a KV cache the decode kernels read: q's ElemType, or FP8
// codes (float8_e4m3fn / float8_e5m2) dequantized in the kernel with
// per-tensor / per-head / per-(sequence, head) scales (DecodeParams).
enum class KvKind : int { kSame = 0, kE4M3 = 1, kE5M2 = 2 };

// Which keys a query may see. Query i of a sequence with lengths (sq, sk)
// sees key j iff
//     (window_left  < 0 || j >= i + offset - window_left) &&
//     (window_right < 0 || j <= i + offset + window_right)
// where offset = bottom_right ? sk - sq : 0. Causal is window_right == 0.
// A row that sees no key gets out = 0 and lse = -inf.
struct MaskParams {
  int window_left = -1;
  int window_right = -1;
  bool bottom_right = false;
};

// Block-sparse schedule of the sparse_fwd / sparse_bwd ops (lists of a
// FlexAttention-style block mask, see csrc/ops.cpp). One direction: per
// (batch, head, row block) the partial and full column blocks to visit; the
// forward's rows are query blocks (columns KV blocks), the backward's the
// transpose. Mask blocks are block_q x block_kv, multiples of the kernels'
// tiles (the Python layer re-blocks other sizes). num == nullptr: dense.
// A partial block's pair (r, c) (block-relative) is visible iff bit c % 32 of
// word bits[(slot * block_q + r) * words + c / 32] is set, slot =
// bits_index[same position as the block id] (< 0 or bits == nullptr: every
// pair). Ids outside [0, cols) and counts outside [0, width] (bad device
// data) are skipped / clamped by the kernels.
struct BlockSparseParams {
  const int* num = nullptr;        // (bm, hm, rows) partial blocks per row
  const int* idx = nullptr;        // (bm, hm, rows, width)
  const int* full_num = nullptr;   // (bm, hm, rows) full blocks per row
  const int* full_idx = nullptr;   // (bm, hm, rows, full_width)
  const int* bits_index = nullptr; // (bm, hm, rows, width), aligned with idx
  const uint32_t* bits = nullptr;  // (slots, block_q, words)
  int slots = 0;                   // partial blocks with bits (bits_index values < slots)
  int bm = 1, hm = 1;              // list batch / head dims (1 = broadcast)
  int rows = 0, cols = 0, width = 0, full_width = 0;
  int block_q = 0, block_kv = 0, words = 0;
};

// Additive score bias of the sparse ops (a float attn_mask, or a relative-
// position table): element (b, h, i, j) at ptr[b * sb + h * sh + i * si + j * sj]
// (stride 0 broadcasts; a table t[h, j - i + Sq - 1] is ptr = t + Sq - 1,
// si = -1, sj = 1), float32 (the glue converts other dtypes), added to the
// scaled score of query i, key j. The backward writes dL/dbias = dS of every
// visited in-range pair to grad[b * gb + h * gh + i * gi + j * gj] (fp32,
// zero-filled by the glue), with atomic adds when grad_accumulate (aliased
// elements: the relative table's gradient).
// ALiBi adds slope * (j - i) on top, slope = slopes[b * slope_batch_stride +
// h * slope_stride], computed in registers (fixed slopes: no gradient); with
// alibi_symmetric flash-attn's form -slope * |i + sk - sq - j| instead (per
// sequence lengths sq, sk). Both are the same up to a per-row constant on
// masks that hide every key right of the bottom-right diagonal.
struct BiasParams {
  const float* ptr = nullptr;  // nullptr: no bias tensor
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  float* grad = nullptr;
  int64_t gb = 0, gh = 0, gi = 0, gj = 0;
  bool grad_accumulate = false;
  const float* slopes = nullptr;  // nullptr: no ALiBi
  int64_t slope_stride = 1;
  int64_t slope_batch_stride = 0;
  bool alibi_symmetric = false;
#if defined(__CUDACC__)
  __host__ __device__
#endif
  bool on() const { return ptr != nullptr || slopes != nullptr; }
};

// Attention dropout (cuda/common/dropout.h): rng_state points at (seed, offset)
// int64 on the device (the dropout_seed op writes them, so a captured CUDA
// graph draws fresh values at every replay); nullptr: no dropout. A pair is
// kept iff its mask byte < keep_threshold, and kept probabilities are scaled
// by keep_scale = 256 / keep_threshold (0 when everything is dropped).
struct DropoutParams {
  const int64_t* rng_state = nullptr;
  uint32_t keep_threshold = 256;
  float keep_scale = 1.f;
#if defined(__CUDACC__)
  __host__ __device__
#endif
  bool on() const { return rng_state != nullptr; }
};

// Forward: out = softmax(scale * q k^T + mask) v and lse = logsumexp(scale * q k^T + mask)
// (natural log, fp32).
//
// Layout: q is (batch, seqlen_q, heads_q, head_dim) addressed by the strides
// below (in elements, last dim contiguous); k and v likewise with heads_kv.
// Query head h reads kv head h / (heads_q / heads_kv) (GQA/MQA by index).
//
// Varlen: when cu_seqlens_q != nullptr the batch is ragged: sequence b owns
// rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q/out (batch strides are then
// ignored, treated as 0) and rows [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k/v.
// seqlen_q / seqlen_k are then the maxima (they only size the grid).
//
// lse element (b, h, row) lives at lse[b * lse_batch_stride + h * lse_head_stride + row]
// with row = (varlen ? cu_seqlens_q[b] : 0) + i. Dense: (B, Hq, Sq) contiguous;
// varlen: (Hq, total_q) contiguous with lse_batch_stride = 0.
struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  // fwd_partial: when set, O is written here in fp32 (the element strides of
  // o_*) instead of to `out` (which then points at the same buffer, unused):
  // a part's result that is merged with others before its one rounding.
  float* out_f32 = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int head_dim = 0;
  int seqlen_q = 0;  // max over the batch when varlen
  int seqlen_k = 0;  // max over the batch when varlen

  const int* cu_seqlens_q = nullptr;  // (batch + 1) int32, device memory
  const int* cu_seqlens_k = nullptr;
  // Varlen: rows of q and of k/v (total_q, total_k). Kernels clamp the
  // cu_seqlens they read into [0, total] so bad offsets can't reach far.
  int64_t total_q = 0;
  int64_t total_k = 0;

  float scale = 1.f;       // softmax scale applied to q k^T
  float scale_log2 = 1.f;  // scale * log2(e): kernels work in exp2
  // Score cap on the raw scores the kernels keep (softmax of scale * s):
  // s -> softcap_out * tanh(softcap_in * s), softcap_in = scale / softcap,
  // softcap_out = softcap / scale (0 / 0: off). See cuda/common/softcap.h.
  float softcap_in = 0.f, softcap_out = 0.f;
  MaskParams mask;
  ElemType dtype = ElemType::kFloat16;
  int num_sms = 0;  // of the current device, for grid heuristics

  // Paged K/V (forward only; the paged_fwd op): block_table != nullptr makes k
  // and v page pools (num_pages, page_size, heads_kv, head_dim): k_batch_stride
  // is then the page stride and k_row_stride the slot stride (v likewise).
  // q/out are varlen (cu_seqlens_q); sequence b has seqlens_k[b] keys (clamped
  // into [0, seqlen_k], seqlen_k = max_blocks * page_size) and key row r lives
  // in page block_table[b * block_table_batch_stride + r / page_size], slot
  // r % page_size; a page id outside [0, num_pages) reads as zeros.
  // cu_seqlens_k is unused.
  const int* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int page_size = 0;
  int num_pages = 0;
  const int* seqlens_k = nullptr;

  // Block-sparse schedule (sparse_fwd: the forward lists; sparse_bwd: the
  // transposed ones). Dense kernels leave it empty. Not with varlen / paged.
  BlockSparseParams sparse;
  // The sparse ops' bias (dense batches, scale > 0); the dense ops use its
  // ALiBi part alone (flash-attn's alibi_slopes, varlen and paged included).
  BiasParams bias;
  // Dropout on P (fwd, bwd, sparse and paged_fwd ops). The mask of (b, h, i, j)
  // uses stream bh = b * heads_q + h and in-sequence positions i, j.
  DropoutParams dropout;
};

// Backward. Inputs as in FwdParams plus dout (same layout as out) and the
// forward's out/lse. Outputs dq/dk/dv have the layouts of q/k/v (their own
// strides below). fp32 workspaces, allocated by the glue as sized by
// gpu::plan_bwd (cuda/launch.h), with "rows" = total_q / total_k (varlen) or
// batch * seqlen_q / batch * seqlen_k (dense; row = b * seqlen + i):
//   dsoftmax_sum  D = rowsum(dO * O), laid out like lse (written by the preprocess kernel)
//   dq_accum      dq_splits slices in the tiled layout of cuda/common/bwd_dq_layout.h;
//                 zeroed by the preprocess kernel
//   dk_accum, dv_accum  (dkv_copies, rows_k, heads_kv, head_dim), zero-filled by the glue;
//                 only when heads_per_cta < heads_q / heads_kv (else nullptr: the main
//                 kernel writes dk/dv directly)
struct BwdParams : FwdParams {
  const void* dout = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;

  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  float* dq_accum = nullptr;
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
  float* dsoftmax_sum = nullptr;
  // lse * log2(e), +inf where lse = -inf (rows that saw no key), laid out like
  // lse; written by the preprocess kernel, read by the main kernel.
  float* lse_log2 = nullptr;
  // Optional gradient of lse (laid out like lse; nullptr: zero): the preprocess
  // writes D - dlse, since d lse_i / d s_ij = P_ij gives dS = P (dP - D + dlse).
  const float* dlse = nullptr;
  // Work decomposition (from gpu::plan_bwd): each CTA handles heads_per_cta
  // q heads of one GQA group; deterministic runs use dq_splits grid columns
  // (one dq_accum slice each) and dkv_copies = group / heads_per_cta copies.
  int heads_per_cta = 1;
  int dq_splits = 1;
  int dkv_copies = 0;
  // dq bitwise reproducible run to run (no float atomics; see flash_bwd_kernel.cuh).
  bool deterministic = false;
  // bwd_partial: dq/dk/dv are fp32 tensors. dK/dV then always go through
  // dk_accum / dv_accum (plan_bwd), and the convert kernel stores fp32.
  bool grads_f32 = false;
  // Largest dynamic shared memory per block of the device (the glue's query):
  // the launcher pipelines dQ (gpu::run_bwd_hdim) where it fits.
  int smem_optin = 0;
  bool dq_pipelined = false;  // set by the launcher, not by callers
};

}  // namespace fastattn
