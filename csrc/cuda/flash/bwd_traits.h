// Compile-time shape of the mma.sync backward kernel (flash_bwd_kernel.cuh):
// tiles, warp layout and the shared-memory map.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common/bwd_block.h"
#include "cuda/common/bwd_cta_order.h"
#include "cuda/common/bwd_dq_layout.h"
#include "cuda/common/bwd_mask.h"
#include "cuda/common/bwd_ptx.h"
#include "cuda/common/fragment.h"
#include "cuda/common/mask.h"
#include "cuda/common/ptx.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/types.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

template <int kHeadDim_, int kBlockM_, int kNWarps_, int kDSplit_, int kQWarpsM_,
          bool kPipelineDQ_ = false, bool kPaired_ = false, bool kSkewDQ_ = false>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per inner iteration
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kDSplit = kDSplit_;  // warps sharing one key tile (head-dim slices)
  static constexpr int kRowGroups = kNWarps / kDSplit;
  static constexpr int kBlockN = 16 * kRowGroups;  // keys per CTA
  static constexpr int kDW = kHeadDim / kDSplit;   // head-dim slice of one warp

  static constexpr int kNTS = kBlockM / 8;  // n8 tiles (queries) of a warp's S^T / dP^T
  static constexpr int kKSQ = kBlockM / 16;  // k16 steps over queries (dV, dK)
  static constexpr int kKSD = kDW / 16;      // k16 steps over the head-dim slice (S^T, dP^T)
  static constexpr int kNTD = kDW / 8;       // n8 tiles of a warp's dK / dV

  // dQ = dS K: kBlockM x kHeadDim over kQWarpsM x kQWarpsN warps, k over kBlockN.
  static constexpr int kQWarpsM = kQWarpsM_;
  static constexpr int kQWarpsN = kNWarps / kQWarpsM;
  static constexpr int kQTileM = kBlockM / kQWarpsM;
  static constexpr int kQTileN = kHeadDim / kQWarpsN;
  static constexpr int kQMT = kQTileM / 16;
  static constexpr int kQNT = kQTileN / 8;

  // dO is double-buffered like Q when shared memory allows (kDSplit == 1);
  // otherwise the next dO load starts once every warp is done with dV.
  static constexpr bool kDoubleDO = kDSplit == 1;
  // dQ of iteration i computed during iteration i + 1 from a second dS^T buffer
  // (one barrier per iteration instead of two) where the device has the shared
  // memory (kSmemBytesPipelined); needs kDoubleDO.
  static constexpr bool kPipelineDQ = kPipelineDQ_ && kDoubleDO;

  // Paired warp layout (kPaired; 8 warps, kDSplit == 1, pipelined dQ only):
  // warps 2 kg and 2 kg + 1 share the 32 keys kg * 32 .. + 31. For S^T / dP^T
  // warp half hf = warp % 2 takes queries hf * kPQ .. + kPQ - 1; P^T and dS^T
  // go to shared memory and, after a barrier of the pair, each warp of the
  // pair accumulates dV / dK for its 32 keys over the head-dim half hf * kPD ..
  // + kPD - 1 from all kBlockM queries. Fewer ldmatrix per FLOP than one warp
  // per 16 keys (hdim 128: 144 instead of 176 per warp and query block), at
  // the price of the P^T tile in shared memory and a 64-thread barrier.
  static constexpr bool kPaired = kPaired_;
  static constexpr int kPQ = kBlockM / 2;     // queries of a warp's S^T / dP^T
  static constexpr int kPD = kHeadDim / 2;    // head-dim half of a warp's dK / dV
  static constexpr int kPNT = kPQ / 8;        // n8 tiles of a warp's S^T / dP^T
  static constexpr int kPKS = kHeadDim / 16;  // k16 steps of S^T / dP^T
  // Accumulator shape of dK / dV per thread: kAccM m16 tiles (keys) x kAccN n8 tiles (d).
  static constexpr int kAccM = kPaired ? 2 : 1;
  static constexpr int kAccN = kPaired ? kPD / 8 : kDW / 8;
  // Skewed dQ (paired layout only; see `late` in flash_bwd_kv_block).
  static constexpr bool kSkewDQ = kSkewDQ_ && kPaired;

  static_assert(kDSplit == 1 || kDSplit == 2, "head-dim split");
  static_assert(!kPaired || (kNWarps == 8 && kDSplit == 1 && kPipelineDQ_ && kPQ % 16 == 0 &&
                             kPD % 16 == 0),
                "paired layout");
  static_assert(kNWarps % kDSplit == 0 && kNWarps % kQWarpsM == 0, "warp layout");
  static_assert(kDW % 16 == 0 && kBlockM % 16 == 0, "tile shape");
  static_assert(kQTileM % 16 == 0 && kQTileN % 16 == 0, "dQ warp tile");

  using QTile = SmemTile<kBlockM, kHeadDim>;   // Q and dO, [query][d]
  using KTile = SmemTile<kBlockN, kHeadDim>;   // K and V, [key][d]; dK/dV staging
  using DSTile = SmemTile<kBlockN, kBlockM>;   // dS^T, [key][query]

  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + KTile::kBytes;
  static constexpr int kOffQ = kOffV + KTile::kBytes;                  // 2 buffers
  static constexpr int kOffDO = kOffQ + 2 * QTile::kBytes;             // 1 or 2 buffers
  static constexpr int kOffLse = kOffDO + (kDoubleDO ? 2 : 1) * QTile::kBytes;  // float[2][kBlockM]
  static constexpr int kOffDsum = kOffLse + 2 * kBlockM * 4;           // float[2][kBlockM]
  static constexpr int kOffX = kOffDsum + 2 * kBlockM * 4;             // partial-sum exchange
  static constexpr int kXFloatsPerWarp = kDSplit == 2 ? 2 * kNTS * 4 * 32 : 0;
  static constexpr int kOffDS = kOffX + kNWarps * kXFloatsPerWarp * 4;  // 1 or 2 buffers (last)
  // One dS^T buffer; the pipelined dQ (kDoubleDO only) takes a second one when
  // the device allows kSmemBytesPipelined.
  // The paired layout always runs pipelined and keeps P^T after the two dS^T buffers.
  static constexpr int kOffP = kOffDS + 2 * DSTile::kBytes;
  static constexpr int kSmemBytesPipelined = kOffP + (kPaired ? DSTile::kBytes : 0);
  static constexpr int kSmemBytes = kPaired ? kSmemBytesPipelined : kOffDS + DSTile::kBytes;
};

}  // namespace gpu
}  // namespace fastattn
