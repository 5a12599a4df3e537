// FlashAttention forward for sm90 (Hopper): the sm80 kernel's algorithm with
// the two GEMMs on warpgroup MMAs (wgmma, common/wgmma.h) instead of
// mma.sync. Same masks, varlen, GQA, strides, LSE and skipped tiles; the
// tile shape is the only template parameter besides the element type.
//
// One CTA computes a kBlockM x kHeadDim block of O for one (batch, head) with
// kWarpGroups warpgroups of 64 query rows each (kBlockM = 64 * kWarpGroups):
//   grid = (query blocks, heads_q, batch) as in the sm80 kernel.
// Tiles live in shared memory as SwizzledTile128 (the layout wgmma reads
// through descriptors): Q once, K and V in two stages each, filled by
// cp.async (any stride, per-row zero-fill: varlen tails and padded head dims
// need no special path). Per KV block n, from the last visible one down:
//   wait K[n], V[n+1] -> barrier -> issue K[n-1], V[n] into free stages
//   -> issue S = Q K[n]^T (wgmma, A and B from shared memory)
//      and O += P[n+1] V[n+1] (wgmma, P from registers, V read transposed)
//   -> wait for S only; mask (boundary tiles); online softmax of S in
//      registers while P V still runs (the accumulator layout is mma.sync's,
//      so OnlineSoftmax<1> and apply_mask_c run unchanged)
//   -> wait for P V; rescale O if a row max moved; P[n] -> A fragments.
// One barrier per block; the warpgroups are otherwise free to drift, so one
// group's softmax also overlaps another group's MMAs.
#pragma once
#include <cstdint>

#include "cuda/common/fragment.h"
#include "cuda/common/fwd_block.h"
#include "cuda/common/ptx.h"
#include "cuda/common/dropout.h"
#include "cuda/common/softmax.h"
#include "cuda/common/swizzled_tile_io.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/common/wgmma.h"
#include "cuda/common/params.h"
#include "cuda/flash/fwd_sm90_step.h"

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kBlockN_, int kWarpGroups_, int kCtasPerSm_ = 1>
struct FwdSm90Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpGroups = kWarpGroups_;
  static constexpr int kCtasPerSm = kCtasPerSm_;  // register budget: __launch_bounds__ minimum
  static constexpr int kBlockM = 64 * kWarpGroups;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kNT = kBlockN / 8;    // n8 tiles of S per warp
  static constexpr int kDT = kHeadDim / 8;   // n8 tiles of O per warp
  static constexpr int kKS = kHeadDim / 16;  // k16 steps of Q K^T
  static constexpr int kKV = kBlockN / 16;   // k16 steps of P V
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma widths compiled in wgmma.h");
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma widths compiled in wgmma.h");

  using QTile = SwizzledTile128<kBlockM, kHeadDim>;  // also stages O in the epilogue
  using KTile = SwizzledTile128<kBlockN, kHeadDim>;
  using VTile = SwizzledTile128<kBlockN, kHeadDim>;
  // Q, two K stages, two V stages; + 1024: the dynamic shared memory base is
  // only 16-byte aligned and the swizzle needs every box at a 1024-byte boundary.
  static constexpr int kSmemBytes = QTile::kBytes + 2 * (KTile::kBytes + VTile::kBytes) + 1024;
};

template <typename Traits, typename Elem>
__device__ __forceinline__ void flash_fwd_sm90_block(const FwdParams& p, uint32_t smem_addr,
                                                     char* smem, int b, int h, int m_block) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int NT = Traits::kNT;
  constexpr int DT = Traits::kDT;
  constexpr int KV = Traits::kKV;
  using QTile = typename Traits::QTile;
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;
  using Step = FwdSm90Step<Traits, Elem>;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int wg = tid >> 7;
  const int warp_row = wg * 64 + ((tid >> 5) & 3) * 16;  // first row of this warp in the block

  FwdBlock<Elem, false> blk;
  if (!blk.init(p, b, h, m_block, kBlockM, kBlockN)) return;  // uniform over the CTA
  const int sq = blk.sq, sk = blk.sk, m0 = blk.m0;
  const BlockSchedule sched = blk.template schedule<kBlockN>(p, b, h);
  const int steps = sched.count();

  const uint32_t q_addr = smem_addr;
  // Two K stages, then two V stages.
  const uint32_t k_ring = q_addr + QTile::kBytes;
  const uint32_t v_ring = k_ring + 2 * KTile::kBytes;

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
    SwizzledTileLoader<kThreads, KTile, Elem> k_loader;
    SwizzledTileLoader<kThreads, VTile, Elem> v_loader;
    k_loader.init(blk.k_rows(p, b), p.k_row_stride, p.head_dim, tid);
    v_loader.init(blk.v_rows(p, b), p.v_row_stride, p.head_dim, tid);
    {
      SwizzledTileLoader<kThreads, QTile, Elem> q_loader;
      q_loader.init(blk.q, p.q_row_stride, p.head_dim, tid);
      q_loader.load(q_addr, 0, sq - m0);
    }
    TileLookahead next;
    next.init(sched, steps);
    k_loader.load(k_ring, next.t0 * kBlockN, sk);
    ptx::cp_async_commit();

    // Scores of this thread: rows warp_row + lane/4 (+8), cols 2*(lane%4) (+1) + nt*8.
    const int row0 = m0 + warp_row + (lane >> 2);
    const int col_lane = 2 * (lane & 3);

    // Step i works on block n = sched.tile(i) ("n+1" below: the previous step's
    // block, "n-1": the next one): S = Q K[n]^T runs on the tensor
    // cores together with O += P[n+1] V[n+1] of the previous step, and the
    // softmax of S overlaps the latter. Step i needs K[n] (stage i & 1) and
    // V[n+1] (stage (i - 1) & 1), both issued at the top of step i - 1; its
    // own top issues K[n-1] and V[n] into the stages steps i - 1 and i - 2
    // used, which every warpgroup has finished once past the barrier.
    uint32_t pa[KV][4];  // P of the previous block as A fragments
    int i = 0;
    for (; i < steps; ++i) {
      const int n = next.t0;
      ptx::cp_async_wait<0>();
      ptx::fence_proxy_async();  // own cp.async writes -> visible to wgmma's (async proxy) reads
      __syncthreads();
      const uint32_t k_addr = k_ring + (i & 1) * KTile::kBytes;
      if (i + 1 < steps) {
        k_loader.load(k_ring + ((i + 1) & 1) * KTile::kBytes, next.t1 * kBlockN, sk);
      }
      v_loader.load(v_ring + (i & 1) * VTile::kBytes, n * kBlockN, sk);
      ptx::cp_async_commit();

      float s[1][NT][4];
      Step::issue_qk(s[0], q_addr, k_addr, wg);
      if (i > 0) {
        Step::issue_pv(acc_o[0], pa, v_ring + ((i - 1) & 1) * VTile::kBytes);
        wgmma::wait<1>();  // S done; P V may still run
      } else {
        wgmma::wait<0>();
      }
      wgmma::hold(s[0]);

      Step::modify_scores(s, p, blk, sched, i, n, b, h, row0, col_lane);
      float factor[2];
      const bool rescale = softmax.update_scores(s, p.scale_log2, factor);
      // Dropout after the row sums (the normalizer counts every probability).
      if (p.dropout.on()) drop_probs_c<1, NT>(s, drop, row0, n * kBlockN + col_lane);
      wgmma::wait<0>();
      wgmma::hold(acc_o[0]);
      if (rescale) softmax.rescale(acc_o, factor);
      Step::p_to_a(pa, s);
      // Keep both writes above the next step's wgmma::fence() (else ptxas
      // has to insert another fence in front of the MMAs that read them).
      wgmma::hold(acc_o[0]);
      wgmma::hold(pa);
      next.advance(sched, i, steps);
    }

    // The last block's P V.
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async();
    __syncthreads();
    Step::issue_pv(acc_o[0], pa, v_ring + ((i - 1) & 1) * VTile::kBytes);
    wgmma::wait<0>();
    wgmma::hold(acc_o[0]);
  }

  // ---- epilogue: normalize, LSE, O through shared memory (this warpgroup's
  // own Q rows: no other group reads them, and its last MMA has completed).
  float lse[2];
  softmax.finalize(acc_o, p.scale, lse);
  if (p.dropout.on()) scale_fragments(acc_o, p.dropout.keep_scale);

  Step::store_lse(blk, lse, warp_row + (lane >> 2), lane);
  if (blk.o32 != nullptr) {  // fwd_partial: fp32 straight from the accumulators
    store_o_f32<DT>(blk.o32, p.o_row_stride, acc_o[0], warp_row + (lane >> 2), 2 * (lane & 3),
                    sq - m0, p.head_dim);
    return;
  }
  Step::template write_o<QTile>(smem, acc_o, warp_row + (lane >> 2), 2 * (lane & 3));
  __syncthreads();
  store_swizzled_tile<kThreads, QTile>(blk.o, p.o_row_stride, smem, sq - m0, p.head_dim, tid);
}

// Launch bounds double as a capability tag: only sm_90a machine code has the
// real kernel (kThreads per CTA); every other image gets an empty body capped
// at 32 threads, and the host launches this kernel only where the image the
// device runs reports kThreads (kernel_select.h, sm90_body_runnable).
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(FASTATTN_WGMMA_AVAILABLE ? Traits::kThreads : 32,
                                  FASTATTN_WGMMA_AVAILABLE ? Traits::kCtasPerSm : 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if FASTATTN_WGMMA_AVAILABLE
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t raw = ptx::smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  char* smem = smem_raw + pad;
  const uint32_t smem_addr = raw + pad;
  const int m_block =
      p.mask.window_right >= 0 ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    flash_fwd_sm90_block<Traits, Elem>(p, smem_addr, smem, b, h, m_block);
    if (b + gridDim.z < p.batch) __syncthreads();  // smem is reused by the next sequence
  }
#endif
}

}  // namespace gpu
}  // namespace fastattn
