// FlashAttention-2 backward main kernel for sm80+ (mma.sync m16n8k16, ldmatrix,
// cp.async), templated on the tile shape and element type only; masks, varlen,
// GQA, the runtime head dim (<= kHeadDim, a multiple of 8) and strides are runtime.
//
// One CTA owns one KV block (kBlockN keys) of one (sequence, kv head) and the
// q heads [hq0, hq0 + heads_per_cta) of that kv head's GQA group. K_j and V_j
// are loaded once; the CTA then walks every (q head, query block) that can see
// the block (fully masked query blocks are skipped) and per query block of
// kBlockM rows:
//
//   S^T  = K_j Q_i^T            (recomputed; keys are the fragment rows)
//   P^T  = exp2(S^T * scale*log2e - lse_i * log2e)  from the stored LSE
//   dP^T = V_j dO_i^T
//   dS^T = P^T o (dP^T - D_i)   with D = rowsum(dO o O) from the preprocess kernel
//   dV_j += P^T dO_i            (registers, fp32)
//   dK_j += dS^T Q_i            (registers, fp32; times scale at the end)
//   dQ_i += dS K_j              (fp32 into dq_accum; times scale in the convert kernel)
//
// Warp layout: warp w owns the m16 row tile of keys rg = w % kRowGroups and the
// head-dim slice dh = w / kRowGroups of width kDW = kHeadDim / kDSplit. Because
// a warp owns whole key rows, P^T and dS^T go straight from the accumulators
// of S^T / dP^T into the A fragments of the dV / dK products (no shared-memory
// round trip) and dK / dV stay in registers across the whole loop. For
// kDSplit == 2 (head dims 192/256, where full-width dK + dV would need >= 192
// accumulator registers per thread) the two warps of a key tile each reduce
// S^T and dP^T over half of the head dim and exchange the partial sums through
// shared memory (a + b == b + a, so both hold bitwise equal P and dS).
// Paired layout (BwdTraits kPaired; hdim 64 / 128 where the device has the
// shared memory): warps 2 kg and 2 kg + 1 own the 32 keys kg * 32 .. + 31; each
// computes S^T / dP^T for half of the query block, writes P^T and dS^T to shared
// memory, and after a barrier of the pair accumulates dV / dK for the 32 keys
// over one half of the head dim from all kBlockM queries: each K / V and Q / dO
// fragment then feeds two mma tiles instead of one (hdim 128: 144 instead of
// 176 ldmatrix per warp and query block; measured +5 to 6% on H200). With
// kSkewDQ (hdim 64, long query loops) warps 4..7 run each dQ right after the
// barrier that completes its dS^T, warps 0..3 after their next main work, so
// that the two warps of a scheduler are in different phases (see `late`).
//
// dS^T goes to shared memory once for the dQ product, which is tiled over all
// warps (kQWarpsM x kQWarpsN) and reduces over the block's keys. With
// kPipelineDQ (where the device has the shared memory for a second dS^T
// buffer) the dQ of iteration i runs at the end of iteration i + 1, after its
// dV / dK, from the other buffer: one __syncthreads per iteration instead of two.
// dQ leaves the CTA as fp32 adds into dq_accum, whose layout
// (common/bwd_dq_layout.h) stores each 16 x 8 mma C tile as 128 contiguous
// floats in fragment order, so that a warp adds a tile with one 16-byte
// reduction per lane (4 full lines, instead of 8 rows x 32 bytes per 64 floats):
//   - default: `red.global.add.v4.f32` (atomics; order between CTAs is arbitrary);
//   - deterministic: dq_accum has one slice per grid column (dq_splits); the
//     CTA in grid column x handles KV blocks x, x + dq_splits, ... in order and
//     is the only writer of its slice for its q heads, and each element of a
//     slice is always updated by the same thread: plain load + add + store,
//     bitwise reproducible. The convert kernel sums the slices in fixed order.
// Per-iteration bookkeeping is kept off the hot path: Q / dO tiles stream
// through per-thread loaders set up once per q head, the LSE arrives pre-scaled
// by log2(e) from the preprocess kernel (+inf for rows that saw no key), and
// dQ tiles inside the sequence and head dim are stored without bounds checks.
// CTA order: with a mask that makes the KV blocks' work unequal, the launcher
// passes cta_group > 1 and the kernel launches the (head, batch) units in
// groups with the KV block as the slow index inside a group, so that the long
// (first) KV blocks of every unit start early (see flash_bwd_kernel).
// dK / dV: written directly (scaled, cast) when the CTA covers the whole GQA
// group (heads_per_cta == group); otherwise they are fp32 partial sums into
// dk_accum / dv_accum (atomics by default; deterministic: one copy per head
// slot, plain stores) reduced by the convert kernel.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common/bwd_block.h"
#include "cuda/common/bwd_cta_order.h"
#include "cuda/common/bwd_dq_layout.h"
#include "cuda/common/bwd_mask.h"
#include "cuda/common/bwd_ptx.h"
#include "cuda/common/dropout.h"
#include "cuda/common/fragment.h"
#include "cuda/common/mask.h"
#include "cuda/common/score_bias.h"
#include "cuda/common/softcap.h"
#include "cuda/common/ptx.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/types.h"
#include "cuda/common/params.h"
#include "cuda/flash/bwd_traits.h"

namespace fastattn {
namespace gpu {

template <typename Traits, typename Elem>
__device__ __forceinline__ void flash_bwd_kv_block(const BwdParams& p, char* smem, int b,
                                                   int slot, int n_block, int dq_slice,
                                                   const SeqBounds& qs, const SeqBounds& ks) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kDW = Traits::kDW;
  constexpr int NTS = Traits::kNTS;
  constexpr int KSQ = Traits::kKSQ;
  constexpr int KSD = Traits::kKSD;
  constexpr int NTD = Traits::kNTD;
  constexpr int QMT = Traits::kQMT;
  constexpr int QNT = Traits::kQNT;
  using QTile = typename Traits::QTile;
  using KTile = typename Traits::KTile;
  using DSTile = typename Traits::DSTile;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int rg = warp % Traits::kRowGroups;
  const int dh = warp / Traits::kRowGroups;
  const int g = lane >> 2;
  const int t4 = lane & 3;

  BwdBlock blk;
  blk.init(p, b, slot, n_block * kBlockN, kBlockN, kBlockM, qs, ks);
  const bool varlen = blk.varlen;
  const int sq = blk.sq;
  const int sk = blk.sk;
  const int n0 = blk.n0;
  const int hpc = blk.hpc;
  const int hq0 = blk.hq0;
  const int head_dim = p.head_dim;

  const uint32_t s_base = ptx::smem_u32(smem);
  const uint32_t sK = s_base + Traits::kOffK;
  const uint32_t sV = s_base + Traits::kOffV;
  const uint32_t sQ0 = s_base + Traits::kOffQ;
  const uint32_t sDO0 = s_base + Traits::kOffDO;
  const uint32_t sDS = s_base + Traits::kOffDS;
  const uint32_t sLse0 = s_base + Traits::kOffLse;
  const uint32_t sDsum0 = s_base + Traits::kOffDsum;
  const float* lse_smem = reinterpret_cast<const float*>(smem + Traits::kOffLse);
  const float* dsum_smem = reinterpret_cast<const float*>(smem + Traits::kOffDsum);

  // The previous KV block of this CTA may still read the dK/dV staging (sK, sV).
  __syncthreads();
  load_tile_async<kThreads, KTile>(sK, ContiguousRows<Elem>{blk.k_rows<Elem>(p), p.k_row_stride},
                                   n0, sk, head_dim, tid);
  load_tile_async<kThreads, KTile>(sV, ContiguousRows<Elem>{blk.v_rows<Elem>(p), p.v_row_stride},
                                   n0, sk, head_dim, tid);
  ptx::cp_async_commit();

  const MaskPolicy& mask = blk.mask;
  const BlockSchedule& sched = blk.sched;
  const int per_head = sched.count();  // query blocks per q head
  const int n_iter = per_head * hpc;

  // Sources of the per-iteration tiles of one q head, set up once per head:
  // tile loaders with per-thread pointers, and this thread's LSE / D entry
  // (threads tid < kBlockM copy row m0 + tid).
  using QLoader = ContiguousTileLoader<kThreads, QTile, Elem>;
  QLoader q_ld, do_ld;
  const float* lse_src = p.lse_log2;
  const float* dsum_src = p.dsoftmax_sum;
  auto set_head = [&](int hq) {
    const BwdHeadSources<Elem> src = blk.head_sources<Elem>(p, hq, tid);
    q_ld.init(src.q, p.q_row_stride, head_dim, tid);
    do_ld.init(src.dout, p.do_row_stride, head_dim, tid);
    lse_src = src.lse;
    dsum_src = src.dsum;
  };
  // Issues the cp.async loads of query block m0 of the current loader head:
  // Q, LSE and D into buffer `buf`, and dO when `with_do`.
  auto issue_q = [&](int m0, int buf, bool with_q, bool with_do) {
    if (with_q) {
      q_ld.load(sQ0 + buf * QTile::kBytes, m0, sq);
      issue_lse_dsum<kBlockM>(p, lse_src, dsum_src, sLse0 + buf * kBlockM * 4,
                              sDsum0 + buf * kBlockM * 4, m0, sq, tid);
    }
    if (with_do) {
      do_ld.load(sDO0 + (Traits::kDoubleDO ? buf : 0) * QTile::kBytes, m0, sq);
    }
  };

  // dK / dV of this warp: kAccM m16 tiles of keys from row acc_r0 by kAccN n8
  // tiles of the head dim from column acc_c0.
  constexpr int kAccM = Traits::kAccM;
  constexpr int kAccN = Traits::kAccN;
  const int acc_r0 = Traits::kPaired ? (warp >> 1) * 32 : rg * 16;
  const int acc_c0 = Traits::kPaired ? (warp & 1) * Traits::kPD : dh * kDW;
  float acc_dk[kAccM][kAccN][4];
  float acc_dv[kAccM][kAccN][4];
#pragma unroll
  for (int mt = 0; mt < kAccM; ++mt)
#pragma unroll
    for (int i = 0; i < kAccN; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_dk[mt][i][e] = 0.f;
        acc_dv[mt][i][e] = 0.f;
      }

  // Iteration order: q heads hq0 .. hq0 + hpc - 1, query blocks ascending within each.
  // (cur_t, cur_i): the iteration being computed; (nxt_t, nxt_i): the last one issued
  // (i: the step of the query-block schedule).
  int cur_t = 0, cur_i = 0;
  int nxt_t = 0, nxt_i = 0;
  // Query tiles in Q buffers 0 / 1, and the tile of the step after the last
  // one issued, read a step early (a sparse schedule's ids come from global
  // memory: TileLookahead's reason).
  int q_tile0 = 0, q_tile1 = 0, tile_ahead = 0;
  if (n_iter > 0) {
    set_head(hq0);
    q_tile0 = sched.tile(0);
    tile_ahead = sched.tile(per_head > 1 ? 1 : 0);
    issue_q(q_tile0 * kBlockM, 0, true, true);
    ptx::cp_async_commit();
  }

  // Per-lane ldmatrix offsets.
  const int a_off_k = a_lane_offset<KTile>(lane) + KTile::offset(rg * 16, dh * kDW);
  const int b_off_q = b_lane_offset<QTile>(lane) + QTile::offset(0, dh * kDW);
  const int bt_off_q = b_trans_lane_offset<QTile>(lane) + QTile::offset(0, dh * kDW);
  const int wqm = warp % Traits::kQWarpsM;
  const int wqn = warp / Traits::kQWarpsM;
  const int at_off_ds = a_trans_lane_offset<DSTile>(lane) + DSTile::offset(0, wqm * Traits::kQTileM);
  const int bt_off_k = b_trans_lane_offset<KTile>(lane) + KTile::offset(0, wqn * Traits::kQTileN);
  // Paired layout: S^T / dP^T rows (keys) and columns (queries) of this warp,
  // and the P^T / dS^T rows and dO / Q columns of its dV / dK.
  const int pa_off_k = a_lane_offset<KTile>(lane) + KTile::offset(acc_r0, 0);
  const int pb_off_q = b_lane_offset<QTile>(lane) + QTile::offset((warp & 1) * Traits::kPQ, 0);
  const int pa_off_p = a_lane_offset<DSTile>(lane) + DSTile::offset(acc_r0, 0);
  const int pbt_off_q = b_trans_lane_offset<QTile>(lane) + QTile::offset(0, acc_c0);
  const uint32_t sP = s_base + Traits::kOffP;

  // dq_accum: 16-row groups of fragment-ordered 16 x 8 tiles (common/bwd_dq_layout.h).
  const int64_t dq_rstride = int64_t(p.heads_q) * head_dim;  // floats per padded row
  const int64_t dq_slice_stride =
      dq_pad_rows(varlen, p.batch, p.seqlen_q, p.total_q) * dq_rstride;
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = p.scale * kLog2e;
  const int key0 = n0 + rg * 16 + g;  // this thread's keys: key0, key0 + 8

  // This thread's 4 floats of the warp tile's first 16 x 8 dQ tile (query block 0,
  // q head 0); an iteration adds m0 padded rows and the head's 16 * head_dim
  // floats, the tile (mt, nt) of the warp tile 16 * mt rows and nt * 128 floats.
  float* const dq_thread =
      p.dq_accum + dq_slice * dq_slice_stride +
      (dq_pad_start(varlen, b, p.seqlen_q, blk.qs.start) + wqm * Traits::kQTileM) * dq_rstride +
      (wqn * Traits::kQTileN / 8) * 128 + lane * 4;
  const bool full_d = head_dim == Traits::kHeadDim;

  // dQ += dS K of one finished iteration (query block m0, q head hq) from the
  // dS^T tile at ds_tile: kBlockM x kHeadDim over kQWarpsM x kQWarpsN warps,
  // reduced over the block's keys, then added into dq_accum.
  auto do_dq = [&](uint32_t ds_tile, int m0, int hq) {
    float acc_dq[QMT][QNT][4];
#pragma unroll
    for (int i = 0; i < QMT; ++i)
#pragma unroll
      for (int j = 0; j < QNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[i][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[QMT][4];
#pragma unroll
      for (int mt = 0; mt < QMT; ++mt) {
        ptx::ldsm_x4_trans(a[mt], ds_tile + at_off_ds + DSTile::offset(kk * 16, mt * 16));
      }
#pragma unroll
      for (int np = 0; np < QNT / 2; ++np) {
        uint32_t bk[4];
        ptx::ldsm_x4_trans(bk, sK + bt_off_k + KTile::offset(kk * 16, np * 16));
#pragma unroll
        for (int mt = 0; mt < QMT; ++mt) {
          ptx::mma_m16n8k16<Elem>(acc_dq[mt][2 * np], a[mt], bk[0], bk[1]);
          ptx::mma_m16n8k16<Elem>(acc_dq[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }
    add_dq_tiles(dq_thread + int64_t(m0) * dq_rstride + int64_t(hq) * 16 * head_dim, acc_dq,
                 dq_rstride, p.deterministic, full_d && m0 + kBlockM <= sq,
                 sq - m0 - wqm * Traits::kQTileM, head_dim - wqn * Traits::kQTileN);
  };

  // Pipelined (dq_pipelined, needs the second dS^T buffer): the dQ of iteration
  // it - 1 runs at the end of iteration it, after its dV / dK, from the other
  // dS^T buffer, which every warp finished writing before the barrier at the
  // top of iteration it; one barrier per iteration instead of two.
  const bool pipe = Traits::kPipelineDQ && p.dq_pipelined;
  // Barrier k of the loop (every warp passes barriers 0 .. n_iter exactly once
  // in the loop and after it): Q/dO/LSE/D of iteration k landed, every warp is
  // done with the main work of k - 1 and with the dQ of k - 2; then the loads
  // of iteration k + 1 are issued into the other buffer.
  auto sync_issue = [&](int k) {
    ptx::cp_async_wait<0>();
    __syncthreads();
    if (k + 1 < n_iter) {
      if (++nxt_i == per_head) {
        nxt_i = 0;
        ++nxt_t;
        set_head(hq0 + nxt_t);
      }
      const int t = tile_ahead;
      if (k & 1) q_tile0 = t;
      else q_tile1 = t;
      tile_ahead = sched.tile(nxt_i + 1 < per_head ? nxt_i + 1 : 0);
      issue_q(t * kBlockM, (k & 1) ^ 1, true, Traits::kDoubleDO);
      ptx::cp_async_commit();
    }
  };
  // Skewed dQ (Traits::kSkewDQ, paired layout, pipelined): warps 4..7 ("late")
  // pass barrier it + 1 right after their main work of iteration it and then
  // run the dQ of it; warps 0..3 run the dQ of it - 1 after their main work of
  // it, as without the skew. Warps w and w + 4 share a scheduler, so one of
  // them is in mma work while the other computes exp2 / dS and stores P^T /
  // dS^T, instead of both leaving the tensor pipe idle in the same phase. Same
  // barriers and buffer lifetimes (sync_issue); one copy of the main work and
  // of dQ in the code. Costs registers (ptxas reloads a few loop invariants
  // per iteration), so the launcher takes it for long query loops only.
  const bool late = Traits::kSkewDQ && pipe && warp >= Traits::kNWarps / 2;
  if (late && n_iter > 0) sync_issue(0);
  int prev_m0 = 0, prev_hq = 0;
  for (int it = 0; it < n_iter; ++it) {
    const int buf = it & 1;
    const int m0 = (buf ? q_tile1 : q_tile0) * kBlockM;
    const int hq = hq0 + cur_t;
    const uint32_t sQ = sQ0 + buf * QTile::kBytes;
    const uint32_t sDO = sDO0 + (Traits::kDoubleDO ? buf : 0) * QTile::kBytes;

    if (!late) sync_issue(it);

    // This iteration's dS^T buffer (read by dQ; by dK too in the paired layout).
    char* const ds_store = smem + Traits::kOffDS + (pipe ? buf : 0) * DSTile::kBytes;
    if constexpr (Traits::kPaired) {
      constexpr int PNT = Traits::kPNT;
      const int kg = warp >> 1;
      const int q_c0 = (warp & 1) * Traits::kPQ;  // this warp's first query column
      // ---- S^T = K Q^T, dP^T = V dO^T: keys acc_r0 .. + 31 by queries q_c0 .. + kPQ - 1
      float s[2][PNT][4];
      float dp[2][PNT][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < PNT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][i][e] = 0.f;
            dp[mt][i][e] = 0.f;
          }
#pragma unroll
      for (int kk = 0; kk < Traits::kPKS; ++kk) {
        uint32_t ak[2][4], av[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ptx::ldsm_x4(ak[mt], sK + pa_off_k + KTile::offset(mt * 16, kk * 16));
          ptx::ldsm_x4(av[mt], sV + pa_off_k + KTile::offset(mt * 16, kk * 16));
        }
#pragma unroll
        for (int np = 0; np < PNT / 2; ++np) {
          uint32_t bq[4], bd[4];
          ptx::ldsm_x4(bq, sQ + pb_off_q + QTile::offset(np * 16, kk * 16));
          ptx::ldsm_x4(bd, sDO + pb_off_q + QTile::offset(np * 16, kk * 16));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            ptx::mma_m16n8k16<Elem>(s[mt][2 * np], ak[mt], bq[0], bq[1]);
            ptx::mma_m16n8k16<Elem>(s[mt][2 * np + 1], ak[mt], bq[2], bq[3]);
            ptx::mma_m16n8k16<Elem>(dp[mt][2 * np], av[mt], bd[0], bd[1]);
            ptx::mma_m16n8k16<Elem>(dp[mt][2 * np + 1], av[mt], bd[2], bd[3]);
          }
        }
      }

      // Dropout (as in bwd_sm90_step.h): dP * keep_scale or 0 first; P for dV below.
      DropoutBitsT<PNT> keep[2];
      const bool dropping = p.dropout.on();
      if (dropping) {
        DropoutTile d;
        d.init(p.dropout.rng_state, p.dropout.keep_threshold, int64_t(b) * p.heads_q + hq);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          keep[mt].compute(d, n0 + acc_r0 + mt * 16 + g, m0 + q_c0 + 2 * t4);
          keep[mt].apply(dp[mt], p.dropout.keep_scale);
        }
      }
      // ---- P^T and dS^T (in place), then both to shared memory
      const float* lse_b = lse_smem + buf * kBlockM;
      const float* dsum_b = dsum_smem + buf * kBlockM;
      // With a softcap, D is folded into dp here (softcap.h) and taken as 0 below.
      const bool capped = p.softcap_in != 0.f;
      if (capped) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          cap_scores_and_ds<PNT>(s[mt], dp[mt], dsum_b + q_c0 + 2 * t4, p.softcap_in, p.softcap_out);
        }
      }
      if (p.bias.on()) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          add_bias_c_transposed<PNT>(s[mt], p.bias, b, hq, n0 + acc_r0 + mt * 16 + g,
                                           m0 + q_c0 + 2 * t4, sq, sk, 1.f / p.scale);
        }
      }
#pragma unroll
      for (int nt = 0; nt < PNT; ++nt) {
        const float2 l2 = *reinterpret_cast<const float2*>(lse_b + q_c0 + nt * 8 + 2 * t4);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[mt][nt][2 * h] = ptx::ex2_approx(fmaf(s[mt][nt][2 * h], scale_log2, -l2.x));
            s[mt][nt][2 * h + 1] = ptx::ex2_approx(fmaf(s[mt][nt][2 * h + 1], scale_log2, -l2.y));
          }
      }
      if (mask.tile_needs_mask(m0, m0 + kBlockM, n0, n0 + kBlockN)) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          zero_invisible_c_transposed<PNT>(s[mt], mask, n0 + acc_r0 + mt * 16 + g,
                                           m0 + q_c0 + 2 * t4);
        }
      }
      if (const uint32_t* bits = sched.partial_bits(p.sparse, cur_i)) {
        const int q_rel = m0 - sched.block(cur_i) * p.sparse.block_q;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          zero_unset_bits_c_transposed<PNT>(s[mt], bits, p.sparse.words,
                                            n0 % p.sparse.block_kv + acc_r0 + mt * 16 + g,
                                            q_rel + q_c0 + 2 * t4);
        }
      }
      char* const p_store = smem + Traits::kOffP;
#pragma unroll
      for (int nt = 0; nt < PNT; ++nt) {
        const int c = q_c0 + nt * 8 + 2 * t4;
        const float2 d2 = capped ? make_float2(0.f, 0.f) : *reinterpret_cast<const float2*>(dsum_b + c);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          float(&pc)[4] = s[mt][nt];
          float(&dc)[4] = dp[mt][nt];
          dc[0] = pc[0] * (dc[0] - d2.x);
          dc[1] = pc[1] * (dc[1] - d2.y);
          dc[2] = pc[2] * (dc[2] - d2.x);
          dc[3] = pc[3] * (dc[3] - d2.y);
          const int r = acc_r0 + mt * 16 + g;
          if (p.bias.grad != nullptr) {
            const float(&dsc)[1][4] = reinterpret_cast<const float(&)[1][4]>(dc);
            store_bias_grad_c_transposed<1>(dsc, p.bias, b, hq, n0 + r, m0 + c, sq, sk);
          }
          if (dropping) keep[mt].apply_tile(pc, nt, p.dropout.keep_scale);
          *reinterpret_cast<uint32_t*>(p_store + DSTile::offset(r, c)) = pack2<Elem>(pc[0], pc[1]);
          *reinterpret_cast<uint32_t*>(p_store + DSTile::offset(r + 8, c)) =
              pack2<Elem>(pc[2], pc[3]);
          *reinterpret_cast<uint32_t*>(ds_store + DSTile::offset(r, c)) = pack2<Elem>(dc[0], dc[1]);
          *reinterpret_cast<uint32_t*>(ds_store + DSTile::offset(r + 8, c)) =
              pack2<Elem>(dc[2], dc[3]);
        }
      }
      // The other warp of the pair wrote the other half of these 32 key rows.
      ptx::bar_sync_named(1 + kg, 64);

      // ---- dV += P^T dO, dK += dS^T Q: keys acc_r0 .. + 31, head dim acc_c0 .. + kPD - 1
      const uint32_t sDSw = sDS + (pipe ? buf : 0) * DSTile::kBytes;
#pragma unroll
      for (int kk = 0; kk < KSQ; ++kk) {
        uint32_t ap[2][4], ad[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ptx::ldsm_x4(ap[mt], sP + pa_off_p + DSTile::offset(mt * 16, kk * 16));
          ptx::ldsm_x4(ad[mt], sDSw + pa_off_p + DSTile::offset(mt * 16, kk * 16));
        }
#pragma unroll
        for (int np = 0; np < kAccN / 2; ++np) {
          uint32_t bd[4], bq[4];
          ptx::ldsm_x4_trans(bd, sDO + pbt_off_q + QTile::offset(kk * 16, np * 16));
          ptx::ldsm_x4_trans(bq, sQ + pbt_off_q + QTile::offset(kk * 16, np * 16));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            ptx::mma_m16n8k16<Elem>(acc_dv[mt][2 * np], ap[mt], bd[0], bd[1]);
            ptx::mma_m16n8k16<Elem>(acc_dv[mt][2 * np + 1], ap[mt], bd[2], bd[3]);
            ptx::mma_m16n8k16<Elem>(acc_dk[mt][2 * np], ad[mt], bq[0], bq[1]);
            ptx::mma_m16n8k16<Elem>(acc_dk[mt][2 * np + 1], ad[mt], bq[2], bq[3]);
          }
        }
      }
    } else {
      // ---- S^T = K Q^T and dP^T = V dO^T (over this warp's head-dim slice)
      float s[NTS][4];
      float dp[NTS][4];
#pragma unroll
      for (int i = 0; i < NTS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[i][e] = 0.f;
          dp[i][e] = 0.f;
        }
#pragma unroll
      for (int kk = 0; kk < KSD; ++kk) {
        uint32_t ak[4], av[4];
        ptx::ldsm_x4(ak, sK + a_off_k + kk * 32);
        ptx::ldsm_x4(av, sV + a_off_k + kk * 32);
#pragma unroll
        for (int np = 0; np < NTS / 2; ++np) {
          uint32_t bq[4], bd[4];
          ptx::ldsm_x4(bq, sQ + b_off_q + QTile::offset(np * 16, kk * 16));
          ptx::ldsm_x4(bd, sDO + b_off_q + QTile::offset(np * 16, kk * 16));
          ptx::mma_m16n8k16<Elem>(s[2 * np], ak, bq[0], bq[1]);
          ptx::mma_m16n8k16<Elem>(s[2 * np + 1], ak, bq[2], bq[3]);
          ptx::mma_m16n8k16<Elem>(dp[2 * np], av, bd[0], bd[1]);
          ptx::mma_m16n8k16<Elem>(dp[2 * np + 1], av, bd[2], bd[3]);
        }
      }

      if constexpr (Traits::kDSplit == 2) {
        // Exchange the partial sums with the warp holding the other head-dim half.
        float* xmine = reinterpret_cast<float*>(smem + Traits::kOffX) +
                       warp * Traits::kXFloatsPerWarp + lane;
        const float* xother = reinterpret_cast<const float*>(smem + Traits::kOffX) +
                              ((warp + Traits::kRowGroups) % Traits::kNWarps) *
                                  Traits::kXFloatsPerWarp +
                              lane;
#pragma unroll
        for (int i = 0; i < NTS; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            xmine[((i * 4 + e) * 2) * 32] = s[i][e];
            xmine[((i * 4 + e) * 2 + 1) * 32] = dp[i][e];
          }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < NTS; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[i][e] += xother[((i * 4 + e) * 2) * 32];
            dp[i][e] += xother[((i * 4 + e) * 2 + 1) * 32];
          }
      }

      // Dropout (as in bwd_sm90_step.h): dP * keep_scale or 0 first; P for dV below.
      DropoutBitsT<NTS> keep;
      const bool dropping = p.dropout.on();
      if (dropping) {
        DropoutTile d;
        d.init(p.dropout.rng_state, p.dropout.keep_threshold, int64_t(b) * p.heads_q + hq);
        keep.compute(d, key0, m0 + 2 * t4);
        keep.apply(dp, p.dropout.keep_scale);
      }
      // ---- P^T and dS^T (in place: s -> p, dp -> ds)
      const float* lse_b = lse_smem + buf * kBlockM;
      const float* dsum_b = dsum_smem + buf * kBlockM;
      const bool capped = p.softcap_in != 0.f;  // as above
      if (capped) cap_scores_and_ds<NTS>(s, dp, dsum_b + 2 * t4, p.softcap_in, p.softcap_out);
      if (p.bias.on()) {
        add_bias_c_transposed<NTS>(s, p.bias, b, hq, key0, m0 + 2 * t4, sq, sk, 1.f / p.scale);
      }
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        const int c = nt * 8 + 2 * t4;
        // lse * log2(e), +inf for rows that saw no key (P exactly 0): from the preprocess.
        const float2 l2 = *reinterpret_cast<const float2*>(lse_b + c);
        const float lc0 = l2.x;
        const float lc1 = l2.y;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          s[nt][2 * h] = ptx::ex2_approx(fmaf(s[nt][2 * h], scale_log2, -lc0));
          s[nt][2 * h + 1] = ptx::ex2_approx(fmaf(s[nt][2 * h + 1], scale_log2, -lc1));
        }
      }
      if (mask.tile_needs_mask(m0, m0 + kBlockM, n0, n0 + kBlockN)) {
        zero_invisible_c_transposed<NTS>(s, mask, key0, m0 + 2 * t4);
      }
      if (const uint32_t* bits = sched.partial_bits(p.sparse, cur_i)) {
        zero_unset_bits_c_transposed<NTS>(s, bits, p.sparse.words, key0 - n0 + n0 % p.sparse.block_kv,
                                          m0 - sched.block(cur_i) * p.sparse.block_q + 2 * t4);
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
      if (p.bias.grad != nullptr && dh == 0) {
        store_bias_grad_c_transposed<NTS>(dp, p.bias, b, hq, key0, m0 + 2 * t4, sq, sk);
      }

      if (dropping) keep.apply(s, p.dropout.keep_scale);
      uint32_t pa[KSQ][4];
      uint32_t dsa[KSQ][4];
#pragma unroll
      for (int kk = 0; kk < KSQ; ++kk) {
        c_pair_to_a<Elem>(pa[kk], s[2 * kk], s[2 * kk + 1]);
        c_pair_to_a<Elem>(dsa[kk], dp[2 * kk], dp[2 * kk + 1]);
      }

      // dS^T -> shared memory for dQ (one warp per key tile writes it).
      if (dh == 0) {
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) {
          const int c = nt * 8 + 2 * t4;
          const int r = rg * 16 + g;
          *reinterpret_cast<uint32_t*>(ds_store + DSTile::offset(r, c)) = dsa[nt / 2][(nt & 1) * 2];
          *reinterpret_cast<uint32_t*>(ds_store + DSTile::offset(r + 8, c)) =
              dsa[nt / 2][(nt & 1) * 2 + 1];
        }
      }

      // ---- dV += P^T dO, dK += dS^T Q (this warp's key rows and head-dim slice)
#pragma unroll
      for (int kk = 0; kk < KSQ; ++kk) {
#pragma unroll
        for (int np = 0; np < NTD / 2; ++np) {
          uint32_t bd[4], bq[4];
          ptx::ldsm_x4_trans(bd, sDO + bt_off_q + QTile::offset(kk * 16, np * 16));
          ptx::ldsm_x4_trans(bq, sQ + bt_off_q + QTile::offset(kk * 16, np * 16));
          ptx::mma_m16n8k16<Elem>(acc_dv[0][2 * np], pa[kk], bd[0], bd[1]);
          ptx::mma_m16n8k16<Elem>(acc_dv[0][2 * np + 1], pa[kk], bd[2], bd[3]);
          ptx::mma_m16n8k16<Elem>(acc_dk[0][2 * np], dsa[kk], bq[0], bq[1]);
          ptx::mma_m16n8k16<Elem>(acc_dk[0][2 * np + 1], dsa[kk], bq[2], bq[3]);
        }
      }
    }

    if (!pipe) {
      __syncthreads();  // dS^T complete; every warp is done with dO (single-buffer case)
      if (!Traits::kDoubleDO && it + 1 < n_iter) {
        issue_q((buf ? q_tile0 : q_tile1) * kBlockM, 0, false, true);  // step it + 1's tile
        ptx::cp_async_commit();
      }
    }

    // dQ of this iteration (unpipelined; late warps, after barrier it + 1) or
    // of the previous one (pipelined).
    if (late) sync_issue(it + 1);
    if (!pipe || late || it > 0) {
      const bool cur = !pipe || late;
      do_dq(sDS + (pipe ? (cur ? buf : buf ^ 1) : 0) * DSTile::kBytes, cur ? m0 : prev_m0,
            cur ? hq : prev_hq);
    }
    prev_m0 = m0;
    prev_hq = hq;
    if (++cur_i == per_head) {
      cur_i = 0;
      ++cur_t;
    }
  }

  if (pipe && !late && n_iter > 0) {
    sync_issue(n_iter);  // barrier n_iter: the last dS^T is complete (issues nothing)
    do_dq(sDS + ((n_iter - 1) & 1) * DSTile::kBytes, prev_m0, prev_hq);
  }

  // ---- epilogue: dK (times scale) and dV of this KV block
  ptx::cp_async_wait<0>();  // K/V may still be in flight when no query block saw them
  if (p.dk_accum == nullptr) {
    __syncthreads();  // every warp is done reading sK / sV
    const float scale = p.scale;
#pragma unroll
    for (int mt = 0; mt < kAccM; ++mt)
#pragma unroll
      for (int nt = 0; nt < kAccN; ++nt) {
        const int c = acc_c0 + nt * 8 + 2 * t4;
        const int r = acc_r0 + mt * 16 + g;
        const float(&dk)[4] = acc_dk[mt][nt];
        const float(&dv)[4] = acc_dv[mt][nt];
        *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + KTile::offset(r, c)) =
            pack2<Elem>(dk[0] * scale, dk[1] * scale);
        *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + KTile::offset(r + 8, c)) =
            pack2<Elem>(dk[2] * scale, dk[3] * scale);
        *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + KTile::offset(r, c)) =
            pack2<Elem>(dv[0], dv[1]);
        *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + KTile::offset(r + 8, c)) =
            pack2<Elem>(dv[2], dv[3]);
      }
    __syncthreads();
    store_tile<kThreads, KTile>(blk.dk_block<Elem>(p), p.dk_row_stride, smem + Traits::kOffK,
                                sk - n0, head_dim, tid);
    store_tile<kThreads, KTile>(blk.dv_block<Elem>(p), p.dv_row_stride, smem + Traits::kOffV,
                                sk - n0, head_dim, tid);
  } else {
    add_dkv_partials(p, blk, acc_dk, acc_dv, acc_r0 + g, acc_c0 + 2 * t4);
  }
}

// Grid and CTA order: common/bwd_cta_order.h.
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_bwd_kernel(const __grid_constant__ BwdParams p, const int cta_group) {
  extern __shared__ __align__(128) char smem[];
  const BwdCtaStart c = bwd_cta_start(cta_group);
  const int dq_slice = p.deterministic ? c.n_first : 0;
  for (int b = c.b_first; b < p.batch; b += gridDim.z) {
    const SeqBounds qs = seq_bounds(p.cu_seqlens_q, b, p.seqlen_q, p.seqlen_q, p.total_q);
    const SeqBounds ks = seq_bounds(p.cu_seqlens_k, b, p.seqlen_k, p.seqlen_k, p.total_k);
    for (int n_block = c.n_first; n_block * Traits::kBlockN < ks.len; n_block += gridDim.x) {
      flash_bwd_kv_block<Traits, Elem>(p, smem, b, c.slot, n_block, dq_slice, qs, ks);
    }
  }
}

}  // namespace gpu
}  // namespace fastattn
