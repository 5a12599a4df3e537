// Tile shapes and shared-memory budget of the split-KV decode kernel
// (cp.async and copy-engine variants); see flash_decode_kernel.cuh.
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

// Tuning hooks for dev A/B builds (not set by setup.py):
// -DFASTATTN_DECODE_WARPS=W -DFASTATTN_DECODE_BLOCK_N=N (head dims <= 128).
#ifndef FASTATTN_DECODE_WARPS
#define FASTATTN_DECODE_WARPS 4
#endif
#ifndef FASTATTN_DECODE_BLOCK_N
#define FASTATTN_DECODE_BLOCK_N 64
#endif

// kKvBytes_: bytes per cached K/V element, 2 (q's type) or 1 (FP8 codes,
// held in shared memory as pairs: tiles of kHeadDim / 2 two-byte columns, so
// the cp.async loaders, ldmatrix and the padded layout serve both).
template <int kHeadDim_, int kKvBytes_ = 2>
struct DecodeTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kKvBytes = kKvBytes_;
  static constexpr int kNWarps = FASTATTN_DECODE_WARPS;
  static constexpr int kThreads = kNWarps * 32;
  // Keys per pipeline stage. 64: measured on H200 (Hkv=8, D=128) against
  // 128-key stages (32-key warp groups, NT = 4 independent Q K^T chains):
  // equal at B=1, 64-key stages 1-4% faster for batches (a 3-stage ring of
  // 64-key stages leaves room for 2 CTAs per SM). Larger head dims keep 64 at
  // most (a 128-key stage of hdim 192/256 leaves no room for a ring).
  // FP8 stages hold twice the keys (128 up to head dim 128), the bytes of a
  // 64-key 16-bit stage: the same bytes in flight per stage and half the
  // per-stage overhead per key.
  static constexpr int kBlockN =
      kHeadDim <= 128 ? FASTATTN_DECODE_BLOCK_N * (2 / kKvBytes) : 64;
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

  static_assert(kKvBytes == 2 || (kKvBytes == 1 && kHeadDim % 32 == 0),
                "FP8 tiles: whole 32-column chunks (fp8 operand layout of the kernel)");
  using KTile = SmemTile<kBlockN, kHeadDim * kKvBytes / 2>;
  using VTile = SmemTile<kBlockN, kHeadDim * kKvBytes / 2>;
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

}  // namespace gpu
}  // namespace fastattn
