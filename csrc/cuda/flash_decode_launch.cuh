// Launch template of the split-KV decode kernel; included only by the
// per-(hdim, dtype) instantiation files flash_decode_hdim<D>_<fp16|bf16>.cu.
#pragma once
#include <cuda_runtime.h>

#include "cuda/common/types.h"
#include "cuda/decode_launch.h"
#include "cuda/flash_decode_kernel.cuh"

namespace fastattn {
namespace gpu {

template <int kHeadDim, ElemType kDtype>
cudaError_t decode_raise_smem_limit() {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = DecodeTraits<kHeadDim>;
  // Once per device, to the largest ring this launcher may use (kept out of
  // CUDA-graph capture, which follows eager warm-up runs).
  static bool done[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && done[device]) return cudaSuccess;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  int want = Traits::smem_bytes(Traits::kMaxStages);
  if (want > optin) want = optin;
  err = cudaFuncSetAttribute(flash_decode_kernel<Traits, Elem, false>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, want);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(flash_decode_kernel<Traits, Elem, true>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, want);
  if (err != cudaSuccess) return err;
  if (device < 64) done[device] = true;
  return cudaSuccess;
}

template <int kHeadDim, ElemType kDtype>
int decode_ctas_per_sm(int smem_bytes, bool paged) {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = DecodeTraits<kHeadDim>;
  if (decode_raise_smem_limit<kHeadDim, kDtype>() != cudaSuccess) return 0;
  int n = 0;
  const auto kernel =
      paged ? flash_decode_kernel<Traits, Elem, true> : flash_decode_kernel<Traits, Elem, false>;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Traits::kThreads, smem_bytes) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

template <int kHeadDim, ElemType kDtype>
cudaError_t run_decode_hdim(const DecodeParams& p, cudaStream_t stream) {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = DecodeTraits<kHeadDim>;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0) return cudaSuccess;
  if (p.head_dim > kHeadDim || p.head_dim % 8 != 0 || p.heads_kv <= 0 ||
      p.heads_q % p.heads_kv != 0 || p.heads_kv > 65535 || p.num_splits < 1 ||
      p.stages < Traits::kMinStages || p.stages > Traits::kMaxStages ||
      (p.warps_m != 1 && p.warps_m != 2 && p.warps_m != 4) || p.num_m_blocks < 1 ||
      (p.num_splits > 1 && (p.o_partial == nullptr || p.lse_partial == nullptr)) ||
      (p.block_table != nullptr && p.page_size < 1)) {
    return cudaErrorInvalidValue;
  }
  const int64_t gx = static_cast<int64_t>(p.num_m_blocks) * p.num_splits;
  if (gx > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t err = decode_raise_smem_limit<kHeadDim, kDtype>();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(gx), p.heads_kv, p.batch < 65535 ? p.batch : 65535);
  const auto kernel = p.block_table != nullptr ? flash_decode_kernel<Traits, Elem, true>
                                               : flash_decode_kernel<Traits, Elem, false>;
  kernel<<<grid, Traits::kThreads, Traits::smem_bytes(p.stages), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastattn

#define FASTATTN_INSTANTIATE_DECODE(HDIM, DTYPE)                                             \
  template cudaError_t fastattn::gpu::run_decode_hdim<HDIM, fastattn::ElemType::DTYPE>(      \
      const fastattn::DecodeParams&, cudaStream_t);                                          \
  template int fastattn::gpu::decode_ctas_per_sm<HDIM, fastattn::ElemType::DTYPE>(int, bool);
