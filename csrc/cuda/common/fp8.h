// FP8 (e4m3 / e5m2) KV-cache codes -> the 16-bit MMA operand type, in
// registers, with a handful of integer ops per pair and no table or
// conversion unit (sm80 has none for fp8).
//
// Two codes c0, c1 (bytes of a 32-bit word) are first spread into the high
// bytes of two 16-bit halves, t = {c0 << 8, c1 << 8}: sign at bit 15, the
// code's magnitude bits below it. Re-aligning the magnitude under the target
// type's exponent field gives, exactly, the code's value times a power of two
// (the bias difference), subnormal codes included (they land on the target's
// subnormals with the same mantissa):
//   e5m2 -> fp16: t itself                        factor 1
//   e4m3 -> fp16: magnitude >> 1                  factor 2^-8   (bias 7 vs 15)
//   e5m2 -> bf16: magnitude >> 3, times 2^112     factor 1      (bias 15 vs 127)
//   e4m3 -> bf16: magnitude >> 4, times 2^120     factor 1      (bias 7 vs 127)
// fp16 keeps its factor: the kernels fold kFp8Fold<Elem, kKv> = 256 into the
// score scale (K) and the output scale (V), so no multiply is spent per
// element. bf16 has to multiply (one bf16x2 FMA per pair, exact: the result
// is representable): left at 2^-120, the products with Q would reach fp32's
// subnormal range inside the tensor cores.
// Non-finite codes are not preserved (an e4m3 NaN reads as +-480 times the
// scale); the cache writer (append_kv) saturates, so it never stores them.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common/params.h"
#include "cuda/common/types.h"

namespace fastattn {

// Bytes kLo and kHi of w, each into the high byte of one 16-bit half (low half first).
template <int kLo, int kHi>
__device__ __forceinline__ uint32_t fp8_spread(uint32_t w) {
  // prmt: selector nibble i picks result byte i from {w, 0} (index 4 = a zero byte).
  return __byte_perm(w, 0u, 0x4 | (kLo << 4) | (0x4 << 8) | (kHi << 12));
}

__device__ __forceinline__ uint32_t bf16x2_mul_exact(uint32_t x, uint32_t pow2) {
  uint32_t r;
  // c = -0: x * 2^k + (-0) keeps the sign of a zero x.
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(pow2), "r"(0x80008000u));
  return r;
}

// Both halves of t (code << 8 each) moved down by kShift: each half is then
// code << (8 - kShift) (the bits that cross into the lower half are the upper
// half's zero low byte), with the sign at bit 15 - kShift; adding 2^kShift - 1
// more copies of that sign bit moves it to bit 15 (it carries exactly there).
// Three ops, the last an IMAD: decode is bound by these integer ops.
template <int kShift>
__device__ __forceinline__ uint32_t fp8_realign(uint32_t t) {
  if constexpr (kShift == 0) {
    return t;
  } else {
    const uint32_t x = t >> kShift;
    const uint32_t sign = x & (0x80008000u >> kShift);
    return x + sign * ((1u << kShift) - 1u);
  }
}

// Codes kLo, kHi of w as one packed Elem pair (kLo in the low half), times
// kFp8Fold's inverse (see above).
template <typename Elem, KvKind kKv, int kLo, int kHi>
__device__ __forceinline__ uint32_t fp8x2_to(uint32_t w) {
  const uint32_t t = fp8_spread<kLo, kHi>(w);
  if constexpr (std::is_same_v<Elem, __half>) {
    return fp8_realign<kKv == KvKind::kE5M2 ? 0 : 1>(t);
  } else {
    if constexpr (kKv == KvKind::kE5M2) return bf16x2_mul_exact(fp8_realign<3>(t), 0x77807780u);
    return bf16x2_mul_exact(fp8_realign<4>(t), 0x7b807b80u);
  }
}

// Factor the fp16 codes carry (1 / the kernels' fold): e4m3 into fp16 is 2^-8.
template <typename Elem, KvKind kKv>
constexpr float kFp8Fold = (std::is_same_v<Elem, __half> && kKv == KvKind::kE4M3) ? 256.f : 1.f;

}  // namespace fastattn
