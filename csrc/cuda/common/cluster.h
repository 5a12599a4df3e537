// Thread-block-cluster wrappers (sm90+): the cluster-wide barrier and reads of
// another CTA's shared memory (distributed shared memory, DSMEM).
//
// Rules the users follow:
//   - A CTA reads a peer's shared memory only between two cluster barriers:
//     the first (release / acquire) publishes what every CTA wrote before it,
//     the second keeps every CTA (and its shared memory) alive until all
//     reads are done.
//   - Every thread of every CTA of the cluster executes each barrier
//     (.aligned: convergent per warp).
//   - Below sm90 these are no-ops / zeros; the host never launches clusters
//     there (it checks the binary version of the kernel it launches).
#pragma once
#include <cstdint>

namespace fastattn {
namespace ptx {

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
#endif
}

// The shared::cluster address of `smem_addr` (a shared::cta address of this
// CTA) in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t cluster_map(uint32_t smem_addr, int rank) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_addr), "r"(rank));
#endif
  return r;
}

__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
  float x = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(x) : "r"(addr) : "memory");
#endif
  return x;
}

// 16-byte aligned.
__device__ __forceinline__ float4 ld_cluster_f32x4(uint32_t addr) {
  float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w)
               : "r"(addr)
               : "memory");
#endif
  return x;
}

}  // namespace ptx
}  // namespace fastattn
