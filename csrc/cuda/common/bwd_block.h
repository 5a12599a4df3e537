// Per-CTA pieces shared by the backward main kernels (mma.sync in
// flash_bwd_kernel.cuh, wgmma in flash_bwd_sm90_kernel.cuh): one CTA owns a
// KV block of one (sequence, kv head) and a slot of that head's q heads.
//
//   BwdBlock::init(p, b, slot, n0, block_n, block_m, qs, ks)
//       sequence sizes, q heads of the slot, its kv head, the mask and the
//       query blocks [mb_begin, mb_end) that see any key of [n0, n0 + block_n), and
//       `sched`: the query blocks to visit (those, ascending; or the block mask's
//       transposed lists, p.sparse)
//   blk.k_rows<Elem>(p) / blk.v_rows<Elem>(p)         K / V row 0 of the sequence and kv head
//   blk.dk_block<Elem>(p) / blk.dv_block<Elem>(p)     dK / dV row n0 (the block's first key)
//   blk.head_sources<Elem>(p, hq, tid)                Q / dO row 0 of q head hq and the
//                                                     LSE / D entries thread tid copies
//   issue_lse_dsum<kBlockM>(p, lse, dsum, s_lse, s_dsum, m0, sq, tid)
//                                                     rows m0 + tid of LSE / D (cp.async;
//                                                     zero past the sequence)
//   add_dq_tiles(dst, acc, row_stride, deterministic, interior, rows_left, cols_left)
//                                                     adds m16 x n8 dQ fragments into dq_accum
//   add_dkv_partials(p, blk, dk, dv, r0, c0)          fp32 dK / dV partial sums (dk_accum /
//                                                     dv_accum) of this thread's fragments
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common/block_schedule.h"
#include "cuda/common/bwd_ptx.h"
#include "cuda/common/mask.h"
#include "cuda/common/ptx.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

template <typename Elem>
struct BwdHeadSources {
  const Elem* q;     // row 0 of the sequence, this q head
  const Elem* dout;  // likewise
  const float* lse;  // lse_log2 of row 0 + tid (threads tid < kBlockM copy a row each)
  const float* dsum;
};

struct BwdBlock {
  bool varlen;
  int b, sq, sk, n0;
  int group, hpc, hq0, hk;
  SeqBounds qs, ks;
  MaskPolicy mask;
  int mb_begin, mb_end;  // query blocks (of block_m rows) that see the KV block
  BlockSchedule sched;   // the query blocks this CTA visits per q head

  __device__ __forceinline__ void init(const BwdParams& p, int b_, int slot, int n0_, int block_n,
                                       int block_m, const SeqBounds& qs_, const SeqBounds& ks_) {
    varlen = p.cu_seqlens_q != nullptr;
    b = b_;
    qs = qs_;
    ks = ks_;
    sq = qs.len;
    sk = ks.len;
    n0 = n0_;
    group = p.heads_q / p.heads_kv;
    hpc = p.heads_per_cta;
    hq0 = slot * hpc;
    hk = hq0 / group;
    mask = MaskPolicy::make(p.mask, sq, sk);
    mb_begin = 0;
    mb_end = 0;
    if (sq > 0) {
      const int r_lo = mask.q_row_begin(n0, n0 + block_n);
      const int r_hi = mask.q_row_end(n0, n0 + block_n);
      if (r_hi > r_lo) {
        mb_begin = r_lo / block_m;
        mb_end = (r_hi + block_m - 1) / block_m;
      }
    }
    // Sparse lists are per q head: a CTA spanning several heads (hpc > 1) needs
    // a head-broadcast mask (the plan guarantees it).
    if (p.sparse.num == nullptr) {
      sched = BlockSchedule::dense(mb_begin, mb_end - mb_begin, false);
    } else if (sq <= 0 || n0 >= sk) {
      sched = BlockSchedule::dense(0, 0, false);
    } else {
      sched = BlockSchedule::sparse(p.sparse, b, hq0, n0 / p.sparse.block_kv,
                                    p.sparse.block_q / block_m, (sq + block_m - 1) / block_m);
    }
  }

  template <typename Elem>
  __device__ __forceinline__ const Elem* k_rows(const BwdParams& p) const {
    return static_cast<const Elem*>(p.k) + (varlen ? 0 : b * p.k_batch_stride) +
           ks.start * p.k_row_stride + hk * p.k_head_stride;
  }
  template <typename Elem>
  __device__ __forceinline__ const Elem* v_rows(const BwdParams& p) const {
    return static_cast<const Elem*>(p.v) + (varlen ? 0 : b * p.v_batch_stride) +
           ks.start * p.v_row_stride + hk * p.v_head_stride;
  }
  // dK / dV rows of the block's first key n0.
  template <typename Elem>
  __device__ __forceinline__ Elem* dk_block(const BwdParams& p) const {
    return static_cast<Elem*>(p.dk) + (varlen ? 0 : b * p.dk_batch_stride) +
           (ks.start + n0) * p.dk_row_stride + hk * p.dk_head_stride;
  }
  template <typename Elem>
  __device__ __forceinline__ Elem* dv_block(const BwdParams& p) const {
    return static_cast<Elem*>(p.dv) + (varlen ? 0 : b * p.dv_batch_stride) +
           (ks.start + n0) * p.dv_row_stride + hk * p.dv_head_stride;
  }
  template <typename Elem>
  __device__ __forceinline__ BwdHeadSources<Elem> head_sources(const BwdParams& p, int hq,
                                                               int tid) const {
    const int64_t off = b * p.lse_batch_stride + hq * p.lse_head_stride + qs.start + tid;
    return {static_cast<const Elem*>(p.q) + (varlen ? 0 : b * p.q_batch_stride) +
                qs.start * p.q_row_stride + hq * p.q_head_stride,
            static_cast<const Elem*>(p.dout) + (varlen ? 0 : b * p.do_batch_stride) +
                qs.start * p.do_row_stride + hq * p.do_head_stride,
            p.lse_log2 + off, p.dsoftmax_sum + off};
  }
};

// Rows m0 + tid of the pre-scaled LSE and of D into shared memory (threads
// tid < kBlockM); rows past the sequence read as zeros (their Q / dO rows are
// zero too, so their P^T dO and dS^T Q terms are exact zeros).
template <int kBlockM>
__device__ __forceinline__ void issue_lse_dsum(const BwdParams& p, const float* lse,
                                               const float* dsum, uint32_t s_lse, uint32_t s_dsum,
                                               int m0, int sq, int tid) {
  if (tid < kBlockM) {
    const bool ok = m0 + tid < sq;
    ptx::cp_async_4(s_lse + tid * 4, ok ? lse + m0 : p.lse_log2, ok);
    ptx::cp_async_4(s_dsum + tid * 4, ok ? dsum + m0 : p.dsoftmax_sum, ok);
  }
}

// Adds MT x NT m16n8 C fragments of dQ into dq_accum (common/bwd_dq_layout.h):
// dst is this thread's 4 floats of tile (0, 0), tile (mt, nt) is 16 mt padded
// rows (row_stride floats each) and 128 nt floats further. Interior blocks
// (every row inside the sequence, the full head dim) add without checks;
// otherwise a tile is added when its first row is inside the sequence
// (rows_left: rows from tile row 0 to the end; rows past the end add exact
// zeros) and its columns are inside the head dim (cols_left likewise).
// deterministic: plain load + add + store (the caller owns the slice).
template <int MT, int NT>
__device__ __forceinline__ void add_dq_tiles(float* dst, const float (&acc)[MT][NT][4],
                                             int64_t row_stride, bool deterministic,
                                             bool interior, int rows_left, int cols_left) {
  auto adds = [&](auto det, auto checked) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (decltype(checked)::value && mt * 16 >= rows_left) continue;
      float* tile_ptr = dst + int64_t(mt * 16) * row_stride;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (decltype(checked)::value && nt * 8 >= cols_left) continue;
        const float(&c)[4] = acc[mt][nt];
        if constexpr (decltype(det)::value) {
          ptx::rmw_add_f32x4(tile_ptr + nt * 128, c[0], c[1], c[2], c[3]);
        } else {
          ptx::red_add_f32x4(tile_ptr + nt * 128, c[0], c[1], c[2], c[3]);
        }
      }
    }
  };
  // Warp-uniform branches, hoisted out of the stores.
  if (deterministic) {
    if (interior) adds(std::true_type{}, std::false_type{});
    else adds(std::true_type{}, std::true_type{});
  } else {
    if (interior) adds(std::false_type{}, std::false_type{});
    else adds(std::false_type{}, std::true_type{});
  }
}

// fp32 dK / dV partial sums over a CTA's q heads (unscaled; the convert kernel
// scales dK) into dk_accum / dv_accum: this thread's fragments are kAccM m16
// tiles of keys from block row r0 (its own rows r0 + 16 mt, + 8) by kAccN n8
// tiles of the head dim from column c0 (its own columns c0 + 8 nt, + 1).
// Atomics by default; deterministic: one copy per head slot, plain stores.
template <int kAccM, int kAccN>
__device__ __forceinline__ void add_dkv_partials(const BwdParams& p, const BwdBlock& blk,
                                                 const float (&dk)[kAccM][kAccN][4],
                                                 const float (&dv)[kAccM][kAccN][4], int r0,
                                                 int c0) {
  const int64_t rows_k = blk.varlen ? p.total_k : int64_t(p.batch) * p.seqlen_k;
  const int64_t k_row0 = blk.varlen ? blk.ks.start : int64_t(blk.b) * p.seqlen_k;
  const int64_t rstride = int64_t(p.heads_kv) * p.head_dim;
  const int copy = p.deterministic ? (blk.hq0 / blk.hpc) % (blk.group / blk.hpc) : 0;
  const int64_t base =
      (int64_t(copy) * rows_k + k_row0 + blk.n0) * rstride + int64_t(blk.hk) * p.head_dim;
#pragma unroll
  for (int mt = 0; mt < kAccM; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + mt * 16 + h * 8;
      if (blk.n0 + r >= blk.sk) continue;
#pragma unroll
      for (int nt = 0; nt < kAccN; ++nt) {
        const int c = c0 + nt * 8;
        if (c >= p.head_dim) continue;
        float* pk = p.dk_accum + base + int64_t(r) * rstride + c;
        float* pv = p.dv_accum + base + int64_t(r) * rstride + c;
        if (p.deterministic) {
          *reinterpret_cast<float2*>(pk) = make_float2(dk[mt][nt][2 * h], dk[mt][nt][2 * h + 1]);
          *reinterpret_cast<float2*>(pv) = make_float2(dv[mt][nt][2 * h], dv[mt][nt][2 * h + 1]);
        } else {
          ptx::red_add_f32x2(pk, dk[mt][nt][2 * h], dk[mt][nt][2 * h + 1]);
          ptx::red_add_f32x2(pv, dv[mt][nt][2 * h], dv[mt][nt][2 * h + 1]);
        }
      }
    }
}

}  // namespace gpu
}  // namespace fastattn
