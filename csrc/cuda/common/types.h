// Element types and conversions for the CUDA kernels:
//   - ElemOf<ElemType>::type        ElemType (params.h) -> __half / __nv_bfloat16
//   - pack2<Elem>(lo, hi)           two floats -> one b32 holding {lo, hi} in Elem (round-to-nearest)
//   - unpack2<Elem>(u, lo, hi)      inverse (exact)
//   - to_float<Elem>(x)             scalar conversion
//   - kElemsPer16B<Elem>            elements per 16-byte vector (8 for 2-byte types)
//   - neg_inf()                     -infinity as a float, in host and device code
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common/params.h"

namespace fastattn {

template <ElemType E>
struct ElemOf;
template <>
struct ElemOf<ElemType::kFloat16> {
  using type = __half;
};
template <>
struct ElemOf<ElemType::kBFloat16> {
  using type = __nv_bfloat16;
};

__host__ __device__ __forceinline__ float neg_inf() { return -__builtin_huge_valf(); }

template <typename Elem>
constexpr int kElemsPer16B = 16 / static_cast<int>(sizeof(Elem));

// {lo, hi} -> b32 with lo in the low 16 bits: the operand order that the
// mma A/B fragments expect (element 2t in the low half, 2t+1 in the high half).
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename Elem>
__device__ __forceinline__ void unpack2(uint32_t u, float& lo, float& hi);

template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t u, float& lo, float& hi) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t u, float& lo, float& hi) {
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&u);
  float2 f = __bfloat1622float2(h);
  lo = f.x;
  hi = f.y;
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace fastattn
