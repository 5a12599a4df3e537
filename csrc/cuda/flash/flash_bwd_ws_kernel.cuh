// FlashAttention backward for sm90, warp-specialized: the step of the sm90
// backward (bwd_sm90_step.h; flash_bwd_sm90_kernel.cuh has the algorithm)
// fed by a producer warpgroup, with the two consumer warpgroups meeting only
// where dQ needs both halves of dS^T.
//
// Roles (384 threads; registers moved with setmaxnreg, warp_roles.h):
//   - producer warpgroup 0. Thread 0: the copy engine (TMA) brings K and V
//     once per KV block, and Q and dO per query block into a kStages ring.
//     Warp 1: the query block's LSE (times log2 e) and D into the same ring
//     stage with plain loads, +inf / 0 for rows past the sequence so that
//     those rows' P and dS are exact zeros whatever the copy engine read
//     there (varlen tiles reach into the next sequence). A stage's "full"
//     barrier completes when both have landed; its "empty" barrier when every
//     consumer warp is done reading it.
//   - consumers, warpgroups 1 and 2, 64 keys each. Per query block i:
//       S^T, dP^T (SS) -> P^T, dS^T (registers) -> dV, dK += (RS)
//       dS^T of i -> dS ring slot i % 2, announced on ds_full
//       dQ of i - 1 = dS K (SS) once both halves of slot (i - 1) % 2 are in
//       (a warpgroup waits for the other only here, one block late, so the two
//       drift apart and one's softmax runs under the other's MMAs)
//       fp32 dQ adds of i - 1 into dq_accum (bwd_dq_layout.h)
//     A slot is rewritten two blocks later, after ds_empty says both
//     warpgroups' dQ MMAs that read it are done.
//   - epilogue: dK (times scale) and dV from registers to global (or fp32
//     partial sums), after handing K / V back: the producer loads the next
//     KV block's meanwhile.
// The CTAs are the sm90 kernel's (bwd_cta_order.h), numbered and launched on
// a 1-D grid: one per CTA number, or (FASTATTN_BWD_WS_PERSISTENT=1) one per SM
// taking numbers blockIdx.x, + gridDim.x, ... Every role walks the same
// (CTA number, KV block, q head, query block) sequence, and the rings' phases
// run on across KV blocks.
#pragma once
#include <cstdint>

#include "cuda/common/bwd_block.h"
#include "cuda/common/bwd_cta_order.h"
#include "cuda/common/bwd_dq_layout.h"
#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/common/warp_roles.h"
#include "cuda/common/wgmma.h"
#include "cuda/common/params.h"
#include "cuda/flash/bwd_sm90_step.h"
#include "cuda/flash/flash_bwd_sm90_kernel.cuh"

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kBlockM_, int kStages_>
struct BwdWsTraits : BwdSm90Traits<kHeadDim_, kBlockM_> {
  using Base = BwdSm90Traits<kHeadDim_, kBlockM_>;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  using KTile = typename Base::KTile;
  using QTile = typename Base::QTile;
  using DSTile = typename Base::DSTile;

  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + KTile::kBytes;
  static constexpr int kOffQ = kOffV + KTile::kBytes;                  // kStages
  static constexpr int kOffDO = kOffQ + kStages * QTile::kBytes;       // kStages
  static constexpr int kOffDS = kOffDO + kStages * QTile::kBytes;      // 2 slots
  static constexpr int kOffLse = kOffDS + 2 * DSTile::kBytes;          // float[kStages][kBlockM]
  static constexpr int kOffDsum = kOffLse + kStages * kBlockM_ * 4;    // float[kStages][kBlockM]
  static constexpr int kOffBar = kOffDsum + kStages * kBlockM_ * 4;
  static constexpr int kBars = 2 + 2 * kStages + 4;
  static constexpr int kSmemBytes = kOffBar + 8 * kBars + 1024;  // + 1024: swizzle alignment
};

struct BwdWsArgs {
  alignas(64) unsigned char q_tma[128];
  alignas(64) unsigned char do_tma[128];
  alignas(64) unsigned char k_tma[128];
  alignas(64) unsigned char v_tma[128];
  // The sm90 kernel's grid (bwd_cta_order.h), walked as CTA numbers
  // blockIdx.x, + gridDim.x, ...: one each, or a persistent grid of one CTA
  // per SM whose rings run on from one KV block to the next.
  int grid_x, grid_y, grid_z;
  int cta_group;
};

template <typename Traits>
struct BwdWsSmem {
  uint32_t base;
  __device__ __forceinline__ uint32_t k() const { return base + Traits::kOffK; }
  __device__ __forceinline__ uint32_t v() const { return base + Traits::kOffV; }
  __device__ __forceinline__ uint32_t q(int s) const {
    return base + Traits::kOffQ + s * Traits::QTile::kBytes;
  }
  __device__ __forceinline__ uint32_t dout(int s) const {
    return base + Traits::kOffDO + s * Traits::QTile::kBytes;
  }
  __device__ __forceinline__ uint32_t ds(int slot) const {
    return base + Traits::kOffDS + slot * Traits::DSTile::kBytes;
  }
  __device__ __forceinline__ uint32_t lse(int s) const {
    return base + Traits::kOffLse + s * Traits::kBlockM * 4;
  }
  __device__ __forceinline__ uint32_t dsum(int s) const {
    return base + Traits::kOffDsum + s * Traits::kBlockM * 4;
  }
  __device__ __forceinline__ uint32_t bar(int i) const { return base + Traits::kOffBar + 8 * i; }
  __device__ __forceinline__ uint32_t kv_full() const { return bar(0); }
  __device__ __forceinline__ uint32_t kv_empty() const { return bar(1); }
  __device__ __forceinline__ uint32_t q_full(int s) const { return bar(2 + s); }
  __device__ __forceinline__ uint32_t q_empty(int s) const { return bar(2 + Traits::kStages + s); }
  __device__ __forceinline__ uint32_t ds_full(int slot) const {
    return bar(2 + 2 * Traits::kStages + slot);
  }
  __device__ __forceinline__ uint32_t ds_empty(int slot) const {
    return bar(4 + 2 * Traits::kStages + slot);
  }
};

// Ring position of the it-th use of a kSlots-deep ring: slot and phase parity.
template <int kSlots>
struct BwdRingSlot {
  int slot;
  uint32_t phase;
  __device__ __forceinline__ explicit BwdRingSlot(uint32_t it)
      : slot(static_cast<int>(it % kSlots)), phase((it / kSlots) & 1u) {}
};

// Every role walks the CTA's KV blocks and, per block, its (q head, query
// block) iterations in this order.
template <typename Traits, typename Body>
__device__ __forceinline__ void bwd_ws_for_each_kv_block(const BwdParams& p, const BwdWsArgs& a,
                                                         Body&& body) {
  const int ctas = a.grid_x * a.grid_y * a.grid_z;
  for (int cta = blockIdx.x; cta < ctas; cta += gridDim.x) {
    const BwdCtaStart c = bwd_cta_coords(cta, a.grid_x, a.grid_y, a.grid_z, a.cta_group);
    const int dq_slice = p.deterministic ? c.n_first : 0;
    const int b = c.b_first;
    const SeqBounds qs = seq_bounds(p.cu_seqlens_q, b, p.seqlen_q, p.seqlen_q, p.total_q);
    const SeqBounds ks = seq_bounds(p.cu_seqlens_k, b, p.seqlen_k, p.seqlen_k, p.total_k);
    for (int n_block = c.n_first; n_block * Traits::kBlockN < ks.len; n_block += a.grid_x) {
      BwdBlock blk;
      blk.init(p, b, c.slot, n_block * Traits::kBlockN, Traits::kBlockN, Traits::kBlockM, qs, ks);
      body(blk, dq_slice);
    }
  }
}

// Thread 0 of the producer warpgroup: K / V per KV block, Q / dO per query block.
template <typename Traits, typename Elem>
__device__ __forceinline__ void bwd_ws_copy(const BwdParams& p, const BwdWsArgs& a,
                                            const BwdWsSmem<Traits>& sm) {
  using KTile = typename Traits::KTile;
  using QTile = typename Traits::QTile;
  ptx::tma_prefetch_descriptor(a.q_tma);
  ptx::tma_prefetch_descriptor(a.do_tma);
  ptx::tma_prefetch_descriptor(a.k_tma);
  ptx::tma_prefetch_descriptor(a.v_tma);
  uint32_t q_it = 0, kv_it = 0;
  bwd_ws_for_each_kv_block<Traits>(p, a, [&](const BwdBlock& blk, int) {
    const int cb = blk.varlen ? 0 : blk.b;
    // The previous KV block's epilogue read its dK / dV staging out of K / V.
    ptx::mbar_wait(sm.kv_empty(), (kv_it & 1u) ^ 1u);
    ++kv_it;
    const int k_row = static_cast<int>(blk.ks.start) + blk.n0;
    ptx::mbar_arrive_expect_tx(sm.kv_full(), 2 * KTile::kBytes);
#pragma unroll
    for (int box = 0; box < KTile::kBoxes; ++box) {
      ptx::tma_load_4d(sm.k() + box * KTile::kBoxBytes, a.k_tma, box * 64, blk.hk, k_row, cb,
                       sm.kv_full());
      ptx::tma_load_4d(sm.v() + box * KTile::kBoxBytes, a.v_tma, box * 64, blk.hk, k_row, cb,
                       sm.kv_full());
    }
    const int per_head = blk.sched.count();
    for (int t = 0; t < blk.hpc; ++t) {
      const int hq = blk.hq0 + t;
      for (int i = 0; i < per_head; ++i, ++q_it) {
        const int q_row = static_cast<int>(blk.qs.start) + blk.sched.tile(i) * Traits::kBlockM;
        const BwdRingSlot<Traits::kStages> st(q_it);
        ptx::mbar_wait(sm.q_empty(st.slot), st.phase ^ 1u);
        ptx::mbar_arrive_expect_tx(sm.q_full(st.slot), 2 * QTile::kBytes);
#pragma unroll
        for (int box = 0; box < QTile::kBoxes; ++box) {
          ptx::tma_load_4d(sm.q(st.slot) + box * QTile::kBoxBytes, a.q_tma, box * 64, hq, q_row,
                           cb, sm.q_full(st.slot));
          ptx::tma_load_4d(sm.dout(st.slot) + box * QTile::kBoxBytes, a.do_tma, box * 64, hq,
                           q_row, cb, sm.q_full(st.slot));
        }
      }
    }
  });
}

// Warp 1 of the producer warpgroup: LSE and D of every query block.
template <typename Traits>
__device__ __forceinline__ void bwd_ws_copy_rows(const BwdParams& p, const BwdWsArgs& a,
                                                 const BwdWsSmem<Traits>& sm, char* smem,
                                                 int lane) {
  constexpr int kBlockM = Traits::kBlockM;
  uint32_t q_it = 0;
  bwd_ws_for_each_kv_block<Traits>(p, a, [&](const BwdBlock& blk, int) {
    const int per_head = blk.sched.count();
    for (int t = 0; t < blk.hpc; ++t) {
      const int64_t off =
          blk.b * p.lse_batch_stride + (blk.hq0 + t) * p.lse_head_stride + blk.qs.start;
      const float* lse = p.lse_log2 + off;
      const float* dsum = p.dsoftmax_sum + off;
      for (int i = 0; i < per_head; ++i, ++q_it) {
        const int m0 = blk.sched.tile(i) * kBlockM;
        const BwdRingSlot<Traits::kStages> st(q_it);
        ptx::mbar_wait(sm.q_empty(st.slot), st.phase ^ 1u);
        float* s_lse = reinterpret_cast<float*>(smem + (sm.lse(st.slot) - sm.base));
        float* s_dsum = reinterpret_cast<float*>(smem + (sm.dsum(st.slot) - sm.base));
#pragma unroll
        for (int r = lane; r < kBlockM; r += 32) {
          const bool in = m0 + r < blk.sq;
          s_lse[r] = in ? lse[m0 + r] : __int_as_float(0x7f800000);  // +inf: P = 0
          s_dsum[r] = in ? dsum[m0 + r] : 0.f;
        }
        ptx::mbar_arrive(sm.q_full(st.slot));
      }
    }
  });
}

template <typename Traits, typename Elem>
__device__ __forceinline__ void bwd_ws_consume(const BwdParams& p, const BwdWsArgs& a,
                                               const BwdWsSmem<Traits>& sm, char* smem, int wg) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int NTS = Traits::kNTS;
  constexpr int NTD = Traits::kNTD;
  constexpr int NTQ = Traits::kNTQ;
  using Step = BwdSm90Step<Traits, Elem>;

  const int tid = threadIdx.x - 128;  // among the consumers
  const int lane = tid & 31;
  const int wq = (tid >> 5) & 3;
  const int t4 = lane & 3;
  const int key_row = wg * 64 + wq * 16 + (lane >> 2);  // keys n0 + key_row (+ 8)
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const int head_dim = p.head_dim;
  const int64_t dq_rstride = int64_t(p.heads_q) * head_dim;  // floats per padded row
  const int dq_r0 = (Traits::kDqSplitsD ? 0 : wg * 64) + wq * 16;
  const int dq_c0 = Traits::kDqSplitsD ? wg * Traits::kDqN : 0;
  const bool full_d = head_dim == Traits::kHeadDim;

  uint32_t q_it = 0, kv_it = 0;
  bwd_ws_for_each_kv_block<Traits>(p, a, [&](const BwdBlock& blk, int dq_slice) {
    const int sq = blk.sq;
    const int per_head = blk.sched.count();
    const int n_iter = per_head * blk.hpc;
    float* const dq_thread =
        p.dq_accum +
        dq_slice * dq_pad_rows(blk.varlen, p.batch, p.seqlen_q, p.total_q) * dq_rstride +
        (dq_pad_start(blk.varlen, blk.b, p.seqlen_q, blk.qs.start) + dq_r0) * dq_rstride +
        (dq_c0 / 8) * 128 + lane * 4;

    // dQ = dS K of the CTA's it-th block (counted across KV blocks), added
    // into dq_accum; hands the dS slot back.
    auto dq_of = [&](uint32_t it, int m0, int hq) {
      const BwdRingSlot<2> d(it);
      ptx::mbar_wait(sm.ds_full(d.slot), d.phase);
      float acc_dq[1][NTQ][4];
      wgmma::fence();
      Step::issue_dq(acc_dq, sm.ds(d.slot), sm.k(), wg);
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::hold(acc_dq[0]);
      if (lane == 0) ptx::mbar_arrive(sm.ds_empty(d.slot));
      add_dq_tiles(dq_thread + int64_t(m0) * dq_rstride + int64_t(hq) * 16 * head_dim, acc_dq,
                   dq_rstride, p.deterministic, full_d && m0 + kBlockM <= sq, sq - m0 - dq_r0,
                   head_dim - dq_c0);
    };

    float acc_dk[1][NTD][4];
    float acc_dv[1][NTD][4];
#pragma unroll
    for (int i = 0; i < NTD; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_dk[0][i][e] = 0.f;
        acc_dv[0][i][e] = 0.f;
      }

    ptx::mbar_wait(sm.kv_full(), kv_it & 1u);
    int cur_t = 0, cur_i = 0, prev_m0 = 0, prev_hq = blk.hq0;
    for (int it = 0; it < n_iter; ++it) {
      const int hq = blk.hq0 + cur_t;
      const int m0 = blk.sched.tile(cur_i) * kBlockM;
      const BwdRingSlot<Traits::kStages> st(q_it + it);
      const uint32_t q_addr = sm.q(st.slot);
      const uint32_t do_addr = sm.dout(st.slot);
      ptx::mbar_wait(sm.q_full(st.slot), st.phase);

      float s[NTS][4];
      float dp[NTS][4];
      wgmma::fence();
      Step::issue_sdp(s, dp, sm.k(), sm.v(), q_addr, do_addr, wg);
      wgmma::commit();
      DropoutBitsT<NTS> keep;
      if (p.dropout.on()) Step::drop_bits(keep, p, blk, hq, m0, key_row, t4);
      wgmma::wait<0>();
      wgmma::hold(s);
      wgmma::hold(dp);

      const float* lse_b = reinterpret_cast<const float*>(smem + (sm.lse(st.slot) - sm.base));
      const float* dsum_b = reinterpret_cast<const float*>(smem + (sm.dsum(st.slot) - sm.base));
      uint32_t pa[Traits::kKSQ][4];
      uint32_t dsa[Traits::kKSQ][4];
      Step::p_and_ds(s, dp, pa, dsa, p, blk, hq, m0, cur_i, key_row, t4, lse_b, dsum_b,
                     scale_log2, keep);
      wgmma::fence();
      Step::issue_dkv(acc_dv, acc_dk, pa, dsa, q_addr, do_addr);
      wgmma::commit();

      // dS^T of this block into its slot, once both warpgroups' dQ MMAs of
      // two blocks ago are done reading it.
      const uint32_t ds_it = q_it + it;
      const BwdRingSlot<2> d(ds_it);
      ptx::mbar_wait(sm.ds_empty(d.slot), d.phase ^ 1u);
      Step::store_ds(smem + (sm.ds(d.slot) - sm.base), dsa, key_row, t4);
      ptx::fence_proxy_async();  // generic stores -> the other warpgroup's wgmma reads
      ptx::mbar_arrive(sm.ds_full(d.slot));

      wgmma::wait<0>();
      wgmma::hold(acc_dv[0]);
      wgmma::hold(acc_dk[0]);
      wgmma::hold(pa);
      wgmma::hold(dsa);
      // Q, dO, LSE and D of this stage are read (P^T dO and dS^T Q are done).
      if (lane == 0) ptx::mbar_arrive(sm.q_empty(st.slot));
      // dQ of the previous block: by now the other warpgroup has long written
      // its half. (Issued after dV / dK drained: with P^T / dS^T still in
      // flight, dQ's accumulators do not fit the 240 registers.)
      if (it > 0) dq_of(ds_it - 1, prev_m0, prev_hq);
      prev_m0 = m0;
      prev_hq = hq;
      if (++cur_i == per_head) {
        cur_i = 0;
        ++cur_t;
      }
    }
    if (n_iter > 0) dq_of(q_it + n_iter - 1, prev_m0, prev_hq);
    q_it += n_iter;
    ++kv_it;

    // Every MMA that reads K / V is done: the producer may load the next
    // block's while the epilogue stores from registers.
    __syncwarp();
    if (lane == 0) ptx::mbar_arrive(sm.kv_empty());

    // ---- epilogue: dK (times scale) and dV of this warpgroup's keys n0 +
    // key_row (+ 8), head-dim columns 8 nt + 2 t4 (+ 1), or fp32 partial sums.
    if (p.dk_accum == nullptr) {
      Elem* const dk = blk.dk_block<Elem>(p);
      Elem* const dv = blk.dv_block<Elem>(p);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = key_row + 8 * h;
        if (blk.n0 + r >= blk.sk) continue;
#pragma unroll
        for (int nt = 0; nt < NTD; ++nt) {
          const int c = nt * 8 + 2 * t4;
          if (nt * 8 >= head_dim) continue;  // head_dim is a multiple of 8
          *reinterpret_cast<uint32_t*>(dk + int64_t(r) * p.dk_row_stride + c) =
              pack2<Elem>(acc_dk[0][nt][2 * h] * p.scale, acc_dk[0][nt][2 * h + 1] * p.scale);
          *reinterpret_cast<uint32_t*>(dv + int64_t(r) * p.dv_row_stride + c) =
              pack2<Elem>(acc_dv[0][nt][2 * h], acc_dv[0][nt][2 * h + 1]);
        }
      }
    } else {
      add_dkv_partials(p, blk, acc_dk, acc_dv, key_row, 2 * t4);
    }
  });
}

// Launch bounds as in the other sm90 kernels: only sm_90a machine code has
// the body (kThreads, one CTA per SM: the register cap setmaxnreg needs).
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(FASTATTN_WGMMA_AVAILABLE ? Traits::kThreads : 32, 1)
    flash_bwd_ws_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ BwdWsArgs a) {
#if FASTATTN_WGMMA_AVAILABLE
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t raw = ptx::smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  char* smem = smem_raw + pad;
  const BwdWsSmem<Traits> sm{raw + pad};
  if (threadIdx.x == 0) {
    ptx::mbar_init(sm.kv_full(), 1);
    ptx::mbar_init(sm.kv_empty(), Traits::kConsumerWarps);
    for (int s = 0; s < Traits::kStages; ++s) {
      ptx::mbar_init(sm.q_full(s), 1 + 32);  // the copy thread + the LSE / D warp's lanes
      ptx::mbar_init(sm.q_empty(s), Traits::kConsumerWarps);
    }
    for (int d = 0; d < 2; ++d) {
      ptx::mbar_init(sm.ds_full(d), Traits::kConsumerThreads);  // every writer
      ptx::mbar_init(sm.ds_empty(d), Traits::kConsumerWarps);
    }
    ptx::mbar_init_fence();
  }
  __syncthreads();
  const int warp_group = threadIdx.x / 128;
  if (warp_group == 0) {
    ptx::set_max_registers_dec<Traits::kProducerRegs>();
    const int warp = threadIdx.x / 32;
    if (threadIdx.x == 0) bwd_ws_copy<Traits, Elem>(p, a, sm);
    if (warp == 1) bwd_ws_copy_rows<Traits>(p, a, sm, smem, threadIdx.x & 31);
  } else {
    ptx::set_max_registers_inc<Traits::kConsumerRegs>();
    bwd_ws_consume<Traits, Elem>(p, a, sm, smem, warp_group - 1);
  }
#endif
}

}  // namespace gpu
}  // namespace fastattn
