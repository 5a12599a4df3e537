// Launch template of the FlashAttention-2 forward: tile configuration per head
// dim and the host-side launcher. Included only by the per-(hdim, dtype)
// instantiation files flash_fwd_hdim<D>_<fp16|bf16>.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

#include "cuda/common/types.h"
#include "cuda/flash/flash_fwd_kernel.cuh"
#include "cuda/common/tma_map.h"
#include "cuda/flash/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash/flash_fwd_ws_kernel.cuh"
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

// The warp-specialized sm90 variant (flash_fwd_ws_kernel.cuh) per head dim:
// FwdWsTraits<D, K/V ring stages, ping-pong, FMA-pipe exp2 share>, or void.
// Tuning hook: -DFASTATTN_FWD_WS_TILES_<D>="STAGES, PINGPONG, FMA_EXP_EVERY"
// (docs/performance.md has what each measured).
template <int kHeadDim>
struct FwdWsConfig {
  using Traits = void;
};
#ifndef FASTATTN_FWD_WS_TILES_64
#define FASTATTN_FWD_WS_TILES_64 4, false, 0
#endif
#ifndef FASTATTN_FWD_WS_TILES_128
#define FASTATTN_FWD_WS_TILES_128 2, false, 0
#endif
template <>
struct FwdWsConfig<64> {
  using Traits = FwdWsTraits<64, FASTATTN_FWD_WS_TILES_64>;
};
template <>
struct FwdWsConfig<128> {
  using Traits = FwdWsTraits<128, FASTATTN_FWD_WS_TILES_128>;
};

// An attribute of the current device (0 when unknown), read once per device.
template <cudaDeviceAttr kAttr>
int current_device_attr() {
  static int cache[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return 0;
  if (cache[device] == 0 && cudaDeviceGetAttribute(&cache[device], kAttr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    cache[device] = -1;
  }
  return cache[device] > 0 ? cache[device] : 0;
}

// Launches the warp-specialized forward when this device runs it and the
// copy engine can address the tensors; false (nothing launched) otherwise.
template <typename Traits, typename Elem>
bool launch_fwd_ws(const FwdParams& p, cudaStream_t stream, cudaError_t* err) {
  auto kernel = flash_fwd_ws_kernel<Traits, Elem>;
  const void* kfn = reinterpret_cast<const void*>(kernel);
  // FASTATTN_FWD_SM90=0 selects the sm80 kernels, FASTATTN_FWD_WS=0 the
  // non-specialized sm90 one (A/B switches and escape hatches).
  const char* sm90_env = std::getenv("FASTATTN_FWD_SM90");
  if ((sm90_env != nullptr && sm90_env[0] == '0') || p.block_table != nullptr ||
      !sm90_body_runnable<Traits, Elem>(kfn, Traits::kThreads, "FASTATTN_FWD_WS")) {
    return false;
  }
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
  // Tile row coordinates are int32.
  constexpr int64_t kMaxRows = (int64_t{1} << 31) - 2 * 256;
  if (rows_q <= 0 || rows_k <= 0 || rows_q > kMaxRows || rows_k > kMaxRows) return false;
  // A varlen batch is one packed tensor of total rows (batch 1).
  const int cb = varlen ? 1 : p.batch;
  FwdWsArgs a;
  if (!encode_head_rows_map(a.q_tma, p.q, p.head_dim, p.heads_q, rows_q, cb, p.q_batch_stride,
                            p.q_row_stride, p.q_head_stride, Traits::kBlockM) ||
      !encode_head_rows_map(a.k_tma, p.k, p.head_dim, p.heads_kv, rows_k, cb, p.k_batch_stride,
                            p.k_row_stride, p.k_head_stride, Traits::kBlockN) ||
      !encode_head_rows_map(a.v_tma, p.v, p.head_dim, p.heads_kv, rows_k, cb, p.v_batch_stride,
                            p.v_row_stride, p.v_head_stride, Traits::kBlockN)) {
    return false;
  }
  const int num_m = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const bool longest_first = p.mask.window_right >= 0;
  const int group = p.heads_q / p.heads_kv;
  const int64_t kv_bytes = int64_t(4) * p.seqlen_k * p.head_dim / (group > 0 ? group : 1);
  if (!FwdTileOrder::make(a.order, num_m, p.heads_q, p.batch, longest_first, kv_bytes,
                          current_device_attr<cudaDevAttrL2CacheSize>())) {
    return false;
  }
  constexpr int kSmem = Traits::kSmemBytes;
  *err = ensure_smem_cap<Traits, Elem>(kfn, kSmem);
  if (*err != cudaSuccess) return true;
  const int sms_attr = current_device_attr<cudaDevAttrMultiProcessorCount>();
  const int sms = p.num_sms > 0 ? p.num_sms : (sms_attr > 0 ? sms_attr : 132);
  const int grid = a.order.tiles < sms ? a.order.tiles : sms;
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p, a);
  *err = cudaGetLastError();
  return true;
}

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
  using WsTraits = typename FwdWsConfig<kHeadDim>::Traits;
  if constexpr (!std::is_void<WsTraits>::value) {
    cudaError_t err = cudaSuccess;
    if (launch_fwd_ws<WsTraits, Elem>(params, stream, &err)) return err;
  }
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
