// Launch template of the split-KV decode kernel; included only by the
// per-(hdim, dtype) instantiation files flash_decode_hdim<D>_<fp16|bf16>.cu.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstring>

#include "cuda/common/tma_map.h"
#include "cuda/common/types.h"
#include "cuda/decode/decode_launch.h"
#include "cuda/decode/flash_decode_kernel.cuh"

namespace fastattn {
namespace gpu {

// The kernel of one variant: contiguous / paged cache, cp.async / TMA loads
// (TMA: contiguous 16-bit caches and decode_has_tma head dims only), cache
// element kind (FP8 codes: cp.async only); nullptr when there is none.
template <int kHeadDim, ElemType kDtype>
void* decode_kernel_of(bool paged, bool tma, KvKind kv) {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = DecodeTraits<kHeadDim>;
  using Fp8Traits = DecodeTraits<kHeadDim, 1>;
  if (kv != KvKind::kSame) {
    if (tma) return nullptr;
    if (kv == KvKind::kE4M3)
      return paged ? reinterpret_cast<void*>(flash_decode_kernel<Fp8Traits, Elem, true, KvKind::kE4M3>)
                   : reinterpret_cast<void*>(flash_decode_kernel<Fp8Traits, Elem, false, KvKind::kE4M3>);
    return paged ? reinterpret_cast<void*>(flash_decode_kernel<Fp8Traits, Elem, true, KvKind::kE5M2>)
                 : reinterpret_cast<void*>(flash_decode_kernel<Fp8Traits, Elem, false, KvKind::kE5M2>);
  }
  if (tma) {
    if constexpr (decode_has_tma(kHeadDim)) {
      if (!paged) return reinterpret_cast<void*>(flash_decode_kernel<DecodeTmaTraits<kHeadDim>, Elem, false>);
    }
    return nullptr;
  }
  return paged ? reinterpret_cast<void*>(flash_decode_kernel<Traits, Elem, true>)
               : reinterpret_cast<void*>(flash_decode_kernel<Traits, Elem, false>);
}

template <int kHeadDim>
int decode_smem_bytes(int stages, bool tma, KvKind kv) {
  if (kv != KvKind::kSame) return DecodeTraits<kHeadDim, 1>::smem_bytes(stages);
  if constexpr (decode_has_tma(kHeadDim)) {
    if (tma) return DecodeTmaTraits<kHeadDim>::smem_bytes(stages);
  }
  return DecodeTraits<kHeadDim>::smem_bytes(stages);
}

template <int kHeadDim, ElemType kDtype>
cudaError_t decode_raise_smem_limit() {
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
  for (int v = 0; v < 7; ++v) {
    // (contiguous, paged, TMA) x 16-bit, then (contiguous, paged) x e4m3 / e5m2
    const bool paged = v == 1 || v == 4 || v == 6, tma = v == 2;
    const KvKind kv = v < 3 ? KvKind::kSame : (v < 5 ? KvKind::kE4M3 : KvKind::kE5M2);
    void* kernel = decode_kernel_of<kHeadDim, kDtype>(paged, tma, kv);
    if (kernel == nullptr) continue;
    // The whole opt-in limit: a launch may pad its ring (decode_launch_smem).
    const int want = optin;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, want);
    if (err != cudaSuccess) return err;
    // Clusters of up to kMaxClusterSplits CTAs (the cluster combine); refused
    // by devices without clusters, which never launch them.
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
        cudaSuccess)
      (void)cudaGetLastError();
  }
  if (device < 64) done[device] = true;
  return cudaSuccess;
}

// Dynamic shared memory of a launch of grid_ctas CTAs with rings of `ring`
// bytes: the ring, padded when needed so that an SM holds at most
// ceil(grid_ctas / SMs) of these CTAs. A programmatic dependent launch is
// placed while the previous grid's last CTAs still run, on whichever SMs
// have room; an SM with spare shared memory would take several CTAs and
// others none (H100, B=32 x 4k: 256 CTAs that fit 3 per SM, launched while
// the previous step's last CTAs stream: 176 -> 190 us).
inline int decode_launch_smem(int ring, int64_t grid_ctas) {
  static int per_sm[64] = {}, reserved[64] = {}, sms[64] = {}, optin[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return ring;
  if (per_sm[device] == 0) {
    if (cudaDeviceGetAttribute(&reserved[device], cudaDevAttrReservedSharedMemoryPerBlock, device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin[device], cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&per_sm[device], cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                               device) != cudaSuccess) {
      (void)cudaGetLastError();
      per_sm[device] = 0;
      return ring;
    }
  }
  if (sms[device] <= 0) return ring;
  const int64_t per = (grid_ctas + sms[device] - 1) / sms[device];
  if (per < 1 || per >= 32) return ring;
  // (per + 1) CTAs of (smem + reserved) bytes must not fit in one SM.
  const int64_t pad = per_sm[device] / (per + 1) - reserved[device] + 1;
  if (pad <= ring) return ring;
  return pad <= optin[device] ? static_cast<int>(pad) : ring;
}

template <int kHeadDim, ElemType kDtype>
int decode_ctas_per_sm(int stages, bool paged, bool tma, KvKind kv) {
  using Traits = DecodeTraits<kHeadDim>;
  if (decode_raise_smem_limit<kHeadDim, kDtype>() != cudaSuccess) return 0;
  void* kernel = decode_kernel_of<kHeadDim, kDtype>(paged, tma, kv);
  if (kernel == nullptr) return 0;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Traits::kThreads,
                                                    decode_smem_bytes<kHeadDim>(stages, tma, kv)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

template <int kHeadDim, ElemType kDtype>
bool decode_tma_runnable() {
  // The TMA variant exists only in sm90+ machine code: the binary this device
  // runs must have been built for it (an older image traps).
  void* kernel = decode_kernel_of<kHeadDim, kDtype>(false, true, KvKind::kSame);
  if (kernel == nullptr) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.binaryVersion >= 90;
}

template <int kHeadDim, ElemType kDtype>
int decode_max_clusters(int stages, bool paged, bool tma, KvKind kv, int cluster) {
  using Traits = DecodeTraits<kHeadDim>;
  if (cluster < 2 || cluster > kMaxClusterSplits) return 0;
  if (decode_raise_smem_limit<kHeadDim, kDtype>() != cudaSuccess) return 0;
  void* kernel = decode_kernel_of<kHeadDim, kDtype>(paged, tma, kv);
  if (kernel == nullptr) return 0;
  // Clusters exist in sm90+ machine code only.
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (attr.binaryVersion < 90) return 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(cluster));
  cfg.blockDim = dim3(Traits::kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(decode_smem_bytes<kHeadDim>(stages, tma, kv));
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// K or V cache (element strides of DecodeParams) as a 4-D tensor
// (head_dim, heads_kv, seqlen_k_max, cache_batch) of 2-byte elements, boxes of
// 64 columns x block_n rows of one head, 128-byte swizzle; out-of-range box
// parts read as zeros.
inline bool encode_kv_map(unsigned char (&blob)[128], const void* base, const DecodeParams& p,
                          int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                          int block_n) {
  return encode_head_rows_map(blob, base, p.head_dim, p.heads_kv, p.seqlen_k_max, p.cache_batch,
                              batch_stride, row_stride, head_stride, block_n);
}

template <int kHeadDim, ElemType kDtype>
cudaError_t run_decode_hdim(const DecodeParams& p, cudaStream_t stream, bool programmatic) {
  using Traits = DecodeTraits<kHeadDim>;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0) return cudaSuccess;
  if (p.head_dim > kHeadDim || p.head_dim % 8 != 0 || p.heads_kv <= 0 ||
      p.heads_q % p.heads_kv != 0 || p.heads_kv > 65535 || p.num_splits < 1 ||
      p.stages < Traits::kMinStages || p.stages > Traits::kMaxStages ||
      (p.warps_m != 1 && p.warps_m != 2 && p.warps_m != 4) || p.num_m_blocks < 1 ||
      (p.num_splits > 1 && !p.combine_in_cluster &&
       (p.o_partial == nullptr || p.lse_partial == nullptr)) ||
      (p.combine_in_cluster && p.num_splits > kMaxClusterSplits) ||
      (p.block_table != nullptr && p.page_size < 1) ||
      (p.kv_kind != KvKind::kSame &&
       (p.use_tma || p.head_dim % 16 != 0 || p.k_row_stride % 2 != 0 || p.k_head_stride % 2 != 0 ||
        p.k_batch_stride % 2 != 0 || p.v_row_stride % 2 != 0 || p.v_head_stride % 2 != 0 ||
        p.v_batch_stride % 2 != 0))) {
    return cudaErrorInvalidValue;
  }
  const int64_t gx = static_cast<int64_t>(p.num_m_blocks) * p.num_splits;
  if (gx > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t err = decode_raise_smem_limit<kHeadDim, kDtype>();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(gx), p.heads_kv, p.batch < 65535 ? p.batch : 65535);
  const bool paged = p.block_table != nullptr;
  void* kernel = decode_kernel_of<kHeadDim, kDtype>(paged, p.use_tma, p.kv_kind);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  DecodeParams q = p;
  q.group_div = make_fast_div(p.heads_q / p.heads_kv);
  q.split_div = make_fast_div(p.num_splits);
  if (p.use_tma &&
      !(encode_kv_map(q.k_tma, p.k, p, p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                      Traits::kBlockN) &&
        encode_kv_map(q.v_tma, p.v, p, p.v_batch_stride, p.v_row_stride, p.v_head_stride,
                      Traits::kBlockN))) {
    return cudaErrorInvalidValue;
  }
  void* args[] = {&q};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(Traits::kThreads);
  const int ring = decode_smem_bytes<kHeadDim>(p.stages, p.use_tma, p.kv_kind);
  const int64_t grid_ctas = gx * p.heads_kv * static_cast<int64_t>(grid.z);
  cfg.dynamicSmemBytes = static_cast<size_t>(programmatic ? decode_launch_smem(ring, grid_ctas) : ring);
  cfg.stream = stream;
  cudaLaunchAttribute at[2];
  unsigned n_at = 0;
  if (p.combine_in_cluster && p.num_splits > 1) {
    // The splits of one m-block (adjacent in x) form one cluster.
    at[n_at].id = cudaLaunchAttributeClusterDimension;
    at[n_at].val.clusterDim.x = static_cast<unsigned>(p.num_splits);
    at[n_at].val.clusterDim.y = 1;
    at[n_at].val.clusterDim.z = 1;
    ++n_at;
  }
  if (programmatic) {
    at[n_at].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n_at].val.programmaticStreamSerializationAllowed = 1;
    ++n_at;
  }
  cfg.attrs = at;
  cfg.numAttrs = n_at;
  err = cudaLaunchKernelExC(&cfg, kernel, args);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastattn

#define FASTATTN_INSTANTIATE_DECODE(HDIM, DTYPE)                                             \
  template cudaError_t fastattn::gpu::run_decode_hdim<HDIM, fastattn::ElemType::DTYPE>(      \
      const fastattn::DecodeParams&, cudaStream_t, bool);                                    \
  template int fastattn::gpu::decode_ctas_per_sm<HDIM, fastattn::ElemType::DTYPE>(             \
      int, bool, bool, fastattn::KvKind);                                                    \
  template bool fastattn::gpu::decode_tma_runnable<HDIM, fastattn::ElemType::DTYPE>();   \
  template int fastattn::gpu::decode_max_clusters<HDIM, fastattn::ElemType::DTYPE>(            \
      int, bool, bool, fastattn::KvKind, int);
