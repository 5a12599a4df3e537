// FlashAttention-2 backward for sm90 (Hopper): the sm80 kernel's algorithm
// (flash_bwd_kernel.cuh: one CTA per KV block, P recomputed from the stored
// LSE, dK / dV in registers, dQ as fp32 adds into dq_accum) with all five
// GEMMs on warpgroup MMAs (wgmma, common/wgmma.h). Same params, work plan,
// grid and CTA order (common/bwd_cta_order.h), masks, varlen, GQA head slots,
// strides, deterministic mode and dk/dv accumulators.
//
// Two warpgroups; warpgroup wg owns the 64 keys n0 + 64 wg .. + 63 of the
// kBlockN = 128-key block. Tiles are SwizzledTile128 in shared memory, filled
// by cp.async (any stride, zero-filled tails and padded head dims): K and V
// once, Q / dO / LSE / D per query block in two buffers, dS^T in two buffers.
// Per query block i of kBlockM rows (accumulator layout = mma.sync C layout,
// so the sm80 mask helper applies unchanged):
//   S^T  = K_wg Q_i^T, dP^T = V_wg dO_i^T      (SS; K-major operands)
//   P^T  = exp2(S^T scale log2e - lse_i log2e), dS^T = P^T o (dP^T - D_i)
//   dV_wg += P^T dO_i, dK_wg += dS^T Q_i        (RS: P^T / dS^T from registers,
//                                                dO / Q read MN-major)
//   dS^T -> shared memory, and one iteration later, once both warpgroups'
//   halves are there (the barrier at the top of i + 1):
//   dQ_i += dS_i K                              (SS; dS^T and K read MN-major)
// dQ of block i - 1 is issued and added into dq_accum at the top of
// iteration i, before S^T / dP^T of block i.
// kBlockM = 64 (hdim 128): the two warpgroups split dQ's head dim;
// kBlockM = 128 (hdim 64): they split its query rows.
// One barrier per iteration: at barrier i, Q / dO / LSE / D of i landed,
// every warpgroup is done with the MMAs of i - 1 (so their Q / dO buffer
// takes the loads of i + 1) and has written and fenced dS^T of i - 1.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common/bwd_block.h"
#include "cuda/common/bwd_cta_order.h"
#include "cuda/common/bwd_dq_layout.h"
#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"
#include "cuda/common/swizzled_tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/common/wgmma.h"
#include "cuda/common/params.h"
#include "cuda/flash/bwd_sm90_step.h"

// Dev variant (-DFASTATTN_BWD_SM90_DQ_OVERLAP=1): issue the previous block's
// dQ GEMM together with S^T / dP^T and run its fp32 adds while those are on
// the tensor cores. With dK, dV, S^T, dP^T and dQ live at once ptxas spills
// (208 bytes per thread at head dim 128) and serializes the MMAs, so the
// default issues and drains dQ first.
#ifndef FASTATTN_BWD_SM90_DQ_OVERLAP
#define FASTATTN_BWD_SM90_DQ_OVERLAP 0
#endif

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kBlockM_>
struct BwdSm90Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per iteration
  static constexpr int kBlockN = 128;       // keys per CTA: 64 per warpgroup
  static constexpr int kThreads = 256;
  static constexpr int kNTS = kBlockM / 8;   // n8 tiles of a warp's S^T / dP^T
  static constexpr int kNTD = kHeadDim / 8;  // n8 tiles of a warp's dK / dV
  static constexpr int kKSD = kHeadDim / 16; // k16 steps of S^T / dP^T
  static constexpr int kKSQ = kBlockM / 16;  // k16 steps of dV / dK
  static constexpr int kKSN = kBlockN / 16;  // k16 steps of dQ
  // dQ (kBlockM x kHeadDim) per warpgroup: one m64 tile, so a 64-row query
  // block splits the head dim and a 128-row one the rows.
  static constexpr bool kDqSplitsD = kBlockM == 64;
  static constexpr int kDqN = kDqSplitsD ? kHeadDim / 2 : kHeadDim;
  static constexpr int kNTQ = kDqN / 8;  // n8 tiles of a warp's dQ
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma widths compiled in wgmma.h");
  static_assert(kBlockM == 64 || kBlockM == 128, "one or two m64 dQ tiles");
  static_assert(kDqN == 64 || kDqN == 128, "wgmma widths compiled in wgmma.h");

  using KTile = SwizzledTile128<kBlockN, kHeadDim>;  // K, V; dK / dV staging
  using QTile = SwizzledTile128<kBlockM, kHeadDim>;  // Q, dO
  using DSTile = SwizzledTile128<kBlockN, kBlockM>;  // dS^T, [key][query]
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + KTile::kBytes;
  static constexpr int kOffQ = kOffV + KTile::kBytes;        // 2 buffers
  static constexpr int kOffDO = kOffQ + 2 * QTile::kBytes;    // 2 buffers
  static constexpr int kOffDS = kOffDO + 2 * QTile::kBytes;   // 2 buffers
  static constexpr int kOffLse = kOffDS + 2 * DSTile::kBytes; // float[2][kBlockM]
  static constexpr int kOffDsum = kOffLse + 2 * kBlockM * 4;  // float[2][kBlockM]
  // + 1024: the dynamic shared memory base is only 16-byte aligned and every
  // swizzle box needs a 1024-byte boundary.
  static constexpr int kSmemBytes = kOffDsum + 2 * kBlockM * 4 + 1024;
};

template <typename Traits, typename Elem>
__device__ __forceinline__ void flash_bwd_sm90_kv_block(const BwdParams& p, char* smem,
                                                        uint32_t s_base, int b, int slot,
                                                        int n_block, int dq_slice,
                                                        const SeqBounds& qs, const SeqBounds& ks) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int NTS = Traits::kNTS;
  constexpr int NTD = Traits::kNTD;
  constexpr int NTQ = Traits::kNTQ;
  using KTile = typename Traits::KTile;
  using QTile = typename Traits::QTile;
  using DSTile = typename Traits::DSTile;
  using Step = BwdSm90Step<Traits, Elem>;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int wg = tid >> 7;
  const int wq = (tid >> 5) & 3;  // warp within the warpgroup: m16 rows 16 wq ..
  const int g = lane >> 2;
  const int t4 = lane & 3;

  BwdBlock blk;
  blk.init(p, b, slot, n_block * kBlockN, kBlockN, kBlockM, qs, ks);
  const int sq = blk.sq;
  const int sk = blk.sk;
  const int n0 = blk.n0;
  const int hq0 = blk.hq0;
  const int head_dim = p.head_dim;

  const uint32_t sK = s_base + Traits::kOffK;
  const uint32_t sV = s_base + Traits::kOffV;
  const uint32_t sQ0 = s_base + Traits::kOffQ;
  const uint32_t sDO0 = s_base + Traits::kOffDO;
  const uint32_t sDS0 = s_base + Traits::kOffDS;
  const uint32_t sLse0 = s_base + Traits::kOffLse;
  const uint32_t sDsum0 = s_base + Traits::kOffDsum;
  const float* lse_smem = reinterpret_cast<const float*>(smem + Traits::kOffLse);
  const float* dsum_smem = reinterpret_cast<const float*>(smem + Traits::kOffDsum);

  // The previous KV block of this CTA may still read the dK/dV staging (sK, sV).
  __syncthreads();
  {
    SwizzledTileLoader<kThreads, KTile, Elem> ld;
    ld.init(blk.k_rows<Elem>(p), p.k_row_stride, head_dim, tid);
    ld.load(sK, n0, sk);
    ld.init(blk.v_rows<Elem>(p), p.v_row_stride, head_dim, tid);
    ld.load(sV, n0, sk);
  }
  ptx::cp_async_commit();

  const BlockSchedule& sched = blk.sched;
  const int per_head = sched.count();  // query blocks per q head
  const int n_iter = per_head * blk.hpc;

  // Q / dO loaders and this thread's LSE / D sources of one q head, set up once per head.
  SwizzledTileLoader<kThreads, QTile, Elem> q_ld, do_ld;
  const float* lse_src = p.lse_log2;
  const float* dsum_src = p.dsoftmax_sum;
  auto set_head = [&](int hq) {
    const BwdHeadSources<Elem> src = blk.head_sources<Elem>(p, hq, tid);
    q_ld.init(src.q, p.q_row_stride, head_dim, tid);
    do_ld.init(src.dout, p.do_row_stride, head_dim, tid);
    lse_src = src.lse;
    dsum_src = src.dsum;
  };
  // Rows past the sequence arrive as zeros (Q, dO, LSE, D), which makes their
  // dV / dK / dQ contributions exact zeros.
  auto issue_q = [&](int m0, int buf) {
    q_ld.load(sQ0 + buf * QTile::kBytes, m0, sq);
    do_ld.load(sDO0 + buf * QTile::kBytes, m0, sq);
    issue_lse_dsum<kBlockM>(p, lse_src, dsum_src, sLse0 + buf * kBlockM * 4,
                            sDsum0 + buf * kBlockM * 4, m0, sq, tid);
  };

  // dK / dV of this warpgroup's 64 keys (one m64 accumulator each).
  float acc_dk[1][NTD][4];
  float acc_dv[1][NTD][4];
#pragma unroll
  for (int i = 0; i < NTD; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[0][i][e] = 0.f;
      acc_dv[0][i][e] = 0.f;
    }

  // dQ of this thread: query rows dq_r0 + g (+ 8), head-dim columns dq_c0 +
  // 8 nt + 2 t4 (+ 1), as fragment-ordered tiles of dq_accum (bwd_dq_layout.h).
  const int dq_r0 = (Traits::kDqSplitsD ? 0 : wg * 64) + wq * 16;
  const int dq_c0 = Traits::kDqSplitsD ? wg * Traits::kDqN : 0;
  const int64_t dq_rstride = int64_t(p.heads_q) * head_dim;  // floats per padded row
  const int64_t dq_slice_stride =
      dq_pad_rows(blk.varlen, p.batch, p.seqlen_q, p.total_q) * dq_rstride;
  float* const dq_thread =
      p.dq_accum + dq_slice * dq_slice_stride +
      (dq_pad_start(blk.varlen, b, p.seqlen_q, blk.qs.start) + dq_r0) * dq_rstride +
      (dq_c0 / 8) * 128 + lane * 4;
  const bool full_d = head_dim == Traits::kHeadDim;
  // Adds the dQ tile of query block m0, q head hq into dq_accum.
  auto store_dq = [&](const float(&acc)[1][NTQ][4], int m0, int hq) {
    add_dq_tiles(dq_thread + int64_t(m0) * dq_rstride + int64_t(hq) * 16 * head_dim, acc,
                 dq_rstride, p.deterministic, full_d && m0 + kBlockM <= sq, sq - m0 - dq_r0,
                 head_dim - dq_c0);
  };
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = p.scale * kLog2e;
  const int key_row = wg * 64 + wq * 16 + g;  // this thread's keys: n0 + key_row (+ 8)

  int cur_t = 0, cur_i = 0;
  int nxt_t = 0, nxt_i = 0;
  int prev_m0 = 0, prev_hq = hq0;
  // Query tiles in Q buffers 0 / 1 and the tile after the last one issued,
  // read a step early (TileLookahead's reason, block_schedule.h).
  int q_tile0 = 0, q_tile1 = 0, tile_ahead = 0;
  if (n_iter > 0) {
    set_head(hq0);
    q_tile0 = sched.tile(0);
    tile_ahead = sched.tile(per_head > 1 ? 1 : 0);
    issue_q(q_tile0 * kBlockM, 0);
    ptx::cp_async_commit();
  }

  for (int it = 0; it < n_iter; ++it) {
    const int buf = it & 1;
    const int hq = hq0 + cur_t;
    const int m0 = (buf ? q_tile1 : q_tile0) * kBlockM;
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async();  // own cp.async writes -> visible to wgmma (async proxy) reads
    __syncthreads();
    if (it + 1 < n_iter) {
      if (++nxt_i == per_head) {
        nxt_i = 0;
        ++nxt_t;
        set_head(hq0 + nxt_t);
      }
      const int t = tile_ahead;
      if (buf) q_tile0 = t;
      else q_tile1 = t;
      tile_ahead = sched.tile(nxt_i + 1 < per_head ? nxt_i + 1 : 0);
      issue_q(t * kBlockM, buf ^ 1);
      ptx::cp_async_commit();
    }
    const uint32_t q_addr = sQ0 + buf * QTile::kBytes;
    const uint32_t do_addr = sDO0 + buf * QTile::kBytes;

#if FASTATTN_BWD_SM90_DQ_OVERLAP
    float acc_dq[1][NTQ][4];
#endif
    float s[NTS][4];
    float dp[NTS][4];
#if !FASTATTN_BWD_SM90_DQ_OVERLAP
    if (it > 0) {
      float acc_dq[1][NTQ][4];
      wgmma::fence();
      Step::issue_dq(acc_dq, sDS0 + (buf ^ 1) * DSTile::kBytes, sK, wg);
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::hold(acc_dq[0]);
      store_dq(acc_dq, prev_m0, prev_hq);
    }
#endif
    wgmma::fence();
#if FASTATTN_BWD_SM90_DQ_OVERLAP
    if (it > 0) {
      Step::issue_dq(acc_dq, sDS0 + (buf ^ 1) * DSTile::kBytes, sK, wg);
      wgmma::commit();
    }
#endif
    Step::issue_sdp(s, dp, sK, sV, q_addr, do_addr, wg);
    wgmma::commit();
    DropoutBitsT<NTS> keep;
    if (p.dropout.on()) Step::drop_bits(keep, p, blk, hq, m0, key_row, t4);
#if FASTATTN_BWD_SM90_DQ_OVERLAP
    if (it > 0) {
      wgmma::wait<1>();  // dQ of the previous block done; S^T / dP^T may still run
      wgmma::hold(acc_dq[0]);
      store_dq(acc_dq, prev_m0, prev_hq);
    }
#endif
    wgmma::wait<0>();
    wgmma::hold(s);
    wgmma::hold(dp);

    // ---- P^T and dS^T in place (s -> P^T, dp -> dS^T); columns are queries.
    const float* lse_b = lse_smem + buf * kBlockM;
    const float* dsum_b = dsum_smem + buf * kBlockM;
    uint32_t pa[Traits::kKSQ][4];
    uint32_t dsa[Traits::kKSQ][4];
    Step::p_and_ds(s, dp, pa, dsa, p, blk, hq, m0, cur_i, key_row, t4, lse_b, dsum_b, scale_log2,
                   keep);

    // ---- dV += P^T dO, dK += dS^T Q (this warpgroup's 64 keys, all head-dim columns)
    wgmma::fence();
    Step::issue_dkv(acc_dv, acc_dk, pa, dsa, q_addr, do_addr);
    wgmma::commit();

    // dS^T -> shared memory for the dQ of the next iteration (both warpgroups' keys).
    Step::store_ds(smem + Traits::kOffDS + buf * DSTile::kBytes, dsa, key_row, t4);
    ptx::fence_proxy_async();  // dS^T stores -> visible to the dQ wgmma after the barrier
    wgmma::wait<0>();          // Q / dO of this buffer are free for the loads of it + 2
    wgmma::hold(acc_dv[0]);
    wgmma::hold(acc_dk[0]);
    wgmma::hold(pa);
    wgmma::hold(dsa);

    prev_m0 = m0;
    prev_hq = hq;
    if (++cur_i == per_head) {
      cur_i = 0;
      ++cur_t;
    }
  }

  if (n_iter > 0) {
    __syncthreads();  // the last dS^T is complete
    float acc_dq[1][NTQ][4];
    wgmma::fence();
    Step::issue_dq(acc_dq, sDS0 + ((n_iter - 1) & 1) * DSTile::kBytes, sK, wg);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::hold(acc_dq[0]);
    store_dq(acc_dq, prev_m0, prev_hq);
  }

  // ---- epilogue: dK (times scale) and dV of this KV block
  ptx::cp_async_wait<0>();  // K/V may still be in flight when no query block saw them
  if (p.dk_accum == nullptr) {
    __syncthreads();  // every warpgroup's MMAs that read sK / sV have completed
    const float scale = p.scale;
#pragma unroll
    for (int nt = 0; nt < NTD; ++nt) {
      const int c = nt * 8 + 2 * t4;
      const float(&dk)[4] = acc_dk[0][nt];
      const float(&dv)[4] = acc_dv[0][nt];
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + swizzled_offset<KTile>(key_row, c)) =
          pack2<Elem>(dk[0] * scale, dk[1] * scale);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + swizzled_offset<KTile>(key_row + 8, c)) =
          pack2<Elem>(dk[2] * scale, dk[3] * scale);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + swizzled_offset<KTile>(key_row, c)) =
          pack2<Elem>(dv[0], dv[1]);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + swizzled_offset<KTile>(key_row + 8, c)) =
          pack2<Elem>(dv[2], dv[3]);
    }
    __syncthreads();
    store_swizzled_tile<kThreads, KTile>(blk.dk_block<Elem>(p), p.dk_row_stride,
                                         smem + Traits::kOffK, sk - n0, head_dim, tid);
    store_swizzled_tile<kThreads, KTile>(blk.dv_block<Elem>(p), p.dv_row_stride,
                                         smem + Traits::kOffV, sk - n0, head_dim, tid);
  } else {
    add_dkv_partials(p, blk, acc_dk, acc_dv, key_row, 2 * t4);
  }
}

// Launch bounds double as a capability tag, as for the sm90 forward: only
// sm_90a machine code has the real kernel; the host launches it only where
// the image the device runs reports kThreads (kernel_select.h, sm90_body_runnable).
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(FASTATTN_WGMMA_AVAILABLE ? Traits::kThreads : 32, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ BwdParams p, const int cta_group) {
#if FASTATTN_WGMMA_AVAILABLE
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t raw = ptx::smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  char* smem = smem_raw + pad;
  const BwdCtaStart c = bwd_cta_start(cta_group);
  const int dq_slice = p.deterministic ? c.n_first : 0;
  for (int b = c.b_first; b < p.batch; b += gridDim.z) {
    const SeqBounds qs = seq_bounds(p.cu_seqlens_q, b, p.seqlen_q, p.seqlen_q, p.total_q);
    const SeqBounds ks = seq_bounds(p.cu_seqlens_k, b, p.seqlen_k, p.seqlen_k, p.total_k);
    for (int n_block = c.n_first; n_block * Traits::kBlockN < ks.len; n_block += gridDim.x) {
      flash_bwd_sm90_kv_block<Traits, Elem>(p, smem, raw + pad, b, c.slot, n_block, dq_slice, qs,
                                            ks);
    }
  }
#endif
}

}  // namespace gpu
}  // namespace fastattn
