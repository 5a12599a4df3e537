// Small PTX / memory helpers first needed by the backward kernels (usable by
// any kernel; complements common/ptx.h):
//   cp_async_4(dst, src, pred)          4-byte cp.async, zero-fill when !pred (per-row
//                                       scalars such as LSE whose rows are not 16-byte aligned)
//   red_add_f32x2(ptr, a, b)            ptr[0] += a, ptr[1] += b as fire-and-forget global
//                                       reductions (one vector RED on sm90+, two scalar ones
//                                       before); ptr must be 8-byte aligned
//   rmw_add_f32x2(ptr, a, b)            the same with a plain load + store: for buffers that
//                                       exactly one thread ever updates (bitwise reproducible)
//   red_add_f32x4 / rmw_add_f32x4(ptr, a, b, c, d)
//                                       the same for 4 floats; ptr 16-byte aligned
//   bar_sync_named(id, threads)         barrier `id` (1..15; 0 is __syncthreads) over
//                                       `threads` threads (a multiple of 32), with
//                                       shared-memory ordering among them
#pragma once
#include <cstdint>

namespace fastattn {
namespace ptx {

__device__ __forceinline__ void cp_async_4(uint32_t smem_dst, const void* src, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void red_add_f32x2(float* ptr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(ptr, a);
  atomicAdd(ptr + 1, b);
#endif
}

__device__ __forceinline__ void rmw_add_f32x2(float* ptr, float a, float b) {
  float2 v = *reinterpret_cast<const float2*>(ptr);
  v.x += a;
  v.y += b;
  *reinterpret_cast<float2*>(ptr) = v;
}

__device__ __forceinline__ void red_add_f32x4(float* ptr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "f"(a), "f"(b),
               "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(ptr, a);
  atomicAdd(ptr + 1, b);
  atomicAdd(ptr + 2, c);
  atomicAdd(ptr + 3, d);
#endif
}

__device__ __forceinline__ void rmw_add_f32x4(float* ptr, float a, float b, float c, float d) {
  float4 v = *reinterpret_cast<const float4*>(ptr);
  v.x += a;
  v.y += b;
  v.z += c;
  v.w += d;
  *reinterpret_cast<float4*>(ptr) = v;
}

__device__ __forceinline__ void bar_sync_named(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace ptx
}  // namespace fastattn
