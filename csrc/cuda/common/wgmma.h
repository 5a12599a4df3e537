// sm90 warpgroup MMA (wgmma) wrappers for the Hopper forward and backward kernels.
//
// A warpgroup (4 consecutive warps, 128 threads) computes D[64 x N] (+)= A[64 x 16] B[16 x N]
// with one asynchronous instruction. The fp32 accumulator layout is the
// mma.m16n8 C layout of ptx.h repeated: warp w of the group owns rows
// 16w..16w+15 and d[i][0..3] are the C fragment of columns 8i..8i+7. So the
// mask, the online softmax and the epilogue of the sm80 kernel apply
// unchanged (as MT = 1, NT = N / 8), and a pair of score tiles converts to
// an A register fragment for P V with c_pair_to_a (fragment.h).
//
// Operands in shared memory are described by a 64-bit matrix descriptor
// (smem_desc_sw128). Every tile here is a SwizzledTile128 (fragment.h):
// 64-column boxes of 128-byte rows, 16-byte chunk j of row r at j ^ (r & 7),
// each box 1024-byte aligned; that is the hardware's 128-byte swizzle.
//   - K-major operand (Q as A, K as B of Q K^T: the contracted head dim is
//     contiguous): the k16 slice at columns c..c+15 of a box starts c * 2
//     bytes into the box; 8-row groups are 1024 bytes apart (stride offset).
//   - MN-major operand (V as B of P V: the contracted key dim is strided): the
//     slice of keys k..k+15 starts k * 128 bytes into the first box; 8-key
//     groups are 1024 bytes apart (stride offset) and 64-column groups one box
//     apart (leading offset).
//
// Ordering rules (PTX ISA "asynchronous warpgroup MMA"):
//   - fence() before the first MMA of a batch whose accumulator or A registers
//     were written by ordinary instructions;
//   - commit() closes a batch, wait<N>() waits until at most N batches are pending;
//   - the accumulators are not to be touched between the MMA and its wait. The
//     compiler sees the asm's outputs as ready at issue, so callers pin every
//     accumulator register after the wait with hold() (an empty asm that
//     "redefines" it), keeping its later reads below the wait.
// Only sm_90a machine code has these instructions (FASTATTN_WGMMA_AVAILABLE);
// elsewhere the wrappers compile to nothing and the host never launches the
// kernels that use them (see kernel_select.h, sm90_body_runnable).
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTATTN_WGMMA_AVAILABLE 1
#else
#define FASTATTN_WGMMA_AVAILABLE 0
#endif

namespace fastattn {
namespace wgmma {

// Descriptor of a 128-byte-swizzled operand starting at shared address addr
// (14-bit fields in 16-byte units; bits 62-63 = 1 selects the 128-byte swizzle).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

__device__ __forceinline__ void fence() {
#if FASTATTN_WGMMA_AVAILABLE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void commit() {
#if FASTATTN_WGMMA_AVAILABLE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wait() {
#if FASTATTN_WGMMA_AVAILABLE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

template <int NT>
__device__ __forceinline__ void hold(float (&d)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

template <int NT>
__device__ __forceinline__ void hold(uint32_t (&a)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// Operand lists of the asm below (accumulators are operands 0..N/2-1).
#define FASTATTN_WGMMA_REGS_64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FASTATTN_WGMMA_REGS_128                                                          \
  FASTATTN_WGMMA_REGS_64 ","                                                             \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"      \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FASTATTN_WGMMA_ACC_64(d, C) \
      C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), \
      C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
      C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), \
      C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
      C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), \
      C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
      C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), \
      C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3])
#define FASTATTN_WGMMA_ACC_128(d, C) \
      FASTATTN_WGMMA_ACC_64(d, C), \
      C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), \
      C(d[9][0]), C(d[9][1]), C(d[9][2]), C(d[9][3]), \
      C(d[10][0]), C(d[10][1]), C(d[10][2]), C(d[10][3]), \
      C(d[11][0]), C(d[11][1]), C(d[11][2]), C(d[11][3]), \
      C(d[12][0]), C(d[12][1]), C(d[12][2]), C(d[12][3]), \
      C(d[13][0]), C(d[13][1]), C(d[13][2]), C(d[13][3]), \
      C(d[14][0]), C(d[14][1]), C(d[14][2]), C(d[14][3]), \
      C(d[15][0]), C(d[15][1]), C(d[15][2]), C(d[15][3])

// D[64 x N] (+)= A[64 x 16] B[16 x N], A and B in shared memory; TR = "0, 0":
// both K-major, "1, 1": both MN-major (transposed). `accumulate` = 0 ignores
// D's old value (first k step).
#define FASTATTN_WGMMA_SS(N, TYPES, A, B, SC, TR)                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #SC ", 0;\n"                     \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPES " {"            \
               FASTATTN_WGMMA_REGS_##N "}, %" #A ", %" #B ", p, 1, 1, " TR ";\n}\n"    \
               : FASTATTN_WGMMA_ACC_##N(d, "+f")                                        \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// D[64 x N] (+)= A[64 x 16] B[16 x N], A in registers (mma A fragment layout
// per warp), B MN-major in shared memory (transposed: N contiguous).
#define FASTATTN_WGMMA_RS_TB(N, TYPES, A0, A1, A2, A3, B, SC)                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #SC ", 0;\n"                      \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPES " {"             \
               FASTATTN_WGMMA_REGS_##N "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B \
               ", p, 1, 1, 1;\n}\n"                                                     \
               : FASTATTN_WGMMA_ACC_##N(d, "+f")                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

// kMnMajor = false: A and B K-major (Q K^T); true: both MN-major (the
// backward's dQ = dS K from dS^T and K as stored).
template <int N, typename Elem, bool kMnMajor = false>
__device__ __forceinline__ void mma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,
                                       int accumulate) {
  static_assert(N == 64 || N == 128, "compiled wgmma widths");
#if FASTATTN_WGMMA_AVAILABLE
  constexpr bool kBf16 = std::is_same<Elem, __nv_bfloat16>::value;
  if constexpr (N == 64 && !kMnMajor) {
    if constexpr (kBf16) FASTATTN_WGMMA_SS(64, "bf16.bf16", 32, 33, 34, "0, 0");
    else FASTATTN_WGMMA_SS(64, "f16.f16", 32, 33, 34, "0, 0");
  } else if constexpr (N == 64) {
    if constexpr (kBf16) FASTATTN_WGMMA_SS(64, "bf16.bf16", 32, 33, 34, "1, 1");
    else FASTATTN_WGMMA_SS(64, "f16.f16", 32, 33, 34, "1, 1");
  } else if constexpr (!kMnMajor) {
    if constexpr (kBf16) FASTATTN_WGMMA_SS(128, "bf16.bf16", 64, 65, 66, "0, 0");
    else FASTATTN_WGMMA_SS(128, "f16.f16", 64, 65, 66, "0, 0");
  } else {
    if constexpr (kBf16) FASTATTN_WGMMA_SS(128, "bf16.bf16", 64, 65, 66, "1, 1");
    else FASTATTN_WGMMA_SS(128, "f16.f16", 64, 65, 66, "1, 1");
  }
#endif
}

template <int N, typename Elem>
__device__ __forceinline__ void mma_rs_tb(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                          uint64_t desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "compiled wgmma widths");
#if FASTATTN_WGMMA_AVAILABLE
  constexpr bool kBf16 = std::is_same<Elem, __nv_bfloat16>::value;
  if constexpr (N == 64) {
    if constexpr (kBf16) FASTATTN_WGMMA_RS_TB(64, "bf16.bf16", 32, 33, 34, 35, 36, 37);
    else FASTATTN_WGMMA_RS_TB(64, "f16.f16", 32, 33, 34, 35, 36, 37);
  } else {
    if constexpr (kBf16) FASTATTN_WGMMA_RS_TB(128, "bf16.bf16", 64, 65, 66, 67, 68, 69);
    else FASTATTN_WGMMA_RS_TB(128, "f16.f16", 64, 65, 66, 67, 68, 69);
  }
#endif
}

#undef FASTATTN_WGMMA_SS
#undef FASTATTN_WGMMA_RS_TB

}  // namespace wgmma
}  // namespace fastattn
