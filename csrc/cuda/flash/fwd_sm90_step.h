// The pieces of one KV step that both sm90 forwards run per warpgroup of 64
// query rows (flash_fwd_sm90_kernel.cuh, where every thread also copies, and
// flash_fwd_ws_kernel.cuh, fed by a producer warpgroup): the two MMA batches,
// what happens to the raw scores, P as A fragments, and the epilogue's
// fragment stores. The kernels differ only in how tiles arrive and when
// stages are released.
//
//   Step::issue_qk(s, q_addr, k_addr, wg)      S = Q K^T, one commit group
//   Step::issue_pv(o, pa, v_addr)              O += P V, one commit group
//   Step::modify_scores(s, p, blk, sched, i, n, b, h, row0, col_lane)
//                                              bias, element mask, partial-block bits
//   Step::p_to_a(pa, s)                        P (fp32 C fragments) -> A fragments
//   Step::store_lse(blk, lse, row, sq)         LSE of this thread's two rows (lane % 4 == 0)
//   Step::write_o<Tile>(smem, o, r, col_lane)  O fragments into a swizzled tile, rows r, r + 8
#pragma once
#include <cstdint>

#include "cuda/common/block_schedule.h"
#include "cuda/common/fragment.h"
#include "cuda/common/fwd_block.h"
#include "cuda/common/mask.h"
#include "cuda/common/score_bias.h"
#include "cuda/common/softcap.h"
#include "cuda/common/swizzled_tile_io.h"
#include "cuda/common/types.h"
#include "cuda/common/wgmma.h"

namespace fastattn {
namespace gpu {

// Shared-memory descriptors of the three operands (see wgmma.h for the layout).
template <typename Traits>
struct FwdSm90Operands {
  using QTile = typename Traits::QTile;
  using KTile = typename Traits::KTile;
  static constexpr uint32_t kRowGroupBytes = 8 * 128;  // 8 swizzled rows

  // Q rows of warpgroup wg, head-dim columns 16 kk .. 16 kk + 15.
  static __device__ __forceinline__ uint64_t q(uint32_t q_addr, int wg, int kk) {
    return wgmma::smem_desc_sw128(q_addr + (kk / 4) * QTile::kBoxBytes + wg * 64 * 128 + (kk % 4) * 32,
                                  16, kRowGroupBytes);
  }
  // All kBlockN keys, head-dim columns 16 kk .. 16 kk + 15.
  static __device__ __forceinline__ uint64_t k(uint32_t k_addr, int kk) {
    return wgmma::smem_desc_sw128(k_addr + (kk / 4) * KTile::kBoxBytes + (kk % 4) * 32, 16,
                                  kRowGroupBytes);
  }
  // Keys 16 kk .. 16 kk + 15, all head-dim columns (64-column boxes one box apart).
  static __device__ __forceinline__ uint64_t v(uint32_t v_addr, int kk) {
    return wgmma::smem_desc_sw128(v_addr + kk * 16 * 128, Traits::VTile::kBoxBytes, kRowGroupBytes);
  }
};

template <typename Traits, typename Elem>
struct FwdSm90Step {
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int NT = Traits::kNT;
  static constexpr int DT = Traits::kDT;
  static constexpr int KS = Traits::kKS;
  static constexpr int KV = Traits::kKV;
  using Ops = FwdSm90Operands<Traits>;

  static __device__ __forceinline__ void issue_qk(float (&s)[NT][4], uint32_t q_addr,
                                                  uint32_t k_addr, int wg) {
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      wgmma::mma_ss<kBlockN, Elem>(s, Ops::q(q_addr, wg, kk), Ops::k(k_addr, kk), kk > 0);
    }
    wgmma::commit();
  }

  static __device__ __forceinline__ void issue_pv(float (&o)[DT][4], const uint32_t (&pa)[KV][4],
                                                  uint32_t v_addr) {
    wgmma::fence();  // P and a rescaled O come from ordinary instructions
#pragma unroll
    for (int kk = 0; kk < KV; ++kk) {
      wgmma::mma_rs_tb<Traits::kHeadDim, Elem>(o, pa[kk], Ops::v(v_addr, kk), 1);
    }
    wgmma::commit();
  }

  // Raw scores of KV tile n (step i of sched) for rows row0, row0 + 8: the
  // softcap, additive bias, the mask policy where the tile needs it, and a
  // partial block's bits.
  static __device__ __forceinline__ void modify_scores(float (&s)[1][NT][4], const FwdParams& p,
                                                       const FwdBlock<Elem, false>& blk,
                                                       const BlockSchedule& sched, int i, int n,
                                                       int b, int h, int row0, int col_lane) {
    const int c0 = n * kBlockN;
    if (p.softcap_in != 0.f) cap_scores(s, p.softcap_in, p.softcap_out);
    if (p.bias.on()) {
      add_bias_c<1, NT>(s, p.bias, b, h, row0, c0 + col_lane, blk.sq, blk.sk, 1.f / p.scale);
    }
    if (blk.mask.tile_needs_mask(blk.m0, blk.m1, c0, c0 + kBlockN)) {
      apply_mask_c<1, NT>(s, blk.mask, row0, c0 + col_lane);
    }
    if (const uint32_t* bits = sched.partial_bits(p.sparse, i)) {
      apply_bits_c<1, NT>(s, bits, p.sparse.words, row0 - blk.m0 + blk.m0 % p.sparse.block_q,
                          c0 - sched.block(i) * p.sparse.block_kv + col_lane);
    }
  }

  static __device__ __forceinline__ void p_to_a(uint32_t (&pa)[KV][4], const float (&s)[1][NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KV; ++kk) c_pair_to_a<Elem>(pa[kk], s[0][2 * kk], s[0][2 * kk + 1]);
  }

  // row: this thread's first row within the query block (rows row, row + 8).
  static __device__ __forceinline__ void store_lse(const FwdBlock<Elem, false>& blk,
                                                   const float (&lse)[2], int row, int lane) {
    if ((lane & 3) == 0) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = row + hh * 8;
        if (blk.m0 + r < blk.sq) blk.lse[r] = lse[hh];
      }
    }
  }

  template <typename Tile>
  static __device__ __forceinline__ void write_o(char* smem, const float (&o)[1][DT][4], int r,
                                                 int col_lane) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + col_lane;
      *reinterpret_cast<uint32_t*>(smem + swizzled_offset<Tile>(r, c)) =
          pack2<Elem>(o[0][dt][0], o[0][dt][1]);
      *reinterpret_cast<uint32_t*>(smem + swizzled_offset<Tile>(r + 8, c)) =
          pack2<Elem>(o[0][dt][2], o[0][dt][3]);
    }
  }
};

}  // namespace gpu
}  // namespace fastattn
