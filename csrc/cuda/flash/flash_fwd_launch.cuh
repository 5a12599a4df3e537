// Launch template of the FlashAttention-2 forward: tile configuration per head
// dim and the host-side launcher. Included only by the per-(hdim, dtype)
// instantiation files flash_fwd_hdim<D>_<fp16|bf16>.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

#include "cuda/common/types.h"
#include "cuda/flash/flash_fwd_kernel.cuh"
#include "cuda/flash/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash/kernel_select.h"
#include "cuda/flash/launch.h"

namespace fastattn {
namespace gpu {

// Tile shapes (kHeadDim, kBlockM, kBlockN, kNWarps, kQInRegs), chosen for
// sm80/sm90 with mma.sync: 128 query rows per CTA, 2 m16 tiles per warp up to
// hdim 128 (the B fragments of K/V are reused twice from registers), 8 warps
// of one m16 tile each for hdim 192/256 (keeps O + S under 255 registers).
// Q stays in registers where it fits (hdim <= 64). Measured on H200 (bf16,
// hidden 2048): hdim 64 128x64+Q-in-regs beat 128x128 (which spills) by 5-10%;
// hdim 128 128x64x4 beat 128x128x8 (one CTA/SM) and 64x64x4 by 20-30%;
// hdim 256: 128x64x8 and 64x64x4 tie, both ~0.85x of SDPA's flash (open).
template <int kHeadDim>
struct FwdConfig;
// Tuning hook: -DFASTATTN_FWD_TILES_<D>="BM, BN, WARPS, QREGS" overrides one
// head dim's tiles at compile time (used by dev benchmarks, not by setup.py).
#define FASTATTN_FWD_CONFIG(D, DEFAULT_TILES)                               \
  template <>                                                               \
  struct FwdConfig<D> {                                                     \
    using Traits = FwdTraits<D, DEFAULT_TILES>;                             \
  };
#ifndef FASTATTN_FWD_TILES_32
#define FASTATTN_FWD_TILES_32 128, 128, 4, true
#endif
#ifndef FASTATTN_FWD_TILES_64
#define FASTATTN_FWD_TILES_64 128, 64, 4, true
#endif
#ifndef FASTATTN_FWD_TILES_96
#define FASTATTN_FWD_TILES_96 128, 64, 4, false
#endif
#ifndef FASTATTN_FWD_TILES_128
#define FASTATTN_FWD_TILES_128 128, 64, 4, false
#endif
#ifndef FASTATTN_FWD_TILES_192
#define FASTATTN_FWD_TILES_192 128, 64, 8, false
#endif
#ifndef FASTATTN_FWD_TILES_256
#define FASTATTN_FWD_TILES_256 128, 64, 8, false
#endif
FASTATTN_FWD_CONFIG(32, FASTATTN_FWD_TILES_32)
FASTATTN_FWD_CONFIG(64, FASTATTN_FWD_TILES_64)
FASTATTN_FWD_CONFIG(96, FASTATTN_FWD_TILES_96)
FASTATTN_FWD_CONFIG(128, FASTATTN_FWD_TILES_128)
FASTATTN_FWD_CONFIG(192, FASTATTN_FWD_TILES_192)
FASTATTN_FWD_CONFIG(256, FASTATTN_FWD_TILES_256)
#undef FASTATTN_FWD_CONFIG

// The sm90 (wgmma) variant per head dim: FwdSm90Traits<D, kBlockN, warpgroups>
// (64 query rows per warpgroup), or void where only the sm80 kernel exists.
// Tuning hook as above: -DFASTATTN_FWD_SM90_TILES_<D>="BN, WARPGROUPS, CTAS_PER_SM".
template <int kHeadDim>
struct FwdSm90Config {
  using Traits = void;
};
#ifndef FASTATTN_FWD_SM90_TILES_64
#define FASTATTN_FWD_SM90_TILES_64 64, 2, 2
#endif
#ifndef FASTATTN_FWD_SM90_TILES_128
#define FASTATTN_FWD_SM90_TILES_128 128, 2, 1
#endif
template <>
struct FwdSm90Config<64> {
  using Traits = FwdSm90Traits<64, FASTATTN_FWD_SM90_TILES_64>;
};
template <>
struct FwdSm90Config<128> {
  using Traits = FwdSm90Traits<128, FASTATTN_FWD_SM90_TILES_128>;
};

template <int kHeadDim, ElemType kDtype>
cudaError_t run_fwd_hdim(const FwdParams& params, cudaStream_t stream) {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = typename FwdConfig<kHeadDim>::Traits;
  using Sm90Traits = typename FwdSm90Config<kHeadDim>::Traits;
  if (params.batch <= 0 || params.seqlen_q <= 0 || params.heads_q <= 0) return cudaSuccess;
  if (params.head_dim > kHeadDim || params.heads_q > 65535) return cudaErrorInvalidValue;
  const bool paged = params.block_table != nullptr;
  if (paged && (params.page_size < 1 || params.cu_seqlens_q == nullptr)) {
    return cudaErrorInvalidValue;
  }
  // Query blocks on x (fastest): consecutive CTAs share one head's K/V in L2;
  // then heads (GQA groups adjacent), then batch (kernel loops past 65535).
  const int batch_ctas = params.batch < 65535 ? params.batch : 65535;
  if constexpr (!std::is_void<Sm90Traits>::value) {
    auto kernel = flash_fwd_sm90_kernel<Sm90Traits, Elem>;
    if (!paged && sm90_body_runnable<Sm90Traits, Elem>(reinterpret_cast<const void*>(kernel),
                                                       Sm90Traits::kThreads, "FASTATTN_FWD_SM90")) {
      constexpr int kSmem = Sm90Traits::kSmemBytes;
      cudaError_t err =
          ensure_smem_cap<Sm90Traits, Elem>(reinterpret_cast<const void*>(kernel), kSmem);
      if (err != cudaSuccess) return err;
      const int num_m_blocks = (params.seqlen_q + Sm90Traits::kBlockM - 1) / Sm90Traits::kBlockM;
      kernel<<<dim3(num_m_blocks, params.heads_q, batch_ctas), Sm90Traits::kThreads, kSmem,
               stream>>>(params);
      return cudaGetLastError();
    }
  }
  const int num_m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  auto kernel = paged ? flash_fwd_kernel<Traits, Elem, true> : flash_fwd_kernel<Traits, Elem, false>;
  constexpr int kSmem = Traits::kSmemBytes;
  const void* kfn = reinterpret_cast<const void*>(kernel);
  cudaError_t err = paged ? ensure_smem_cap<Traits, Elem, std::true_type>(kfn, kSmem)
                          : ensure_smem_cap<Traits, Elem, std::false_type>(kfn, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(num_m_blocks, params.heads_q, batch_ctas), Traits::kThreads, kSmem, stream>>>(
      params);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastattn

// Explicit instantiation for one (head dim, dtype); used by the .cu files.
#define FASTATTN_INSTANTIATE_FWD(HDIM, DTYPE)                                              \
  template cudaError_t fastattn::gpu::run_fwd_hdim<HDIM, fastattn::ElemType::DTYPE>(       \
      const fastattn::FwdParams&, cudaStream_t);
