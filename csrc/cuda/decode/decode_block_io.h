// What one decode CTA reads and in which order: its GQA-packed query rows
// (straight into MMA fragments), its sequence bounds, the contiguous or paged
// K/V block loaders (cp.async), the key-block range the mask leaves, and the
// copy-engine (TMA) ring issue; see flash_decode_kernel.cuh.
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
#include "cuda/decode/decode_params.h"

namespace fastattn {
namespace gpu {

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

// Q rows m0 .. m0 + 15 of a shared Q tile as the A fragments the FP8 variant
// pairs with its code-pair K fragments (flash_decode_kernel.cuh): per k16
// step, a[0] / a[1] hold columns 4c, 4c + 1 and a[2] / a[3] columns 4c + 2,
// 4c + 3 of rows g / g + 8 (c = lane % 4, g = lane / 4): one 8-byte load each.
template <typename QTile, int KS>
__device__ __forceinline__ void fp8_q_frags(uint32_t (&q)[KS][4], uint32_t q_addr, int m0,
                                            int lane) {
  const int g = lane >> 2, c4 = 4 * (lane & 3);
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a = q_addr + QTile::offset(m0 + g + 8 * h, kk * 16 + c4);
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                   : "=r"(q[kk][h]), "=r"(q[kk][2 + h])
                   : "r"(a));
    }
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
  int sk;        // keys of this sequence (clamped; after its left padding)
  int cb;        // cache row it reads (contiguous cache)
  int k0;        // its first key's position in that row (left padding)
  int sq;        // its queries (seqlen_q, or its ragged count)
  int q0;        // row of its first query in q / out, column in lse (ragged queries; else 0)
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
  s.k0 = 0;
  s.sq = p.seqlen_q;
  s.q0 = 0;
  if (p.cu_seqlens_q != nullptr) {
    s.q0 = p.cu_seqlens_q[b];
    const int n = p.cu_seqlens_q[b + 1] - s.q0;
    s.sq = n < 0 ? 0 : (n > p.seqlen_q ? p.seqlen_q : n);
  }
  if (p.cache_leftpad != nullptr) {
    const int pad = p.cache_leftpad[b];
    s.k0 = pad < 0 ? 0 : (pad > s.sk ? s.sk : pad);
    s.sk -= s.k0;
  }
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
// Elem is the 2-byte unit the tiles are copied in: the cache's own type, or
// for FP8 caches (Traits::kKvBytes == 1) a pair of codes, so element strides
// and the head dim are halved here (the glue guarantees they are even).
template <typename Traits, typename Elem, bool kPaged>
struct DecodeKvLoader;

template <typename Traits>
constexpr int kCodesPerUnit = 2 / Traits::kKvBytes;

template <typename Traits, typename Elem>
struct DecodeKvLoader<Traits, Elem, false> {
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;
  static constexpr int kU = kCodesPerUnit<Traits>;
  ContiguousTileLoader<Traits::kThreads, KTile, Elem> k;
  ContiguousTileLoader<Traits::kThreads, VTile, Elem> v;
  int sk;

  __device__ __forceinline__ void init(const DecodeParams& p, const DecodeSeq& seq, int hk,
                                       int tid) {
    const Elem* k_base = static_cast<const Elem*>(p.k) + (seq.cb * p.k_batch_stride +
                         seq.k0 * p.k_row_stride + hk * p.k_head_stride) / kU;
    const Elem* v_base = static_cast<const Elem*>(p.v) + (seq.cb * p.v_batch_stride +
                         seq.k0 * p.v_row_stride + hk * p.v_head_stride) / kU;
    k.init(k_base, p.k_row_stride / kU, p.head_dim / kU, tid);
    v.init(v_base, p.v_row_stride / kU, p.head_dim / kU, tid);
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
  static constexpr int kU = kCodesPerUnit<Traits>;
  PagedKvTileLoader<Traits::kThreads, KTile, Elem> kv;
  int sk;

  __device__ __forceinline__ void init(const DecodeParams& p, const DecodeSeq& seq, int hk,
                                       int tid) {
    kv.init(static_cast<const Elem*>(p.k) + hk * p.k_head_stride / kU,
            static_cast<const Elem*>(p.v) + hk * p.v_head_stride / kU,
            static_cast<int>(p.k_batch_stride / kU), static_cast<int>(p.k_row_stride / kU),
            p.block_table + seq.b * p.block_table_batch_stride + hk * p.block_table_head_stride,
            p.page_size, p.cache_batch,
            p.head_dim / kU, tid);
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
                                                 int block, int hk, int cb, int k0) {
  using KTile = typename Traits::KTile;
  const uint32_t bar = ring + p.stages * Traits::kStageBytes + 8 * slot;
  const uint32_t k_addr = ring + slot * Traits::kStageBytes;
  const uint32_t v_addr = k_addr + KTile::kBytes;
  ptx::mbar_arrive_expect_tx(bar, Traits::kStageBytes);
#pragma unroll
  for (int box = 0; box < KTile::kBoxes; ++box) {
    const int c0 = box * KTile::kBoxCols;
    ptx::tma_load_4d(k_addr + box * KTile::kBoxBytes, p.k_tma, c0, hk, k0 + block * Traits::kBlockN,
                     cb, bar);
    ptx::tma_load_4d(v_addr + box * KTile::kBoxBytes, p.v_tma, c0, hk, k0 + block * Traits::kBlockN,
                     cb, bar);
  }
}

}  // namespace gpu
}  // namespace fastattn
