// FlashAttention forward for sm90, warp-specialized: one producer warpgroup
// feeds two consumer warpgroups through mbarrier rings, and a persistent grid
// walks the tiles (fwd_tile_order.h).
//
// Roles (384 threads; registers moved with setmaxnreg, warp_roles.h):
//   - producer, one thread of warpgroup 0: the copy engine (TMA) brings Q
//     once per tile and K/V one block per step into kStages-deep rings; each
//     stage has a "full" barrier (the copy's bytes landed) and an "empty"
//     one (every consumer warp is done reading it). It runs ahead of the
//     consumers by up to the ring depth, also across tiles.
//   - consumers, warpgroups 1 and 2, 64 query rows each: per KV block the
//     step of the sm90 kernel (flash_fwd_sm90_kernel.cuh): S = Q K^T on the
//     tensor cores while the previous block's O += P V runs, the online
//     softmax of S overlapping P V. Masks, windows, GQA, varlen, block-sparse
//     schedules with bits, and score bias are the shared pieces
//     (FwdBlock, BlockSchedule, MaskPolicy, score_bias.h). With kPingPong the
//     two warpgroups take turns issuing their MMAs (named barriers), so one
//     group's softmax runs under the other's MMAs.
//   - epilogue per consumer warpgroup: O through its own shared-memory tile
//     (not Q's: the producer may already be loading the next tile's Q) to
//     global with 16-byte stores, LSE from registers.
//
// What the copy engine reads past a sequence: dense batches are 4-D tensor
// maps, so rows past seqlen read as zeros; varlen batches are one packed
// tensor, so a tile reaching past its sequence reads the next sequence's
// rows. Those keys are masked (P = 0) and those query rows are never stored.
#pragma once
#include <cstdint>

#include "cuda/common/fwd_block.h"
#include "cuda/common/dropout.h"
#include "cuda/common/softmax.h"
#include "cuda/common/swizzled_tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/warp_roles.h"
#include "cuda/common/wgmma.h"
#include "cuda/flash/fwd_sm90_step.h"
#include "cuda/flash/fwd_tile_order.h"

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kStages_, bool kPingPong_, int kFmaExpEvery_ = 0>
struct FwdWsTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStages = kStages_;
  static constexpr bool kPingPong = kPingPong_;
  // Every kFmaExpEvery-th n8 tile of scores exponentiated on the FMA pipe (0: none).
  static constexpr int kFmaExpEvery = kFmaExpEvery_;
  static constexpr int kConsumerGroups = 2;
  static constexpr int kBlockM = 64 * kConsumerGroups;
  static constexpr int kBlockN = 128;
  static constexpr int kThreads = 128 * (1 + kConsumerGroups);
  static constexpr int kConsumerWarps = 4 * kConsumerGroups;
  // 65536 registers: 128 x 24 + 256 x 240 = 64512.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kNT = kBlockN / 8;
  static constexpr int kDT = kHeadDim / 8;
  static constexpr int kKS = kHeadDim / 16;
  static constexpr int kKV = kBlockN / 16;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma widths compiled in wgmma.h");

  using QTile = SwizzledTile128<kBlockM, kHeadDim>;
  using KTile = SwizzledTile128<kBlockN, kHeadDim>;
  using VTile = SwizzledTile128<kBlockN, kHeadDim>;
  using OTile = SwizzledTile128<64, kHeadDim>;  // one per consumer warpgroup

  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + QTile::kBytes;
  static constexpr int kVOff = kKOff + kStages * KTile::kBytes;
  static constexpr int kOOff = kVOff + kStages * VTile::kBytes;
  static constexpr int kBarOff = kOOff + kConsumerGroups * OTile::kBytes;
  static constexpr int kBars = 2 + 4 * kStages;
  // + 1024: the dynamic shared memory base is only 16-byte aligned and the
  // swizzle needs every box at a 1024-byte boundary.
  static constexpr int kSmemBytes = kBarOff + 8 * kBars + 1024;
};

// Tensor maps of q, k, v (4-D: head_dim, heads, rows, batch; boxes of 64
// columns x kBlockM or kBlockN rows of one head) and the tile order.
struct FwdWsArgs {
  alignas(64) unsigned char q_tma[128];
  alignas(64) unsigned char k_tma[128];
  alignas(64) unsigned char v_tma[128];
  FwdTileOrder order;
};

// Shared-memory addresses of the rings and barriers.
template <typename Traits>
struct FwdWsSmem {
  uint32_t base;
  __device__ __forceinline__ uint32_t q() const { return base + Traits::kQOff; }
  __device__ __forceinline__ uint32_t k(int s) const {
    return base + Traits::kKOff + s * Traits::KTile::kBytes;
  }
  __device__ __forceinline__ uint32_t v(int s) const {
    return base + Traits::kVOff + s * Traits::VTile::kBytes;
  }
  __device__ __forceinline__ uint32_t o(int wg) const {
    return base + Traits::kOOff + wg * Traits::OTile::kBytes;
  }
  __device__ __forceinline__ uint32_t bar(int i) const { return base + Traits::kBarOff + 8 * i; }
  __device__ __forceinline__ uint32_t q_full() const { return bar(0); }
  __device__ __forceinline__ uint32_t q_empty() const { return bar(1); }
  __device__ __forceinline__ uint32_t k_full(int s) const { return bar(2 + s); }
  __device__ __forceinline__ uint32_t k_empty(int s) const { return bar(2 + Traits::kStages + s); }
  __device__ __forceinline__ uint32_t v_full(int s) const { return bar(2 + 2 * Traits::kStages + s); }
  __device__ __forceinline__ uint32_t v_empty(int s) const {
    return bar(2 + 3 * Traits::kStages + s);
  }
};

// Ring position of the it-th KV block a CTA visits (counted across tiles):
// its stage and the parity of that stage's use.
template <int kStages>
struct RingSlot {
  int stage;
  uint32_t phase;
  __device__ __forceinline__ explicit RingSlot(uint32_t it)
      : stage(static_cast<int>(it % kStages)), phase((it / kStages) & 1u) {}
};

// Arms `full` for a whole tile and copies the tile's 64-column boxes of
// (head, row .. row + Tile::kRows, batch) from a map into dst.
template <typename Tile>
__device__ __forceinline__ void tma_fill_tile(uint32_t dst, const void* map, int head, int row,
                                              int batch, uint32_t full) {
  ptx::mbar_arrive_expect_tx(full, Tile::kBytes);
#pragma unroll
  for (int box = 0; box < Tile::kBoxes; ++box) {
    ptx::tma_load_4d(dst + box * Tile::kBoxBytes, map, box * 64, head, row, batch, full);
  }
}

template <typename Traits, typename Elem>
__device__ __forceinline__ void fwd_ws_produce(const FwdParams& p, const FwdWsArgs& a,
                                               const FwdWsSmem<Traits>& sm) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  using QTile = typename Traits::QTile;
  using KTile = typename Traits::KTile;
  ptx::tma_prefetch_descriptor(a.q_tma);
  ptx::tma_prefetch_descriptor(a.k_tma);
  ptx::tma_prefetch_descriptor(a.v_tma);
  const bool varlen = p.cu_seqlens_q != nullptr;
  uint32_t kv_it = 0, q_it = 0;
  for (int t = blockIdx.x; t < a.order.tiles; t += gridDim.x) {
    int b, h, m_block;
    a.order.coords(t, b, h, m_block);
    FwdBlock<Elem, false> blk;
    if (!blk.init(p, b, h, m_block, kBlockM, kBlockN)) continue;
    const BlockSchedule sched = blk.template schedule<kBlockN>(p, b, h);
    const int steps = sched.count();
    if (steps == 0) continue;  // the consumers skip this tile's Q as well
    const int cb = varlen ? 0 : b;

    // The empty barriers start in phase 0, so waiting for parity 1 passes at once.
    ptx::mbar_wait(sm.q_empty(), (q_it & 1u) ^ 1u);
    tma_fill_tile<QTile>(sm.q(), a.q_tma, h, static_cast<int>(blk.qs.start) + blk.m0, cb,
                         sm.q_full());
    ++q_it;

    const int k_row0 = static_cast<int>(blk.ks.start);
    for (int i = 0; i < steps; ++i, ++kv_it) {
      const int row = k_row0 + sched.tile(i) * kBlockN;
      const RingSlot<Traits::kStages> slot(kv_it);
      ptx::mbar_wait(sm.k_empty(slot.stage), slot.phase ^ 1u);
      tma_fill_tile<KTile>(sm.k(slot.stage), a.k_tma, blk.hk, row, cb, sm.k_full(slot.stage));
      ptx::mbar_wait(sm.v_empty(slot.stage), slot.phase ^ 1u);
      tma_fill_tile<typename Traits::VTile>(sm.v(slot.stage), a.v_tma, blk.hk, row, cb,
                                            sm.v_full(slot.stage));
    }
  }
}

// Named barriers 1 + wg: one consumer warpgroup's epilogue; 3 + wg: its turn
// to issue MMAs (kPingPong).
constexpr int kEpilogueBarrier = 1;
constexpr int kMmaTurnBarrier = 3;

template <typename Traits, typename Elem>
__device__ __forceinline__ void fwd_ws_consume(const FwdParams& p, const FwdTileOrder& order,
                                               const FwdWsSmem<Traits>& sm, char* smem, int wg) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int NT = Traits::kNT;
  constexpr int DT = Traits::kDT;
  constexpr int KV = Traits::kKV;
  constexpr int kStages = Traits::kStages;
  using OTile = typename Traits::OTile;
  using Step = FwdSm90Step<Traits, Elem>;

  const int tid = threadIdx.x - 128 * (wg + 1);  // within this warpgroup
  const int lane = tid & 31;
  const int warp_row = wg * 64 + (tid >> 5) * 16;  // first row of this warp in the block
  const int col_lane = 2 * (lane & 3);
  const int other_turn = kMmaTurnBarrier + (wg ^ 1);
  if constexpr (Traits::kPingPong) {
    if (wg == 1) ptx::named_barrier_arrive(kMmaTurnBarrier, 256);  // group 0 goes first
  }

  uint32_t kv_it = 0, q_it = 0;
  for (int t = blockIdx.x; t < order.tiles; t += gridDim.x) {
    int b, h, m_block;
    order.coords(t, b, h, m_block);
    FwdBlock<Elem, false> blk;
    if (!blk.init(p, b, h, m_block, kBlockM, kBlockN)) continue;
    const int sq = blk.sq, m0 = blk.m0;
    const BlockSchedule sched = blk.template schedule<kBlockN>(p, b, h);
    const int steps = sched.count();

    float acc_o[1][DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
    OnlineSoftmax<1> softmax;
    softmax.init();
    DropoutTile drop;
    if (p.dropout.on()) drop.init(p.dropout.rng_state, p.dropout.keep_threshold, int64_t(b) * p.heads_q + h);

    if (steps > 0) {
      const int row0 = m0 + warp_row + (lane >> 2);
      TileLookahead next;
      next.init(sched, steps);
      ptx::mbar_wait(sm.q_full(), q_it & 1u);
      uint32_t pa[KV][4];  // P of the previous block as A fragments
      for (int i = 0; i < steps; ++i) {
        const int n = next.t0;
        const RingSlot<kStages> cur(kv_it + i);
        const RingSlot<kStages> prev(kv_it + i - 1);  // meaningful for i > 0
        ptx::mbar_wait(sm.k_full(cur.stage), cur.phase);
        if (i > 0) ptx::mbar_wait(sm.v_full(prev.stage), prev.phase);
        if constexpr (Traits::kPingPong) ptx::named_barrier_sync(kMmaTurnBarrier + wg, 256);
        float s[1][NT][4];
        Step::issue_qk(s[0], sm.q(), sm.k(cur.stage), wg);
        if (i > 0) {
          Step::issue_pv(acc_o[0], pa, sm.v(prev.stage));
          if constexpr (Traits::kPingPong) ptx::named_barrier_arrive(other_turn, 256);
          wgmma::wait<1>();  // S done; P V may still run
        } else {
          if constexpr (Traits::kPingPong) ptx::named_barrier_arrive(other_turn, 256);
          wgmma::wait<0>();
        }
        wgmma::hold(s[0]);
        // This warp is done with K (and, after the tile's last S, with Q).
        if (lane == 0) {
          ptx::mbar_arrive(sm.k_empty(cur.stage));
          if (i == steps - 1) ptx::mbar_arrive(sm.q_empty());
        }

        Step::modify_scores(s, p, blk, sched, i, n, b, h, row0, col_lane);
        float factor[2];
        const bool rescale =
            softmax.template update_scores<Traits::kFmaExpEvery>(s, p.scale_log2, factor);
        // Dropout after the row sums (the normalizer counts every probability).
        if (p.dropout.on()) drop_probs_c<1, NT>(s, drop, row0, n * kBlockN + col_lane);
        // Unconditional (a no-op at i = 0): behind a branch ptxas would assume
        // P V may still be running below and serialize every MMA.
        wgmma::wait<0>();
        wgmma::hold(acc_o[0]);
        if (i > 0 && lane == 0) ptx::mbar_arrive(sm.v_empty(prev.stage));
        // (Rescaling O while this step's S = Q K^T runs, before the P V that
        // needs it, makes ptxas serialize the MMAs: O belongs to the open
        // MMA stage.)
        if (rescale) softmax.rescale(acc_o, factor);
        Step::p_to_a(pa, s);
        // Keep both writes above the next step's wgmma::fence().
        wgmma::hold(acc_o[0]);
        wgmma::hold(pa);
        next.advance(sched, i, steps);
      }

      // The last block's P V.
      const RingSlot<kStages> last(kv_it + steps - 1);
      ptx::mbar_wait(sm.v_full(last.stage), last.phase);
      Step::issue_pv(acc_o[0], pa, sm.v(last.stage));
      wgmma::wait<0>();
      wgmma::hold(acc_o[0]);
      if (lane == 0) ptx::mbar_arrive(sm.v_empty(last.stage));
      kv_it += steps;
      ++q_it;
    }

    // ---- epilogue: normalize, LSE, O through this warpgroup's own tile.
    float lse[2];
    softmax.finalize(acc_o, p.scale, lse);
    if (p.dropout.on()) scale_fragments(acc_o, p.dropout.keep_scale);
    Step::store_lse(blk, lse, warp_row + (lane >> 2), lane);
    if (blk.o32 != nullptr) {  // fwd_partial: fp32 straight from the accumulators, no tile
      store_o_f32<DT>(blk.o32 + int64_t(wg) * 64 * p.o_row_stride, p.o_row_stride, acc_o[0],
                      (tid >> 5) * 16 + (lane >> 2), col_lane, sq - m0 - wg * 64, p.head_dim);
      continue;
    }
    char* o_smem = smem + (sm.o(wg) - sm.base);
    ptx::named_barrier_sync(kEpilogueBarrier + wg, 128);  // the previous tile's stores read it
    // Rows of this group's own 64-row tile.
    Step::template write_o<OTile>(o_smem, acc_o, (tid >> 5) * 16 + (lane >> 2), col_lane);
    ptx::named_barrier_sync(kEpilogueBarrier + wg, 128);
    store_swizzled_tile<128, OTile>(blk.o + int64_t(wg) * 64 * p.o_row_stride, p.o_row_stride,
                                    o_smem, sq - m0 - wg * 64, p.head_dim, tid);
  }
}

// Launch bounds as in flash_fwd_sm90_kernel: only sm_90a machine code has the
// body (kThreads, one CTA per SM: the register cap setmaxnreg needs); the host
// checks the image (kernel_select.h, sm90_body_runnable).
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(FASTATTN_WGMMA_AVAILABLE ? Traits::kThreads : 32, 1)
    flash_fwd_ws_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ FwdWsArgs a) {
#if FASTATTN_WGMMA_AVAILABLE
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t raw = ptx::smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  char* smem = smem_raw + pad;
  const FwdWsSmem<Traits> sm{raw + pad};
  if (threadIdx.x == 0) {
    ptx::mbar_init(sm.q_full(), 1);
    ptx::mbar_init(sm.q_empty(), Traits::kConsumerWarps);
    for (int s = 0; s < Traits::kStages; ++s) {
      ptx::mbar_init(sm.k_full(s), 1);
      ptx::mbar_init(sm.v_full(s), 1);
      ptx::mbar_init(sm.k_empty(s), Traits::kConsumerWarps);
      ptx::mbar_init(sm.v_empty(s), Traits::kConsumerWarps);
    }
    ptx::mbar_init_fence();
  }
  __syncthreads();
  const int warp_group = threadIdx.x / 128;
  if (warp_group == 0) {
    ptx::set_max_registers_dec<Traits::kProducerRegs>();
    if (threadIdx.x == 0) fwd_ws_produce<Traits, Elem>(p, a, sm);
  } else {
    ptx::set_max_registers_inc<Traits::kConsumerRegs>();
    fwd_ws_consume<Traits, Elem>(p, a.order, sm, smem, warp_group - 1);
  }
#endif
}

}  // namespace gpu
}  // namespace fastattn
