// Split-KV decode kernel (flash-decoding) for sm80+: a few query tokens per
// sequence against a long KV cache. Memory-bound: the design goal is to keep
// enough K/V bytes in flight per SM and to read each cache byte once.
//
// One CTA (4 warps) handles one (m-block, split, KV head, sequence):
//   - GQA packing: the rows of the tile are (query, q head of this KV head)
//     pairs, r <-> (i = r / group, head hk * group + r % group), so one pass
//     over K/V serves every query head of the group (DecodeParams).
//   - The 4 warps form a warps_m x warps_n grid (runtime; warps_m = 1 for the
//     common <= 16 rows): each warp owns one m16 row tile and, of every
//     kBlockN-key stage, the kWarpKeys-key groups c = wn, wn + warps_n, ...
//     It keeps its own online-softmax state (common/softmax.h) over its keys.
//   - K/V stream through a ring of `stages` (runtime, 2..4) shared-memory
//     stages with cp.async, stages - 1 in flight while one is computed. Q is
//     staged with the first stage in the last ring slot, then held in
//     registers as mma A fragments.
//   - DecodeTmaTraits (sm90, contiguous caches, head dims 64 / 128): the same
//     ring filled by the copy engine instead (one TMA box per 64 columns of
//     K and V per stage, issued by thread 0, an mbarrier per stage, 128-byte
//     swizzled tiles). The math is the same; only the loads and the fragment
//     addressing differ. (The copy engine streams this access pattern ~3.5%
//     faster than cp.async on the H100: scripts/dev_stream_ceiling.cu.) Q
//     goes from global memory straight into mma A fragments (no ring slot
//     waits for it).
//   - Epilogue: the warps of one row tile merge their (O, LSE) partials
//     through shared memory (the LSE-weighted merge of merge_states), then
//     write out/lse directly (num_splits == 1), or merge the splits inside a
//     thread-block cluster (sm90, a few splits: decode_cluster_combine,
//     through distributed shared memory), or write fp32 partials for the
//     combine kernel.
//   - Latency: with one CTA of 4 warps per SM (the usual decode grid), each
//     scheduler runs a single warp, so every dependent instruction of the
//     prologue and epilogue is on the critical path (H100 timeline probe,
//     B=1 x 16k: 1.6 us from CTA start to the first TMA issue, 2 us of
//     epilogue, before this was trimmed): the prologue issues the first K/V
//     stages before anything else, divisions are multiply-highs (FastDiv),
//     and the epilogue merge is branch-free and skips padding rows.
// The key range of a sequence (from its device-side length and the mask) is
// divided evenly among the splits on the device, so the launch shape depends
// only on host-known maxima (CUDA-graph safe). The only place that knows how
// K/V rows are addressed is DecodeKvLoader: contiguous cache rows, or pages
// through a block table (kPaged, common/tile_io.h PagedKvTileLoader).
#pragma once
#include <cstdint>

#include "cuda/common/cluster.h"
#include "cuda/common/fragment.h"
#include "cuda/common/mask.h"
#include "cuda/common/ptx.h"
#include "cuda/common/softmax.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/decode_params.h"

namespace fastattn {
namespace gpu {

// Tuning hooks for dev A/B builds (not set by setup.py):
// -DFASTATTN_DECODE_WARPS=W -DFASTATTN_DECODE_BLOCK_N=N (head dims <= 128).
#ifndef FASTATTN_DECODE_WARPS
#define FASTATTN_DECODE_WARPS 4
#endif
#ifndef FASTATTN_DECODE_BLOCK_N
#define FASTATTN_DECODE_BLOCK_N 64
#endif

template <int kHeadDim_>
struct DecodeTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = FASTATTN_DECODE_WARPS;
  static constexpr int kThreads = kNWarps * 32;
  // Keys per pipeline stage. 64: measured on H200 (Hkv=8, D=128) against
  // 128-key stages (32-key warp groups, NT = 4 independent Q K^T chains):
  // equal at B=1, 64-key stages 1-4% faster for batches (a 3-stage ring of
  // 64-key stages leaves room for 2 CTAs per SM). Larger head dims keep 64 at
  // most (a 128-key stage of hdim 192/256 leaves no room for a ring).
  static constexpr int kBlockN = kHeadDim <= 128 ? FASTATTN_DECODE_BLOCK_N : 64;
  // Keys one warp takes of a stage at a time (NT = kWarpKeys / 8 n8 tiles of S).
  static constexpr int kWarpKeys = kBlockN / kNWarps;
  static constexpr int kGroups = kBlockN / kWarpKeys;  // warp-key groups per stage
  static constexpr int kMaxRows = 16 * kNWarps;     // rows per CTA when warps_m = 4
  static constexpr int kDT = kHeadDim / 8;          // n8 tiles of O
  static constexpr int kKS = kHeadDim / 16;         // k16 steps of Q K^T
  static constexpr int kMinStages = 2;
  static constexpr int kMaxStages = 4;
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kWarpKeys % 16 == 0 && kBlockN % kWarpKeys == 0, "whole k16 steps of PV per group");
  static_assert(kGroups % kNWarps == 0, "whole groups per warp when every warp splits the keys");

  using KTile = SmemTile<kBlockN, kHeadDim>;
  using VTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;
  // The cp.async variant stages Q in the last ring slot (flash_decode_block).
  using QTile = SmemTile<kMaxRows, kHeadDim>;
  static_assert(QTile::kBytes <= kStageBytes, "Q is staged in one ring slot");

  // Epilogue (reuses the ring): per-warp fp32 O [kNWarps][16][kOStride],
  // per-warp LSE [kNWarps][16], merged LSE [kMaxRows].
  static constexpr int kOStride = kHeadDim + 8;  // floats; 2-way bank conflicts at most
  static constexpr int kEpilogueBytes =
      kNWarps * 16 * kOStride * 4 + kNWarps * 16 * 4 + kMaxRows * 4;
  // Output phase: threads per row (8 columns each) and rows per pass.
  static constexpr int kTpr = next_pow2(kHeadDim / 8);
  static constexpr int kRowsPerPass = kThreads / kTpr;

  static_assert(kEpilogueBytes <= kMinStages * kStageBytes, "epilogue reuses the ring");
  static_assert(kThreads % kTpr == 0, "output threads per row");

  static constexpr bool kTma = false;
  static constexpr int smem_bytes(int stages) { return stages * kStageBytes; }
};

// Head dims with a copy-engine (TMA) variant: whole 64-column swizzled boxes.
constexpr bool decode_has_tma(int head_dim) { return head_dim == 64 || head_dim == 128; }

// The copy-engine (TMA) variant's tiles: K / V as 128-byte swizzled boxes of
// 64 columns (the engine's SWIZZLE_128B layout); Q, the epilogue and the math
// as in DecodeTraits. Shared memory: 1024 bytes of slack to align the ring
// (swizzled boxes start 1024-aligned), the stages, one mbarrier per stage.
template <int kHeadDim_>
struct DecodeTmaTraits : DecodeTraits<kHeadDim_> {
  using Base = DecodeTraits<kHeadDim_>;
  static constexpr bool kTma = true;
  using KTile = SwizzledTile128<Base::kBlockN, kHeadDim_>;
  using VTile = SwizzledTile128<Base::kBlockN, kHeadDim_>;
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;
  static constexpr int kAlignSlack = 1024;
  static constexpr int kBarrierBytes = 8 * Base::kMaxStages;
  static_assert(Base::kEpilogueBytes <= Base::kMinStages * kStageBytes, "epilogue reuses the ring");
  static_assert(kStageBytes % 1024 == 0 && KTile::kBoxBytes % 1024 == 0, "1024-aligned boxes");
  static constexpr int smem_bytes(int stages) {
    return kAlignSlack + stages * kStageBytes + kBarrierBytes;
  }
};

// Waits until at most n of this thread's cp.async groups are pending
// (n = stages - 2, runtime; larger n than handled waits for more, which is safe).
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: ptx::cp_async_wait<0>(); break;
    case 1: ptx::cp_async_wait<1>(); break;
    default: ptx::cp_async_wait<2>(); break;
  }
}

// Row source of the GQA-packed Q tile: row r = (query r / group, head r % group)
// relative to `base` (query 0, first q head of the KV head's group).
template <typename Elem>
struct GqaQueryRows {
  const Elem* base;
  FastDiv group;
  int64_t row_stride;
  int64_t head_stride;
  __device__ __forceinline__ const Elem* row(int r) const {
    const int i = fast_div(group, r);
    return base + static_cast<int64_t>(i) * row_stride +
           static_cast<int64_t>(fast_mod(group, r, i)) * head_stride;
  }
  __device__ __forceinline__ const Elem* safe_ptr() const { return base; }
};

// Q rows r0 .. r0 + 15 (one warp's m16 tile) as the A fragments of
// mma.m16n8k16, loaded from global memory in the register layout of
// common/ptx.h (32-bit pairs of consecutive columns); rows >= m_end and
// columns >= head_dim (a multiple of 8) are zero.
template <typename Elem, int KS>
__device__ __forceinline__ void load_q_frags(uint32_t (&q)[KS][4], const GqaQueryRows<Elem>& rows,
                                             int r0, int m_end, int head_dim, int lane) {
  const int g = lane >> 2;
  const int c0 = 2 * (lane & 3);
  const bool lo = r0 + g < m_end, hi = r0 + g + 8 < m_end;
  const Elem* row_lo = rows.row(lo ? r0 + g : r0);
  const Elem* row_hi = rows.row(hi ? r0 + g + 8 : r0);
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const int c = kk * 16 + c0;
    const bool in0 = c < head_dim, in1 = c + 8 < head_dim;
    q[kk][0] = lo && in0 ? *reinterpret_cast<const uint32_t*>(row_lo + c) : 0u;
    q[kk][1] = hi && in0 ? *reinterpret_cast<const uint32_t*>(row_hi + c) : 0u;
    q[kk][2] = lo && in1 ? *reinterpret_cast<const uint32_t*>(row_lo + c + 8) : 0u;
    q[kk][3] = hi && in1 ? *reinterpret_cast<const uint32_t*>(row_hi + c + 8) : 0u;
  }
}

// Lets the next kernel of the stream (a programmatic dependent launch:
// run_decode) be scheduled once every CTA of this grid has called this or
// exited. Called when a CTA has issued its last K/V load: the dependents'
// launch and prologue then overlap this grid's last stages and epilogues
// (they wait for its completion before touching global memory), and they
// cannot take SM slots from this grid, whose CTAs have all started. H100,
// Hkv=8, D=128, bf16, interleaved against cuDNN, vs the trigger at exit /
// after the key loop: B=64 x 2k +0.2-0.5%, B=1 x 16k +0.7%, B=16 x 32k
// -0.5% in one probe, the rest within +-0.3%. A trigger at the kernel start
// instead parked the next step's CTAs on the first SMs to free up (B=32 x 4k
// 176 -> 190 us before launches were padded, decode_launch_smem).
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The sequence-level facts one CTA needs.
struct DecodeSeq {
  int b;         // sequence (batch index)
  int sk;        // keys of this sequence (clamped)
  int cb;        // cache row it reads (contiguous cache)
};

__device__ __forceinline__ DecodeSeq decode_seq(const DecodeParams& p, int b) {
  DecodeSeq s;
  s.b = b;
  s.sk = p.seqlen_k_max;
  if (p.seqlens_k != nullptr) {
    const int v = p.seqlens_k[b];
    s.sk = v < 0 ? 0 : (v > p.seqlen_k_max ? p.seqlen_k_max : v);
  }
  s.cb = b;
  if (p.cache_batch_idx != nullptr) {
    s.cb = p.cache_batch_idx[b];
    if (s.cb < 0 || s.cb >= p.cache_batch) {  // invalid row: empty sequence, no reads
      s.cb = 0;
      s.sk = 0;
    }
  }
  return s;
}

// The KV-block iterator of the decode kernel: K and V of one (sequence, KV
// head) as blocks of kBlockN key rows, loaded into one ring stage (K tile,
// then V tile) with rows >= sk zero-filled. The contiguous and the paged
// cache differ only here, in how a block's row addresses are found.
template <typename Traits, typename Elem, bool kPaged>
struct DecodeKvLoader;

template <typename Traits, typename Elem>
struct DecodeKvLoader<Traits, Elem, false> {
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;
  ContiguousTileLoader<Traits::kThreads, KTile, Elem> k;
  ContiguousTileLoader<Traits::kThreads, VTile, Elem> v;
  int sk;

  __device__ __forceinline__ void init(const DecodeParams& p, const DecodeSeq& seq, int hk,
                                       int tid) {
    const Elem* k_base = static_cast<const Elem*>(p.k) + seq.cb * p.k_batch_stride +
                         hk * p.k_head_stride;
    const Elem* v_base = static_cast<const Elem*>(p.v) + seq.cb * p.v_batch_stride +
                         hk * p.v_head_stride;
    k.init(k_base, p.k_row_stride, p.head_dim, tid);
    v.init(v_base, p.v_row_stride, p.head_dim, tid);
    sk = seq.sk;
  }
  // Key block `block` (rows block * kBlockN ...) into the stage at stage_addr.
  __device__ __forceinline__ void load(uint32_t stage_addr, int block) const {
    k.load(stage_addr, block * Traits::kBlockN, sk);
    v.load(stage_addr + KTile::kBytes, block * Traits::kBlockN, sk);
  }
};

// Paged cache: the k_/v_ batch strides are the page strides, the row strides
// the slot strides, cache_batch the number of pages (DecodeParams).
template <typename Traits, typename Elem>
struct DecodeKvLoader<Traits, Elem, true> {
  using KTile = typename Traits::KTile;
  static_assert(sizeof(typename Traits::KTile) == sizeof(typename Traits::VTile) &&
                    Traits::KTile::kRows == Traits::VTile::kRows,
                "K and V tiles share one row map");
  PagedKvTileLoader<Traits::kThreads, KTile, Elem> kv;
  int sk;

  __device__ __forceinline__ void init(const DecodeParams& p, const DecodeSeq& seq, int hk,
                                       int tid) {
    kv.init(static_cast<const Elem*>(p.k) + hk * p.k_head_stride,
            static_cast<const Elem*>(p.v) + hk * p.v_head_stride,
            static_cast<int>(p.k_batch_stride), static_cast<int>(p.k_row_stride),
            p.block_table + seq.b * p.block_table_batch_stride, p.page_size, p.cache_batch,
            p.head_dim, tid);
    sk = seq.sk;
  }
  // Blocks are loaded in increasing order, so the next block's page ids are
  // fetched now and land while this block's copies and compute proceed.
  __device__ __forceinline__ void load(uint32_t stage_addr, int block) {
    kv.load_kv(stage_addr, stage_addr + KTile::kBytes, block * Traits::kBlockN, sk);
    kv.prefetch((block + 1) * Traits::kBlockN, sk);
  }
};

// Key blocks [n_begin, n_end) of split `split` for the rows [m0, m_end) of a
// sequence: the blocks visible to any of its seqlen_q queries are divided
// evenly among the splits, then narrowed to what the CTA's own queries see.
struct KeyBlockRange {
  int begin;
  int end;
};

__device__ __forceinline__ KeyBlockRange decode_key_blocks(const MaskPolicy& mask, int sq,
                                                           const FastDiv& splits, int split,
                                                           int i_lo, int i_hi, int block_n) {
  KeyBlockRange r{0, 0};
  if (mask.sk <= 0) return r;
  const int seq_b0 = mask.kv_block_begin(0, sq, block_n);
  const int seq_b1 = mask.kv_block_end(0, sq, block_n);
  if (seq_b1 <= seq_b0) return r;
  // Balanced: split j gets blocks [j*n/S, (j+1)*n/S), sizes differ by <= 1
  // (a ceil-sized share would leave the last splits short or empty).
  // (Multiply-high divisions when the products fit: this is on the path to
  // the first load.)
  const int nb = seq_b1 - seq_b0;
  const int num_splits = static_cast<int>(splits.d);
  const bool narrow = nb <= fast_div(splits, 0x7fffffff);
  const int b0 = seq_b0 + (narrow ? fast_div(splits, split * nb)
                                  : static_cast<int>(static_cast<int64_t>(split) * nb / num_splits));
  const int b1 = seq_b0 + (narrow ? fast_div(splits, (split + 1) * nb)
                                  : static_cast<int>(static_cast<int64_t>(split + 1) * nb / num_splits));
  const int own0 = mask.kv_block_begin(i_lo, i_hi + 1, block_n);
  const int own1 = mask.kv_block_end(i_lo, i_hi + 1, block_n);
  r.begin = b0 > own0 ? b0 : own0;
  r.end = b1 < own1 ? b1 : own1;
  if (r.end < r.begin) r.end = r.begin;
  return r;
}

// Start of the K/V ring in shared memory: the dynamic allocation itself, or
// for the TMA variant its first 1024-aligned byte (smem_bytes holds the slack).
template <typename Traits>
__device__ __forceinline__ char* decode_ring(char* smem) {
  if constexpr (Traits::kTma) {
    const uint32_t a = ptx::smem_u32(smem);
    return smem + (((a + 1023u) & ~1023u) - a);
  } else {
    return smem;
  }
}

// Thread 0 of the TMA variant: key block `block` of (cache row cb, KV head hk)
// into ring slot `slot`, arming the slot's barrier with the stage's bytes
// (boxes are always whole: rows past seqlen_k_max arrive zero-filled).
template <typename Traits>
__device__ __forceinline__ void decode_tma_issue(const DecodeParams& p, uint32_t ring, int slot,
                                                 int block, int hk, int cb) {
  using KTile = typename Traits::KTile;
  const uint32_t bar = ring + p.stages * Traits::kStageBytes + 8 * slot;
  const uint32_t k_addr = ring + slot * Traits::kStageBytes;
  const uint32_t v_addr = k_addr + KTile::kBytes;
  ptx::mbar_arrive_expect_tx(bar, Traits::kStageBytes);
#pragma unroll
  for (int box = 0; box < KTile::kBoxes; ++box) {
    const int c0 = box * KTile::kBoxCols;
    ptx::tma_load_4d(k_addr + box * KTile::kBoxBytes, p.k_tma, c0, hk, block * Traits::kBlockN, cb,
                     bar);
    ptx::tma_load_4d(v_addr + box * KTile::kBoxBytes, p.v_tma, c0, hk, block * Traits::kBlockN, cb,
                     bar);
  }
}

// out[b, i, h, col .. col + 7] = v (one 16-byte store; col % 8 == 0).
template <typename Elem>
__device__ __forceinline__ void store_out8(const DecodeParams& p, int b, int i, int h, int col,
                                           const float (&v)[8]) {
  Elem* dst = static_cast<Elem*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride +
              h * p.o_head_stride + col;
  uint4 u;
  u.x = pack2<Elem>(v[0], v[1]);
  u.y = pack2<Elem>(v[2], v[3]);
  u.z = pack2<Elem>(v[4], v[5]);
  u.w = pack2<Elem>(v[6], v[7]);
  *reinterpret_cast<uint4*>(dst) = u;
}

// Split combine inside a thread-block cluster (DecodeParams::combine_in_cluster):
// the num_splits CTAs of one (m-block, KV head, sequence) form the cluster
// (cluster rank = split). Each left its merged O rows (fp32, normalized) in its
// own o_slab, in the first warp's slot of each row tile, and their LSEs in
// lse_fin. Output chunk u = (row, 8 columns) is merged by one thread of the
// CTA of rank u % num_splits, which reads every split's LSE and chunk from
// that split's shared memory (all loads issued before any is used) and
// merges them exactly as the merge kernel merges one batch of <= 8 parts
// (merge_states.cu: same operations in the same order), so a decode gives
// bitwise the same result whichever combine runs. An empty split
// (lse = -inf) weighs 0; all empty gives out = 0 and lse = -inf.
template <typename Traits, typename Elem>
__device__ __forceinline__ void decode_cluster_combine(const DecodeParams& p, const float* o_slab,
                                                       const float* lse_fin, int b, int hk, int m0,
                                                       int m_end, int warps_n, int rank) {
  constexpr int kOStride = Traits::kOStride;
  constexpr int kMaxParts = kMaxClusterSplits;
  constexpr float kLog2e = 1.4426950408889634f;
  ptx::cluster_sync();  // every split's rows and LSEs are written
  const int num_splits = p.num_splits;  // <= kMaxClusterSplits (host)
  const int chunks = p.head_dim / 8;
  const int units = (m_end - m0) * chunks;
  const uint32_t slab = ptx::smem_u32(o_slab);
  const uint32_t lses = ptx::smem_u32(lse_fin);
  for (int u = rank + static_cast<int>(threadIdx.x) * num_splits; u < units;
       u += Traits::kThreads * num_splits) {
    const int rr = u / chunks;
    const int col = (u % chunks) * 8;
    const int row = (rr >> 4) * warps_n * 16 + (rr & 15);
    const uint32_t o_addr = slab + 4 * (row * kOStride + col);
    float l[kMaxParts];
    float4 x[kMaxParts][2];
#pragma unroll
    for (int s = 0; s < kMaxParts; ++s) {
      l[s] = neg_inf();
      x[s][0] = x[s][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (s < num_splits) {
        l[s] = ptx::ld_cluster_f32(ptx::cluster_map(lses + 4 * rr, s));
        const uint32_t a = ptx::cluster_map(o_addr, s);
        x[s][0] = ptx::ld_cluster_f32x4(a);
        x[s][1] = ptx::ld_cluster_f32x4(a + 16);
      }
    }
    float m = l[0];
#pragma unroll
    for (int s = 1; s < kMaxParts; ++s) m = fmaxf(m, l[s]);
    float sum = 0.f;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (m != neg_inf()) {
#pragma unroll
      for (int s = 0; s < kMaxParts; ++s) {
        const bool live = l[s] != neg_inf();
        const float w = live ? ptx::ex2_approx((l[s] - m) * kLog2e) : 0.f;
        sum += w;
        const float xs[8] = {x[s][0].x, x[s][0].y, x[s][0].z, x[s][0].w,
                             x[s][1].x, x[s][1].y, x[s][1].z, x[s][1].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = live ? fmaf(w, xs[e], acc[e]) : acc[e];
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    const int r = m0 + rr;
    const int i = fast_div(p.group_div, r);
    const int h = hk * static_cast<int>(p.group_div.d) + fast_mod(p.group_div, r, i);
    if (col == 0)
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
          sum > 0.f ? m + __logf(sum) : neg_inf();
    store_out8<Elem>(p, b, i, h, col, acc);
  }
  ptx::cluster_sync();  // no CTA leaves, or reuses its shared memory, while a peer reads it
}

// `phases` (TMA variant): bit s = the parity ring slot s's barrier completes
// next; carried across the sequences one CTA handles.
template <typename Traits, typename Elem, bool kPaged>
__device__ __forceinline__ void flash_decode_block(const DecodeParams& p, char* smem, int b,
                                                   int hk, int m_block, int split,
                                                   uint32_t& phases) {
  constexpr bool kTma = Traits::kTma;
  static_assert(!(kTma && kPaged), "the TMA variant reads contiguous caches");
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int DT = Traits::kDT;
  constexpr int KS = Traits::kKS;
  constexpr int kWarpKeys = Traits::kWarpKeys;
  constexpr int NT = kWarpKeys / 8;
  constexpr int kOStride = Traits::kOStride;
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // warps_m and kNWarps are powers of two: shifts, not divisions.
  const int wn_bits = (31 - __clz(kNWarps)) - (31 - __clz(p.warps_m));
  const int warps_n = 1 << wn_bits;
  const int wm = warp >> wn_bits;
  const int wn = warp & (warps_n - 1);

  // The prologue runs one warp per scheduler, so its latency is exposed: it
  // issues the loads first (the sequence length, the first K/V stages, Q)
  // and keeps divisions off the way to them (FastDiv).
  const FastDiv& group = p.group_div;
  const int m_total = static_cast<int>(group.d) * p.seqlen_q;
  const int rows_cta = 16 * p.warps_m;
  const int m0 = m_block * rows_cta;
  const int m_end = m0 + rows_cta < m_total ? m0 + rows_cta : m_total;  // > m0 (host grid)
  const DecodeSeq seq = decode_seq(p, b);

  smem = decode_ring<Traits>(smem);
  const uint32_t smem_base = ptx::smem_u32(smem);
  const int stages = p.stages;
  const int i_lo = fast_div(group, m0);
  const int i_hi = fast_div(group, m_end - 1);
  MaskParams mp = p.mask;
  mp.bottom_right = true;
  const MaskPolicy mask = MaskPolicy::make(mp, p.seqlen_q, seq.sk);
  const KeyBlockRange blocks =
      decode_key_blocks(mask, p.seqlen_q, p.split_div, split, i_lo, i_hi, kBlockN);
  const int n_iters = blocks.end - blocks.begin;
  if constexpr (kTma) {
    if (tid == 0) {
      for (int st = 0; st < stages - 1 && st < n_iters; ++st)
        decode_tma_issue<Traits>(p, smem_base, st, blocks.begin + st, hk, seq.cb);
    }
  }
  // Q rows of this CTA. The TMA variant loads them straight into registers
  // (issued after the first stages, first used by the first MMA): no ring
  // slot holds Q, so every slot streams K/V from the start.
  const GqaQueryRows<Elem> q_rows{static_cast<const Elem*>(p.q) + b * p.q_batch_stride +
                                      static_cast<int64_t>(hk) * static_cast<int>(group.d) *
                                          p.q_head_stride,
                                  group, p.q_row_stride, p.q_head_stride};

  // This thread's C-fragment rows (g and g + 8 of the warp's m16 tile) and
  // their visible key ranges; padding rows (>= m_end) see nothing.
  int key_lo[2], key_hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + wm * 16 + (lane >> 2) + 8 * h;
    if (r < m_end) {
      const int i = fast_div(group, r);
      key_lo[h] = mask.key_begin(i);
      key_hi[h] = mask.key_end(i);
    } else {
      key_lo[h] = 0;
      key_hi[h] = 0;
    }
  }
  // Keys that every row of the CTA sees: chunks inside need no element mask.
  const int full_lo = mask.key_begin(i_hi);
  const int full_hi = mask.key_end(i_lo);

  float acc_o[1][DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
  OnlineSoftmax<1> softmax;
  softmax.init();

  if (n_iters > 0) {
    // (The TMA variant never uses it: the cp.async loader of the same head dim.)
    DecodeKvLoader<DecodeTraits<Traits::kHeadDim>, Elem, kPaged> kv;
    uint32_t q_frag[KS][4];
    if constexpr (!kTma) {
      kv.init(p, seq, hk, tid);
      // Prologue: Q into the last ring slot (free until the loop's first
      // refill, which follows a block barrier) with stage 0 in group 0,
      // stages 1..S-2 in their own groups (empty groups past the range keep
      // the count uniform). Not the TMA variant's direct register loads of
      // Q: with them this kernel ran 22% slower on the H100 (ncu, paged,
      // page size 16, B=1 x 64k: 102 -> 124 us, same grid, shared memory
      // and bytes, 1% more instructions, DRAM 78% -> 64% busy; cause not
      // found in the SASS, whose key loop differs only in scheduling).
      using QTile = typename Traits::QTile;
      const uint32_t q_addr = smem_base + (stages - 1) * Traits::kStageBytes;
      load_tile_async<kThreads, QTile>(q_addr, q_rows, m0, m_end, p.head_dim, tid);
      for (int st = 0; st < stages - 1; ++st) {
        if (st < n_iters) kv.load(smem_base + st * Traits::kStageBytes, blocks.begin + st);
        ptx::cp_async_commit();
      }
      cp_async_wait_dyn(stages - 2);
      __syncthreads();  // Q and stage 0 visible
      const int a_off = a_lane_offset<QTile>(lane) + QTile::offset(wm * 16, 0);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) load_a<QTile>(q_frag[kk], q_addr, a_off, 0, kk * 16);
    } else {
      // (The loop's first block barrier also publishes the ring barriers'
      // initialization, see the kernel.)
      load_q_frags<Elem>(q_frag, q_rows, m0 + wm * 16, m_end, p.head_dim, lane);
    }

    int b_off = 0, v_off = 0;
    SwizzledLane k_sw{0, 0}, v_sw{0, 0};
    if constexpr (kTma) {
      k_sw = sw128_b_lane(lane);
      v_sw = sw128_b_trans_lane(lane);
    } else {
      b_off = b_lane_offset<KTile>(lane);
      v_off = b_trans_lane_offset<VTile>(lane);
    }
    const int col_lane = 2 * (lane & 3);
    // The iteration that issues this CTA's last K/V stage (the prologue
    // issues the first stages - 1): from there on the CTA only computes,
    // so it lets the next kernel of the stream be scheduled.
    const int last_issue_it = n_iters > stages - 1 ? n_iters - stages : 0;
    int slot = 0;
    for (int it = 0; it < n_iters; ++it) {
      const int nxt = it + stages - 1;
      const int ns = slot == 0 ? stages - 1 : slot - 1;  // the slot of iteration it - 1
      if constexpr (kTma) {
        __syncthreads();  // every warp is done with slot it - 1 (and Q)
        if (tid == 0 && nxt < n_iters)
          decode_tma_issue<Traits>(p, smem_base, ns, blocks.begin + nxt, hk, seq.cb);
        if (it == last_issue_it) allow_dependents();
        const uint32_t bar = smem_base + stages * Traits::kStageBytes + 8 * slot;
        ptx::mbar_wait(bar, (phases >> slot) & 1u);  // stage `it` landed
        phases ^= 1u << slot;
        const int rows = seq.sk - (blocks.begin + it) * kBlockN;
        if (rows < kBlockN) {  // CTA-uniform: the sequence ends in this block
          // Rows past the sequence arrived as whatever the cache holds there;
          // zero them (a masked key's V row still meets P = 0, and 0 * NaN
          // would poison P V). Rows are 128 contiguous bytes per box.
          const uint32_t st_addr = smem_base + slot * Traits::kStageBytes;
          constexpr int kChunksPerRow = 8;
          const int n_zero = (kBlockN - rows) * kChunksPerRow * 2 * KTile::kBoxes;
          for (int i = tid; i < n_zero; i += kThreads) {
            const int chunk = i % kChunksPerRow;
            const int rest = i / kChunksPerRow;
            const int row = rows + rest % (kBlockN - rows);
            const int box = rest / (kBlockN - rows);  // over K's boxes, then V's
            const uint32_t a = st_addr + box * KTile::kBoxBytes + row * 128 + chunk * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0u) : "memory");
          }
          ptx::fence_proxy_async();  // before the copy engine refills this slot
          __syncthreads();
        }
      } else {
        cp_async_wait_dyn(stages - 2);
        __syncthreads();  // stage `it` visible to all; every warp is done with slot it - 1 (and Q)
        if (nxt < n_iters) kv.load(smem_base + ns * Traits::kStageBytes, blocks.begin + nxt);
        ptx::cp_async_commit();
        if (it == last_issue_it) allow_dependents();
      }
      const uint32_t k_addr = smem_base + slot * Traits::kStageBytes;
      const uint32_t v_addr = k_addr + KTile::kBytes;
      const int key0 = (blocks.begin + it) * kBlockN;

      for (int c = wn; c < Traits::kGroups; c += warps_n) {
        // S = Q K^T for keys key0 + c*kWarpKeys .. (NT n8 tiles, 2 with the
        // default 64-key stages).
        float s[1][NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
        const uint32_t kc = k_addr + c * kWarpKeys * KTile::kStrideBytes;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            uint32_t bk[4];
            if constexpr (kTma) {
              load_b_pair_sw128<KTile>(bk, kc, k_sw, np * 16, kk * 16);
            } else {
              load_b_pair<KTile>(bk, kc, b_off, np * 16, kk * 16);
            }
            ptx::mma_m16n8k16<Elem>(s[0][2 * np], q_frag[kk], bk[0], bk[1]);
            ptx::mma_m16n8k16<Elem>(s[0][2 * np + 1], q_frag[kk], bk[2], bk[3]);
          }
        }
        const int c0 = key0 + c * kWarpKeys;
        if (c0 < full_lo || c0 + kWarpKeys > full_hi) {  // warp-uniform
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int key = c0 + nt * 8 + col_lane + e;
                if (key < key_lo[h] || key >= key_hi[h]) s[0][nt][2 * h + e] = neg_inf();
              }
        }
        softmax.update(s, acc_o, p.scale_log2);

        const uint32_t vc = v_addr + c * kWarpKeys * VTile::kStrideBytes;
#pragma unroll
        for (int ks = 0; ks < NT / 2; ++ks) {
          uint32_t pa[4];
          c_pair_to_a<Elem>(pa, s[0][2 * ks], s[0][2 * ks + 1]);
#pragma unroll
          for (int dp = 0; dp < DT / 2; ++dp) {
            uint32_t bv[4];
            if constexpr (kTma) {
              load_b_trans_pair_sw128<VTile>(bv, vc, v_sw, ks * 16, dp * 16);
            } else {
              load_b_trans_pair<VTile>(bv, vc, v_off, ks * 16, dp * 16);
            }
            ptx::mma_m16n8k16<Elem>(acc_o[0][2 * dp], pa, bv[0], bv[1]);
            ptx::mma_m16n8k16<Elem>(acc_o[0][2 * dp + 1], pa, bv[2], bv[3]);
          }
        }
      }
      slot = slot + 1 == stages ? 0 : slot + 1;
    }
    // cp.async: only empty groups can be pending; keep the ring quiet. TMA:
    // every issued stage was waited on.
    if constexpr (!kTma) ptx::cp_async_wait<0>();
  }

  // ---- epilogue: per-warp normalize + LSE into shared memory, then each
  // output thread merges the warps_n partials of its (row, 8 columns):
  // lse = m + log(sum_w exp(lse_w - m)), out = sum_w exp(lse_w - lse) * O_w.
  // Two block barriers in all (this is on the tail of every CTA, one warp
  // per scheduler: each dependent step is exposed); no data-dependent
  // branches. Rows past m_end are padding: nothing writes or reads them.
  float lse_w[2];
  softmax.finalize(acc_o, p.scale, lse_w);
  __syncthreads();  // every warp is done reading the ring

  float* o_slab = reinterpret_cast<float*>(smem);               // [kNWarps][16][kOStride]
  float* lse_slab = o_slab + kNWarps * 16 * kOStride;           // [kNWarps][16]
  float* lse_fin = lse_slab + kNWarps * 16;                     // [kMaxRows]
  {
    const int g = lane >> 2;
    const int live_rows = m_end - m0 - wm * 16;  // rows of this warp's tile that exist
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;
      if (row >= live_rows) continue;
      if ((lane & 3) == 0) lse_slab[warp * 16 + row] = lse_w[h];
      float* orow = o_slab + (warp * 16 + row) * kOStride + 2 * (lane & 3);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<float2*>(orow + dt * 8) =
            make_float2(acc_o[0][dt][2 * h], acc_o[0][dt][2 * h + 1]);
    }
  }
  __syncthreads();

  // ---- output: rows of the CTA, 8 columns per thread.
  constexpr float kLog2e = 1.4426950408889634f;
  const bool direct = p.num_splits == 1;
  const bool in_cluster = !direct && p.combine_in_cluster;
  const int col = (tid % Traits::kTpr) * 8;
  for (int rr = tid / Traits::kTpr; rr < rows_cta; rr += Traits::kRowsPerPass) {
    const int r = m0 + rr;
    if (r >= m_end) break;
    const int wrow = (rr >> 4) << wn_bits;  // first warp of this row's tile
    float l[kNWarps];
    float l_max = neg_inf();
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      l[w] = w < warps_n ? lse_slab[(wrow + w) * 16 + (rr & 15)] : neg_inf();
      l_max = fmaxf(l_max, l[w]);
    }
    const float base = l_max == neg_inf() ? 0.f : l_max;
    float wt[kNWarps];
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      wt[w] = ptx::ex2_approx((l[w] - base) * kLog2e);  // ex2(-inf) = 0
      sum += wt[w];
    }
    const float lse = sum > 0.f ? base + __logf(sum) : neg_inf();
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = fast_div(group, r);
    const int h = hk * static_cast<int>(group.d) + fast_mod(group, r, i);
    if (col == 0) {
      if (direct) {
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
      } else if (in_cluster) {
        lse_fin[rr] = lse;
      } else {
        p.lse_partial[((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q +
                      i] = lse;
      }
    }
    if (col >= p.head_dim) continue;
    if (!direct && lse == neg_inf()) continue;  // the combine never reads empty partials
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      if (w >= warps_n) break;
      const float* src = o_slab + ((wrow + w) * 16 + (rr & 15)) * kOStride + col;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      const float c = wt[w] * inv;
      v[0] = fmaf(c, x0.x, v[0]); v[1] = fmaf(c, x0.y, v[1]);
      v[2] = fmaf(c, x0.z, v[2]); v[3] = fmaf(c, x0.w, v[3]);
      v[4] = fmaf(c, x1.x, v[4]); v[5] = fmaf(c, x1.y, v[5]);
      v[6] = fmaf(c, x1.z, v[6]); v[7] = fmaf(c, x1.w, v[7]);
    }
    if (direct) {
      store_out8<Elem>(p, b, i, h, col, v);
    } else if (in_cluster) {
      // In place over the first warp's slot of the row tile (only this thread
      // reads or writes these 8 floats), where the cluster combine reads it.
      float* dst = o_slab + (wrow * 16 + (rr & 15)) * kOStride + col;
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      float* dst = p.o_partial +
                   (((static_cast<int64_t>(split) * p.batch + b) * p.seqlen_q + i) * p.heads_q + h) *
                       p.head_dim +
                   col;
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  }
  if (in_cluster)
    decode_cluster_combine<Traits, Elem>(p, o_slab, lse_fin, b, hk, m0, m_end, warps_n, split);
}

template <typename Traits, typename Elem, bool kPaged>
__global__ void __launch_bounds__(Traits::kThreads)
    flash_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) char smem[];
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  if constexpr (Traits::kTma) {  // never launched below sm90 (the host checks binaryVersion)
    __trap();
  }
#endif
  uint32_t phases = 0;
  if constexpr (Traits::kTma) {
    if (threadIdx.x == 0) {
      ptx::tma_prefetch_descriptor(p.k_tma);
      ptx::tma_prefetch_descriptor(p.v_tma);
      const uint32_t bar = ptx::smem_u32(decode_ring<Traits>(smem)) + p.stages * Traits::kStageBytes;
      for (int s = 0; s < p.stages; ++s) ptx::mbar_init(bar + 8 * s, 1);
      // Visible to the copy engine (thread 0 issues the first stages without
      // a block barrier); the other threads first wait on a barrier after
      // the block barrier that publishes Q (flash_decode_block).
      ptx::mbar_init_fence();
    }
  }
  // Splits vary fastest: the num_splits CTAs of one m-block are one cluster
  // when the combine runs in a cluster.
  const int m_block = fast_div(p.split_div, blockIdx.x);
  const int split = fast_mod(p.split_div, blockIdx.x, m_block);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A programmatic dependent launch (run_decode) may start while the previous
  // kernel of the stream still runs: everything above touches only this
  // CTA's shared memory and the kernel parameters. Every global read (the
  // lengths, Q, the caches: that kernel may have written them) and write (it
  // may still read our outputs or workspace) comes after its completion.
  // A no-op for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int hk = blockIdx.y;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    flash_decode_block<Traits, Elem, kPaged>(p, smem, b, hk, m_block, split, phases);
    if (b + gridDim.z < p.batch) {
      // smem is reused by the next sequence (TMA: the epilogue's ordinary
      // stores precede the next copies into the ring)
      if constexpr (Traits::kTma) ptx::fence_proxy_async();
      __syncthreads();
    }
  }
}

}  // namespace gpu
}  // namespace fastattn
