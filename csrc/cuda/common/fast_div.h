// Division by a divisor fixed at launch, as one multiply-high, one add and one
// shift (Granlund & Montgomery's round-up method): for 1 <= d < 2^31 and
// 0 <= n < 2^31, with s = ceil(log2 d) and mul = floor(2^32 (2^s - d) / d) + 1,
//     n / d == (umulhi(n, mul) + n) >> s
// (umulhi(n, mul) < n, so the sum fits in 32 bits). GPUs have no integer
// divide instruction: a division by a runtime value is a ~20-instruction
// dependent chain, whose whole latency a kernel pays where it runs one warp
// per scheduler (the decode prologue and epilogue).
// Torch-free; the struct is plain data for the params structs.
#pragma once
#include <cstdint>

namespace fastattn {

struct FastDiv {
  uint32_t d = 1;
  uint32_t mul = 1;
  uint32_t shift = 0;
};

inline FastDiv make_fast_div(int divisor) {
  FastDiv f;
  const uint32_t d = divisor < 1 ? 1u : static_cast<uint32_t>(divisor);
  uint32_t s = 0;
  while ((uint64_t{1} << s) < d) ++s;
  f.d = d;
  f.mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  f.shift = s;
  return f;
}

#ifdef __CUDACC__
// n / f.d and n % f.d for 0 <= n < 2^31.
__device__ __forceinline__ int fast_div(const FastDiv& f, int n) {
  const uint32_t u = static_cast<uint32_t>(n);
  return static_cast<int>((__umulhi(u, f.mul) + u) >> f.shift);
}
__device__ __forceinline__ int fast_mod(const FastDiv& f, int n, int q) {
  return n - q * static_cast<int>(f.d);
}
#endif

}  // namespace fastattn
