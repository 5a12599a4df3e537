// FlashAttention-2 forward kernel for sm80+ (mma.sync m16n8k16, ldmatrix,
// cp.async), templated on head dim / tile shape / element type only; masks,
// varlen, GQA, the runtime head dim and strides are runtime.
//
// One CTA computes a kBlockM x kHeadDim block of O for one (batch, head):
//   grid = (query blocks [fastest: neighbouring CTAs share K/V in L2], heads_q, batch)
// Each of the kNWarps warps owns kMT consecutive m16 row tiles of the block
// (no inter-warp reduction). K and V tiles (kBlockN rows) stream through shared
// memory with cp.async, staggered so that one is always in flight:
//   wait K[n] -> issue V[n] -> S = Q K[n]^T -> mask (boundary tiles only)
//   -> wait V[n] -> issue K[n-1] -> online softmax (exp2) -> O += P V[n]
// KV blocks come from the CTA's BlockSchedule: dense, from the last visible
// one down to the first (blocks no query of the CTA can see are skipped), or
// a block mask's lists (sparse_fwd: partial blocks also apply their bits). K/V rows come from
// FwdKvLoader: contiguous tensors, or a paged cache through a block table
// (kPaged; the chunked-prefill path of the paged_fwd op).
#pragma once
#include <cstdint>

#include "cuda/common/dropout.h"
#include "cuda/common/fragment.h"
#include "cuda/common/fwd_block.h"
#include "cuda/common/mask.h"
#include "cuda/common/score_bias.h"
#include "cuda/common/softcap.h"
#include "cuda/common/ptx.h"
#include "cuda/common/softmax.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/types.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kQInRegs_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr bool kQInRegs = kQInRegs_;  // keep Q's A fragments in registers

  static constexpr int kMT = kBlockM / (16 * kNWarps);  // m16 tiles per warp
  static constexpr int kNT = kBlockN / 8;               // n8 tiles of S
  static constexpr int kDT = kHeadDim / 8;              // n8 tiles of O
  static constexpr int kKS = kHeadDim / 16;             // k16 steps of Q K^T
  static constexpr int kKV = kBlockN / 16;              // k16 steps of P V
  static_assert(kMT >= 1 && kBlockM == kMT * 16 * kNWarps, "block rows must split over warps");
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tile shape");

  using QTile = SmemTile<kBlockM, kHeadDim>;  // also stages O in the epilogue
  using KTile = SmemTile<kBlockN, kHeadDim>;
  using VTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = QTile::kBytes + KTile::kBytes + VTile::kBytes;
};

// The KV-block iterator of the forward: K and V tiles of one (sequence, KV
// head), rows >= sk zero-filled. Contiguous (dense or varlen) rows, or pages
// through a block table (kPaged); nothing else in the kernel differs.
template <typename Traits, typename Elem, bool kPaged>
struct FwdKvLoader;

template <typename Traits, typename Elem>
struct FwdKvLoader<Traits, Elem, false> {
  ContiguousTileLoader<Traits::kThreads, typename Traits::KTile, Elem> k;
  ContiguousTileLoader<Traits::kThreads, typename Traits::VTile, Elem> v;
  __device__ __forceinline__ void init(const FwdParams& p, const FwdBlock<Elem, false>& blk, int b,
                                       int tid) {
    k.init(blk.k_rows(p, b), p.k_row_stride, p.head_dim, tid);
    v.init(blk.v_rows(p, b), p.v_row_stride, p.head_dim, tid);
  }
  __device__ __forceinline__ void load_k(uint32_t addr, int row0, int sk) const {
    k.load(addr, row0, sk);
  }
  __device__ __forceinline__ void load_v(uint32_t addr, int row0, int sk) const {
    v.load(addr, row0, sk);
  }
};

template <typename Traits, typename Elem>
struct FwdKvLoader<Traits, Elem, true> {
  PagedKvTileLoader<Traits::kThreads, typename Traits::KTile, Elem> kv;
  __device__ __forceinline__ void init(const FwdParams& p, const FwdBlock<Elem, true>& blk, int b,
                                       int tid) {
    const int hk = blk.hk;
    kv.init(static_cast<const Elem*>(p.k) + hk * p.k_head_stride,
            static_cast<const Elem*>(p.v) + hk * p.v_head_stride,
            static_cast<int>(p.k_batch_stride), static_cast<int>(p.k_row_stride),
            p.block_table + b * p.block_table_batch_stride, p.page_size, p.num_pages,
            p.head_dim, tid);
  }
  __device__ __forceinline__ void load_k(uint32_t addr, int row0, int sk) {
    kv.load_k(addr, row0, sk);
  }
  // The kernel loads K[n], V[n], K[n-1], V[n-1], ...: once V[n] is issued the
  // page ids of block n-1 are fetched, landing while S = Q K[n]^T is computed.
  __device__ __forceinline__ void load_v(uint32_t addr, int row0, int sk) {
    kv.load_v(addr, row0, sk);
    if (row0 >= Traits::kBlockN) kv.prefetch(row0 - Traits::kBlockN, sk);
  }
};

template <typename Traits, typename Elem, bool kPaged>
__device__ __forceinline__ void flash_fwd_block(const FwdParams& p, char* smem, int b, int h,
                                                int m_block) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int MT = Traits::kMT;
  constexpr int NT = Traits::kNT;
  constexpr int DT = Traits::kDT;
  constexpr int KS = Traits::kKS;
  constexpr int KV = Traits::kKV;
  using QTile = typename Traits::QTile;
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  FwdBlock<Elem, kPaged> blk;
  if (!blk.init(p, b, h, m_block, kBlockM, kBlockN)) return;  // uniform over the CTA
  const int sq = blk.sq, sk = blk.sk, m0 = blk.m0, m1 = blk.m1;
  const MaskPolicy& mask = blk.mask;
  const BlockSchedule sched = blk.template schedule<kBlockN>(p, b, h);
  const int steps = sched.count();

  const uint32_t q_addr = ptx::smem_u32(smem);
  const uint32_t k_addr = q_addr + QTile::kBytes;
  const uint32_t v_addr = k_addr + KTile::kBytes;
  const int warp_row = warp * MT * 16;  // first row of this warp within the block

  float acc_o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
  OnlineSoftmax<MT> softmax;
  softmax.init();
  DropoutTile drop;
  if (p.dropout.on()) drop.init(p.dropout.rng_state, p.dropout.keep_threshold, int64_t(b) * p.heads_q + h);

  if (steps > 0) {
    FwdKvLoader<Traits, Elem, kPaged> kv;
    kv.init(p, blk, b, tid);
    {
      ContiguousTileLoader<kThreads, QTile, Elem> q_loader;
      q_loader.init(blk.q, p.q_row_stride, p.head_dim, tid);
      q_loader.load(q_addr, 0, sq - m0);
    }
    TileLookahead next;
    next.init(sched, steps);
    kv.load_k(k_addr, next.t0 * kBlockN, sk);
    ptx::cp_async_commit();

    const int a_off = a_lane_offset<QTile>(lane) + QTile::offset(warp_row, 0);
    const int b_off = b_lane_offset<KTile>(lane);
    const int v_off = b_trans_lane_offset<VTile>(lane);

    constexpr int kQR = Traits::kQInRegs ? MT : 1;
    constexpr int kQK = Traits::kQInRegs ? KS : 1;
    uint32_t q_frag[kQR][kQK][4];
    if constexpr (Traits::kQInRegs) {
      ptx::cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) load_a<QTile>(q_frag[mt][kk], q_addr, a_off, mt * 16, kk * 16);
    }

    // Scores of this thread: rows warp_row + mt*16 + lane/4 (+8), cols 2*(lane%4) (+1) + nt*8.
    const int row0 = m0 + warp_row + (lane >> 2);
    const int col_lane = 2 * (lane & 3);

    for (int i = 0; i < steps; ++i) {
      const int n = next.t0;
      ptx::cp_async_wait<0>();
      __syncthreads();  // K[n] (and Q) landed; every warp is done with V[n+1]
      kv.load_v(v_addr, n * kBlockN, sk);
      ptx::cp_async_commit();

      float s[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;

#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Traits::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[mt][kk][e];
          } else {
            load_a<QTile>(a[mt], q_addr, a_off, mt * 16, kk * 16);
          }
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bk[4];
          load_b_pair<KTile>(bk, k_addr, b_off, np * 16, kk * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            ptx::mma_m16n8k16<Elem>(s[mt][2 * np], a[mt], bk[0], bk[1]);
            ptx::mma_m16n8k16<Elem>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }

      const int c0 = n * kBlockN;
      if (p.softcap_in != 0.f) cap_scores(s, p.softcap_in, p.softcap_out);
      if (p.bias.on()) {
        add_bias_c<MT, NT>(s, p.bias, b, h, row0, c0 + col_lane, sq, sk, 1.f / p.scale);
      }
      if (mask.tile_needs_mask(m0, m1, c0, c0 + kBlockN)) {
        apply_mask_c<MT, NT>(s, mask, row0, c0 + col_lane);
      }
      if (const uint32_t* bits = sched.partial_bits(p.sparse, i)) {
        apply_bits_c<MT, NT>(s, bits, p.sparse.words, row0 - m0 + m0 % p.sparse.block_q,
                           c0 - sched.block(i) * p.sparse.block_kv + col_lane);
      }

      ptx::cp_async_wait<0>();
      __syncthreads();  // V[n] landed; every warp is done with K[n]
      if (i + 1 < steps) {
        kv.load_k(k_addr, next.t1 * kBlockN, sk);
        ptx::cp_async_commit();
      }

      softmax.update(s, acc_o, p.scale_log2);
      // Dropout after the row sums: the normalizer counts every probability.
      if (p.dropout.on()) drop_probs_c<MT, NT>(s, drop, row0, c0 + col_lane);

#pragma unroll
      for (int kk = 0; kk < KV; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) c_pair_to_a<Elem>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          uint32_t bv[4];
          load_b_trans_pair<VTile>(bv, v_addr, v_off, kk * 16, dp * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            ptx::mma_m16n8k16<Elem>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
            ptx::mma_m16n8k16<Elem>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
      next.advance(sched, i, steps);
    }
  }

  // ---- epilogue: normalize, LSE, O through shared memory (the Q tile: each
  // warp only ever read its own Q rows, so it may overwrite them now).
  float lse[2 * MT];
  softmax.finalize(acc_o, p.scale, lse);
  if (p.dropout.on()) scale_fragments(acc_o, p.dropout.keep_scale);

  if ((lane & 3) == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_row + mt * 16 + hh * 8 + (lane >> 2);
        if (m0 + r < sq) blk.lse[r] = lse[mt * 2 + hh];
      }
  }
  if (blk.o32 != nullptr) {  // fwd_partial: fp32 straight from the accumulators
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      store_o_f32<DT>(blk.o32, p.o_row_stride, acc_o[mt], warp_row + mt * 16 + (lane >> 2),
                      2 * (lane & 3), sq - m0, p.head_dim);
    }
    return;
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r = warp_row + mt * 16 + (lane >> 2);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(smem + QTile::offset(r, c)) =
          pack2<Elem>(acc_o[mt][dt][0], acc_o[mt][dt][1]);
      *reinterpret_cast<uint32_t*>(smem + QTile::offset(r + 8, c)) =
          pack2<Elem>(acc_o[mt][dt][2], acc_o[mt][dt][3]);
    }
  }
  __syncthreads();
  store_tile<kThreads, QTile>(blk.o, p.o_row_stride, smem, sq - m0, p.head_dim, tid);
}

template <typename Traits, typename Elem, bool kPaged>
__global__ void __launch_bounds__(Traits::kThreads)
    flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  // Masks that bound keys on the right (causal, windows) give the last query
  // blocks the most work: schedule those first.
  const int m_block =
      p.mask.window_right >= 0 ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    flash_fwd_block<Traits, Elem, kPaged>(p, smem, b, h, m_block);
    if (b + gridDim.z < p.batch) __syncthreads();  // smem is reused by the next sequence
  }
}

}  // namespace gpu
}  // namespace fastattn
