// The pieces of one query-block step that both sm90 backwards run per
// warpgroup of 64 keys (flash_bwd_sm90_kernel.cuh, where every thread also
// copies, and flash_bwd_ws_kernel.cuh, fed by a producer warpgroup). The
// kernels differ only in how tiles arrive, when stages are released and
// where the two warpgroups meet for dQ.
//
//   Step::issue_sdp(s, dp, sK, sV, q, dout, wg)    S^T = K_wg Q^T, dP^T = V_wg dO^T (SS)
//   Step::drop_bits(keep, p, blk, hq, m0, ...)     dropout flags (while S^T, dP^T run)
//   Step::p_and_ds(s, dp, pa, dsa, ..., keep)      P^T, dS^T = P^T o (dP^T - D) in place,
//                                                  dropout, softcap, mask, bits, bias grad;
//                                                  both as A fragments
//   Step::issue_dkv(dv, dk, pa, dsa, q, dout)      dV += P^T dO, dK += dS^T Q (RS)
//   Step::store_ds(ds_tile, dsa, key_row, t4)      this thread's dS^T into the [key][query] tile
//   Step::issue_dq(dq, ds_tile, sK, wg)            dQ = dS K for this warpgroup's part (SS)
// None of them commits or waits: the kernels batch and order the MMAs.
#pragma once
#include <cstdint>

#include "cuda/common/block_schedule.h"
#include "cuda/common/bwd_block.h"
#include "cuda/common/bwd_mask.h"
#include "cuda/common/dropout.h"
#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"
#include "cuda/common/score_bias.h"
#include "cuda/common/softcap.h"
#include "cuda/common/swizzled_tile_io.h"
#include "cuda/common/types.h"
#include "cuda/common/wgmma.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

// Shared-memory descriptors (layouts: wgmma.h).
struct BwdSm90Operands {
  static constexpr uint32_t kRowGroupBytes = 8 * 128;  // 8 swizzled rows
  // K-major: rows [row0, row0 + 64 or N) of a tile, head-dim columns 16 kk .. + 15.
  template <typename Tile>
  static __device__ __forceinline__ uint64_t k_major(uint32_t tile, int row0, int kk) {
    return wgmma::smem_desc_sw128(tile + (kk / 4) * Tile::kBoxBytes + row0 * 128 + (kk % 4) * 32,
                                  16, kRowGroupBytes);
  }
  // MN-major: rows (the contracted dim) 16 kk .. + 15, columns from box `box` on.
  template <typename Tile>
  static __device__ __forceinline__ uint64_t mn_major(uint32_t tile, int box, int kk) {
    return wgmma::smem_desc_sw128(tile + box * Tile::kBoxBytes + kk * 16 * 128, Tile::kBoxBytes,
                                  kRowGroupBytes);
  }
};

template <typename Traits, typename Elem>
struct BwdSm90Step {
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int NTS = Traits::kNTS;
  static constexpr int NTQ = Traits::kNTQ;
  static constexpr int KSQ = Traits::kKSQ;
  using KTile = typename Traits::KTile;
  using QTile = typename Traits::QTile;
  using DSTile = typename Traits::DSTile;
  using Ops = BwdSm90Operands;

  static __device__ __forceinline__ void issue_sdp(float (&s)[NTS][4], float (&dp)[NTS][4],
                                                   uint32_t sK, uint32_t sV, uint32_t q_addr,
                                                   uint32_t do_addr, int wg) {
#pragma unroll
    for (int kk = 0; kk < Traits::kKSD; ++kk) {
      wgmma::mma_ss<kBlockM, Elem>(s, Ops::k_major<KTile>(sK, wg * 64, kk),
                                   Ops::k_major<QTile>(q_addr, 0, kk), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < Traits::kKSD; ++kk) {
      wgmma::mma_ss<kBlockM, Elem>(dp, Ops::k_major<KTile>(sV, wg * 64, kk),
                                   Ops::k_major<QTile>(do_addr, 0, kk), kk > 0);
    }
  }

  // Columns of s / dp are queries m0 + 8 nt + 2 t4 (+ 1), rows keys n0 + key_row (+ 8).
  // lse_b / dsum_b: the query block's LSE (times log2 e; +inf for rows whose
  // P is exactly 0) and D in shared memory. sched_i: the block's index in blk.sched.
  static __device__ __forceinline__ void p_and_ds(float (&s)[NTS][4], float (&dp)[NTS][4],
                                                  uint32_t (&pa)[KSQ][4], uint32_t (&dsa)[KSQ][4],
                                                  const BwdParams& p, const BwdBlock& blk, int hq,
                                                  int m0, int sched_i, int key_row, int t4,
                                                  const float* lse_b, const float* dsum_b,
                                                  float scale_log2, const DropoutBitsT<NTS>& keep) {
    constexpr int kBlockN = Traits::kBlockN;
    const int n0 = blk.n0;
    // Dropout (keep: drop_bits' flags): dP of a dropped pair is 0 and of a
    // kept one dP * keep_scale (the forward's output only saw the kept, scaled
    // P); dS = P (dP~ - D) uses the undropped P, and dV the dropped, scaled one.
    const bool dropping = p.dropout.on();
    if (dropping) keep.apply(dp, p.dropout.keep_scale);
    // With a softcap, D is folded into dp here (softcap.h) and taken as 0 below.
    const bool capped = p.softcap_in != 0.f;
    if (capped) cap_scores_and_ds<NTS>(s, dp, dsum_b + 2 * t4, p.softcap_in, p.softcap_out);
    if (p.bias.on()) {
      add_bias_c_transposed<NTS>(s, p.bias, blk.b, hq, n0 + key_row, m0 + 2 * t4, blk.sq, blk.sk,
                                 1.f / p.scale);
    }
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const float2 l2 = *reinterpret_cast<const float2*>(lse_b + nt * 8 + 2 * t4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s[nt][2 * h] = ptx::ex2_approx(fmaf(s[nt][2 * h], scale_log2, -l2.x));
        s[nt][2 * h + 1] = ptx::ex2_approx(fmaf(s[nt][2 * h + 1], scale_log2, -l2.y));
      }
    }
    if (blk.mask.tile_needs_mask(m0, m0 + kBlockM, n0, n0 + kBlockN)) {
      zero_invisible_c_transposed<NTS>(s, blk.mask, n0 + key_row, m0 + 2 * t4);
    }
    if (const uint32_t* bits = blk.sched.partial_bits(p.sparse, sched_i)) {
      zero_unset_bits_c_transposed<NTS>(s, bits, p.sparse.words, n0 % p.sparse.block_kv + key_row,
                                        m0 - blk.sched.block(sched_i) * p.sparse.block_q + 2 * t4);
    }
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const float2 d2 =
          capped ? make_float2(0.f, 0.f) : *reinterpret_cast<const float2*>(dsum_b + nt * 8 + 2 * t4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        dp[nt][2 * h] = s[nt][2 * h] * (dp[nt][2 * h] - d2.x);
        dp[nt][2 * h + 1] = s[nt][2 * h + 1] * (dp[nt][2 * h + 1] - d2.y);
      }
    }
    if (p.bias.grad != nullptr) {
      store_bias_grad_c_transposed<NTS>(dp, p.bias, blk.b, hq, n0 + key_row, m0 + 2 * t4, blk.sq,
                                        blk.sk);
    }
    if (dropping) keep.apply(s, p.dropout.keep_scale);
#pragma unroll
    for (int kk = 0; kk < KSQ; ++kk) {
      c_pair_to_a<Elem>(pa[kk], s[2 * kk], s[2 * kk + 1]);
      c_pair_to_a<Elem>(dsa[kk], dp[2 * kk], dp[2 * kk + 1]);
    }
  }

  // The dropout flags of this thread's S^T / dP^T fragments (p.dropout on):
  // independent of the scores, so the kernels draw them while the tensor
  // cores compute S^T and dP^T.
  static __device__ __forceinline__ void drop_bits(DropoutBitsT<NTS>& keep, const BwdParams& p,
                                                   const BwdBlock& blk, int hq, int m0, int key_row,
                                                   int t4) {
    keep.compute(DropoutTile::make(p.dropout, int64_t(blk.b) * p.heads_q + hq), blk.n0 + key_row,
                 m0 + 2 * t4);
  }

  // dV += P^T dO, dK += dS^T Q: this warpgroup's 64 keys, all head-dim columns.
  static __device__ __forceinline__ void issue_dkv(float (&acc_dv)[1][Traits::kNTD][4],
                                                   float (&acc_dk)[1][Traits::kNTD][4],
                                                   const uint32_t (&pa)[KSQ][4],
                                                   const uint32_t (&dsa)[KSQ][4], uint32_t q_addr,
                                                   uint32_t do_addr) {
#pragma unroll
    for (int kk = 0; kk < KSQ; ++kk) {
      wgmma::mma_rs_tb<Traits::kHeadDim, Elem>(acc_dv[0], pa[kk],
                                               Ops::mn_major<QTile>(do_addr, 0, kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < KSQ; ++kk) {
      wgmma::mma_rs_tb<Traits::kHeadDim, Elem>(acc_dk[0], dsa[kk],
                                               Ops::mn_major<QTile>(q_addr, 0, kk), 1);
    }
  }

  // This thread's dS^T values (keys key_row, key_row + 8) into the generic
  // view of the [key][query] tile; the writer fences them for the async proxy.
  static __device__ __forceinline__ void store_ds(char* ds_tile, const uint32_t (&dsa)[KSQ][4],
                                                  int key_row, int t4) {
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const int c = nt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(ds_tile + swizzled_offset<DSTile>(key_row, c)) =
          dsa[nt / 2][(nt & 1) * 2];
      *reinterpret_cast<uint32_t*>(ds_tile + swizzled_offset<DSTile>(key_row + 8, c)) =
          dsa[nt / 2][(nt & 1) * 2 + 1];
    }
  }

  // dQ = dS K of the whole dS^T tile at ds: query rows / head-dim columns of
  // warpgroup wg (kDqSplitsD: its half of the head dim, else its 64 rows).
  static __device__ __forceinline__ void issue_dq(float (&acc)[1][NTQ][4], uint32_t ds,
                                                  uint32_t sK, int wg) {
#pragma unroll
    for (int kk = 0; kk < Traits::kKSN; ++kk) {
      wgmma::mma_ss<Traits::kDqN, Elem, true>(
          acc[0], Ops::mn_major<DSTile>(ds, Traits::kDqSplitsD ? 0 : wg, kk),
          Ops::mn_major<KTile>(sK, Traits::kDqSplitsD ? wg : 0, kk), kk > 0);
    }
  }
};

}  // namespace gpu
}  // namespace fastattn
