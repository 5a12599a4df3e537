// Launch template of the mixed kernel; included only by the per-(hdim,
// dtype) instantiation files flash_mixed_hdim<D>_<fp16|bf16>.cu.
#pragma once
#include <cuda_runtime.h>

#include "cuda/common/fast_div.h"
#include "cuda/common/types.h"
#include "cuda/decode/decode_traits.h"
#include "cuda/flash/flash_fwd_launch.cuh"
#include "cuda/mixed/flash_mixed_kernel.cuh"
#include "cuda/mixed/mixed_launch.h"

namespace fastattn {
namespace gpu {

// Dynamic shared memory of the mixed kernel: whichever role needs more (the
// forward's Q/K/V tiles, or the decode ring of `stages` stages).
template <typename FwdTraits, typename DecTraits>
constexpr int mixed_smem_bytes(int stages) {
  return FwdTraits::kSmemBytes > DecTraits::smem_bytes(stages) ? FwdTraits::kSmemBytes
                                                               : DecTraits::smem_bytes(stages);
}

// The decode ring depth for the mixed kernel on this device: the most
// resident CTAs, then the deepest ring (more K/V bytes in flight per decode
// CTA) among those. Cached per device; 0 when nothing fits.
template <typename Kernel, typename FwdTraits, typename DecTraits>
int mixed_stages(Kernel kernel) {
  static int cache[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < 64 && cache[device] != 0) return cache[device];
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  if (cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, optin) != cudaSuccess)
    return 0;
  int best = 0, best_ctas = 0;
  for (int s = DecTraits::kMinStages; s <= DecTraits::kMaxStages; ++s) {
    const int smem = mixed_smem_bytes<FwdTraits, DecTraits>(s);
    if (smem > optin) break;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, DecTraits::kThreads, smem) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      break;
    }
    if (n > 0 && n >= best_ctas) {
      best = s;
      best_ctas = n;
    }
  }
  if (device < 64) cache[device] = best;
  return best;
}

template <int kHeadDim, ElemType kDtype>
cudaError_t run_mixed_hdim(const MixedParams& p, cudaStream_t stream) {
  using Elem = typename ElemOf<kDtype>::type;
  using FwdTraits = typename FwdConfig<kHeadDim>::Traits;
  using DecTraits = DecodeTraits<kHeadDim>;
  if constexpr (FwdTraits::kThreads != DecTraits::kThreads) {
    return cudaErrorNotSupported;
  } else {
    const DecodeParams& d = p.dec;
    if (p.num_work <= 0) return cudaSuccess;
    if (p.work == nullptr || d.num_splits < 1 || d.num_splits > kMaxClusterSplits ||
        p.num_work % d.num_splits != 0 || (d.warps_m != 1 && d.warps_m != 2 && d.warps_m != 4) ||
        d.heads_kv <= 0 || d.heads_q % d.heads_kv != 0 || d.head_dim > kHeadDim ||
        p.fwd.head_dim > kHeadDim || d.block_table == nullptr || d.cu_seqlens_q == nullptr ||
        p.fwd.block_table == nullptr || p.fwd.cu_seqlens_q == nullptr) {
      return cudaErrorInvalidValue;
    }
    auto kernel = flash_mixed_kernel<FwdTraits, DecTraits, Elem>;
    const int stages = mixed_stages<decltype(kernel), FwdTraits, DecTraits>(kernel);
    if (stages == 0) return cudaErrorNotSupported;
    MixedParams q = p;
    q.dec.stages = stages;
    q.dec.combine_in_cluster = d.num_splits > 1;
    q.dec.group_div = make_fast_div(d.heads_q / d.heads_kv);
    q.dec.split_div = make_fast_div(d.num_splits);
    void* args[] = {&q};
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.num_work));
    cfg.blockDim = dim3(DecTraits::kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(mixed_smem_bytes<FwdTraits, DecTraits>(stages));
    cfg.stream = stream;
    cudaLaunchAttribute at[1];
    if (d.num_splits > 1) {
      // (Portable cluster sizes: <= kMaxClusterSplits = 8.)
      at[0].id = cudaLaunchAttributeClusterDimension;
      at[0].val.clusterDim.x = static_cast<unsigned>(d.num_splits);
      at[0].val.clusterDim.y = 1;
      at[0].val.clusterDim.z = 1;
      cfg.attrs = at;
      cfg.numAttrs = 1;
    }
    cudaError_t err = cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(kernel), args);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  }
}

}  // namespace gpu
}  // namespace fastattn

#define FASTATTN_INSTANTIATE_MIXED(HDIM, DTYPE)                                         \
  template cudaError_t fastattn::gpu::run_mixed_hdim<HDIM, fastattn::ElemType::DTYPE>( \
      const fastattn::MixedParams&, cudaStream_t);
