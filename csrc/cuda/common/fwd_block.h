// Where one forward CTA's query block lives and which KV blocks it visits:
// the setup shared by the sm80 (mma.sync) and sm90 (wgmma) forward kernels.
//
//   FwdBlock<Elem, kPaged> blk;
//   if (!blk.init(p, b, h, m_block, kBlockM, kBlockN)) return;   // no query rows (CTA-uniform)
//   blk.q / blk.o / blk.lse          row m0 of this (sequence, head) in q, out, lse
//   blk.sq, blk.sk, blk.m0, blk.m1   lengths; the block's rows [m0, m1) (m1 clamped to sq)
//   blk.mask                         the mask policy of this sequence
//   for n in [blk.n_begin, blk.n_end)  the KV blocks some row of the block sees
//   blk.schedule<kBlockN>(p, b, h)   the KV tiles to visit: those, last first (dense), or the
//                                    block mask's lists (p.sparse)
//   blk.k_rows(p, b), blk.v_rows(p, b) key row 0 of this KV head (contiguous k/v only)
#pragma once
#include <cstdint>

#include "cuda/common/block_schedule.h"
#include "cuda/common/mask.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

// Keys of sequence b: contiguous rows [start, start + len) of k/v (dense or
// varlen), or the paged sequence's seqlens_k[b] keys from key row 0.
template <bool kPaged>
__device__ __forceinline__ SeqBounds fwd_key_bounds(const FwdParams& p, int b) {
  if constexpr (kPaged) {
    SeqBounds r;
    r.start = 0;
    const int v = p.seqlens_k != nullptr ? p.seqlens_k[b] : p.seqlen_k;
    r.len = v < 0 ? 0 : (v > p.seqlen_k ? p.seqlen_k : v);
    return r;
  } else {
    return seq_bounds(p.cu_seqlens_k, b, p.seqlen_k, p.seqlen_k, p.total_k);
  }
}

// O fragments straight to global fp32 (fwd_partial), skipping the 16-bit
// round trip through shared memory: this thread's rows r and r + 8 of the
// tile at o (rows < `rows` only), columns 8 dt + col_lane and + 1 (< head_dim,
// a multiple of 8), as every forward kernel's accumulators hold them.
template <int DT>
__device__ __forceinline__ void store_o_f32(float* o, int64_t row_stride, const float (&acc)[DT][4],
                                            int r, int col_lane, int rows, int head_dim) {
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int c = dt * 8 + col_lane;
    if (c >= head_dim) continue;
    if (r < rows) {
      *reinterpret_cast<float2*>(o + int64_t(r) * row_stride + c) = make_float2(acc[dt][0], acc[dt][1]);
    }
    if (r + 8 < rows) {
      *reinterpret_cast<float2*>(o + int64_t(r + 8) * row_stride + c) =
          make_float2(acc[dt][2], acc[dt][3]);
    }
  }
}

template <typename Elem, bool kPaged>
struct FwdBlock {
  bool varlen;
  SeqBounds qs, ks;
  int sq, sk, m0, m1, hk;
  const Elem* q;
  Elem* o;
  float* o32;  // fwd_partial's fp32 O at the same element offset, else nullptr
  float* lse;
  MaskPolicy mask;
  int n_begin, n_end;

  __device__ __forceinline__ bool init(const FwdParams& p, int b, int h, int m_block, int block_m,
                                       int block_n) {
    varlen = p.cu_seqlens_q != nullptr;
    qs = seq_bounds(p.cu_seqlens_q, b, p.seqlen_q, p.seqlen_q, p.total_q);
    sq = qs.len;
    m0 = m_block * block_m;
    if (m0 >= sq) return false;
    ks = fwd_key_bounds<kPaged>(p, b);
    sk = ks.len;
    hk = h / (p.heads_q / p.heads_kv);
    q = static_cast<const Elem*>(p.q) + (varlen ? 0 : b * p.q_batch_stride) +
        (qs.start + m0) * p.q_row_stride + h * p.q_head_stride;
    const int64_t o_offset = (varlen ? 0 : b * p.o_batch_stride) +
                             (qs.start + m0) * p.o_row_stride + h * p.o_head_stride;
    o = static_cast<Elem*>(p.out) + o_offset;
    o32 = p.out_f32 != nullptr ? p.out_f32 + o_offset : nullptr;
    lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + (varlen ? qs.start : 0) + m0;
    mask = MaskPolicy::make(p.mask, sq, sk);
    m1 = (m0 + block_m < sq) ? m0 + block_m : sq;
    n_begin = 0;
    n_end = 0;
    if (sk > 0) {
      n_begin = mask.kv_block_begin(m0, m1, block_n);
      n_end = mask.kv_block_end(m0, m1, block_n);
    }
    return true;
  }

  template <int kBlockN>
  __device__ __forceinline__ BlockSchedule schedule(const FwdParams& p, int b, int h) const {
    if (p.sparse.num == nullptr) return BlockSchedule::dense(n_begin, n_end - n_begin, true);
    if (sk <= 0) return BlockSchedule::dense(0, 0, true);
    return BlockSchedule::sparse(p.sparse, b, h, m0 / p.sparse.block_q, p.sparse.block_kv / kBlockN,
                                 (sk + kBlockN - 1) / kBlockN);
  }

  __device__ __forceinline__ const Elem* k_rows(const FwdParams& p, int b) const {
    return static_cast<const Elem*>(p.k) + (varlen ? 0 : b * p.k_batch_stride) +
           ks.start * p.k_row_stride + hk * p.k_head_stride;
  }
  __device__ __forceinline__ const Elem* v_rows(const FwdParams& p, int b) const {
    return static_cast<const Elem*>(p.v) + (varlen ? 0 : b * p.v_batch_stride) +
           ks.start * p.v_row_stride + hk * p.v_head_stride;
  }
};

}  // namespace gpu
}  // namespace fastattn
