// PTX wrappers for sm80+ attention kernels (written for fastattn, no external
// dependencies beyond the CUDA headers):
//   - shared-memory addresses:   smem_u32(ptr)
//   - async copies:              cp_async_16(dst, src, pred)   16 bytes, zero-fill when !pred
//   - early loads:               ld_global_nc_early(p)   not moved towards its use
//                                cp_async_commit(), cp_async_wait<N>()
//   - tensor-core MMA:           mma_m16n8k16<Elem>(c, a, b)  fp16/bf16 in, fp32 accumulate
//   - ldmatrix:                  ldsm_x4 / ldsm_x4_trans / ldsm_x2 / ldsm_x2_trans
//   - fast math:                 ex2_approx(x)   (2^x, ftz)
//
// Register fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major), 4 x b32, each holding 2 consecutive-k elements:
//       a[0]: (row g,   k 2t..2t+1)     a[1]: (row g+8, k 2t..2t+1)
//       a[2]: (row g,   k 2t+8..2t+9)   a[3]: (row g+8, k 2t+8..2t+9)
//   B (16x8, "col": k contiguous per column n), 2 x b32:
//       b[0]: (k 2t..2t+1, col g)       b[1]: (k 2t+8..2t+9, col g)
//   C/D (16x8 fp32), 4 floats:
//       c[0], c[1]: (row g,   cols 2t, 2t+1)
//       c[2], c[3]: (row g+8, cols 2t, 2t+1)
// common/fragment.h builds on these to load whole fragments from smem tiles.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastattn {
namespace ptx {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---------------------------------------------------------------- cp.async
// Copies 16 bytes global -> shared (bypassing L1). When pred is false nothing
// is read (src-size 0) and the 16 destination bytes are zero-filled; `src`
// must still be some valid address (pass the tensor's base pointer).
// Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// Read-only 32-bit global load that stays where it is written (volatile asm
// keeps its order with the cp.async / barrier asm around it). For loads issued
// early on purpose (a block table entry fetched one tile ahead): a plain load
// may be sunk next to its first use, putting its latency back on the path.
__device__ __forceinline__ int ld_global_nc_early(const int* p) {
  int v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still pending.
// Other threads' copies become visible only after a following __syncthreads().
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------- mma.sync
template <typename Elem>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// c += a * b for one 16x8x16 tile (layouts in the header comment).
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  Mma<Elem>::run(c, a, b[0], b[1]);
}
// Same with the two B registers passed separately (e.g. b[2], b[3] of a
// load_b_pair result for its second n8 tile).
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  Mma<Elem>::run(c, a, b0, b1);
}

// ---------------------------------------------------------------- ldmatrix
// Each lane passes the shared address of one 16-byte row: lanes 8i..8i+7 give
// the 8 rows of matrix i. Register r[i] receives matrix i with lane l holding
// row l/4, elements 2(l%4), 2(l%4)+1 (with .trans: column l/4, rows 2(l%4), +1).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// x2: lanes 0..15 give the addresses (lanes 16..31 are ignored but must be valid).
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// ---------------------------------------------------------------- math
// 2^x with flush-to-zero; ex2(-inf) = +0.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace ptx
}  // namespace fastattn
