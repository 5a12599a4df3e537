// Dev microbenchmark: the streaming ceiling of the decode access pattern.
//
// One CTA (4 warps) per (sequence, KV head [, split]) reads its K and V rows of a
// (B, L, Hkv, D) bf16 cache (B=16, L=32k, Hkv=8, D=128: 2.1 GB, the largest
// benchmarks/decode config) through a shared-memory ring and does no math, with
//   - cp.async 16-byte copies, every thread issuing its share (the loads of
//     flash_decode_kernel.cuh), and
//   - TMA tensor copies (cp.async.bulk.tensor, one 64-row x 128-column box per
//     tile and tensor, issued by one thread, completion on an mbarrier).
// Its times are the floor for a decode kernel built on each mechanism.
//
// H100 80GB HBM3, 2026-11-21 (median of 15, two passes agreed within 1%):
//   cp.async, 3-stage ring, 1 CTA / (seq, head)      712 us  3013 GB/s
//   cp.async, 4 stages / 2 or 3 splits                711-722 us
//   TMA, 3-stage ring, 1 CTA / (seq, head)           688 us  3120 GB/s
//   TMA, 2 or 3 splits                               693-697 us
//   (same session: our cp.async decode kernel 717-720 us, cuDNN's 686 us)
// So the cp.async decode kernel ran at the cp.async streaming floor (its math
// is hidden: cutting the MMAs to 1/8 moved it by < 1%), and cuDNN runs at the
// TMA floor; this is why decode on sm90 now loads through TMA boxes
// (DecodeTmaTraits, 693 us). One 256-byte bulk copy per row (cp.async.bulk,
// non-tensor) was 3x slower than cp.async: the copy engine wants large boxes.
//
// Build and run on the GPU machine (sm90):
//   nvcc -gencode arch=compute_90,code=sm_90 -std=c++17 -O3 scripts/dev/stream_ceiling.cu \
//        -o /tmp/stream -lcuda && /tmp/stream
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)
constexpr int B = 16, L = 32768, H = 8, D = 128, BN = 64;
constexpr int ROWB = (D + 8) * 2;       // padded smem row
constexpr int TILE = BN * ROWB;         // padded K tile bytes

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

template <int kHint, int STAGES>
__global__ void __launch_bounds__(128) cpasync_ring(const uint16_t* k, const uint16_t* v, float* out, int S) {
  extern __shared__ __align__(128) char smem[];
  const int hk = blockIdx.x % H, b = (blockIdx.x / H) % B, sp = blockIdx.x / (H * B), tid = threadIdx.x;
  const int64_t rs = H * D;
  const uint16_t* kb = k + (int64_t)b * L * rs + hk * D;
  const uint16_t* vb = v + (int64_t)b * L * rs + hk * D;
  const int r0 = tid / 16, c = tid % 16;
  const uint32_t base = smem_u32(smem);
  auto load = [&](int st, int blk) {
    for (int i = 0; i < 8; ++i) {
      const int r = r0 + 8 * i;
      const uint32_t d = base + st * 2 * TILE + r * ROWB + c * 16;
      const uint16_t* sk = kb + (int64_t)(blk * BN + r) * rs + c * 8;
      const uint16_t* sv = vb + (int64_t)(blk * BN + r) * rs + c * 8;
      if (kHint) {
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(d), "l"(sk));
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(d + TILE), "l"(sv));
      } else {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(sk));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d + TILE), "l"(sv));
      }
    }
    asm volatile("cp.async.commit_group;\n");
  };
  const int nb = L / BN / S;
  kb += (int64_t)sp * nb * BN * rs;
  vb += (int64_t)sp * nb * BN * rs;
  float acc = 0.f;
  for (int s = 0; s < STAGES - 1; ++s) load(s, s);
  for (int it = 0; it < nb; ++it) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < nb) load(nxt % STAGES, nxt); else asm volatile("cp.async.commit_group;\n");
    const char* t = smem + (it % STAGES) * 2 * TILE;
    acc += __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(t + (tid % 64) * ROWB + (tid / 64) * TILE));
  }
  if (acc == 12345.f) out[blockIdx.x] = acc;
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t ph) {
  asm volatile("{\n.reg .pred p;\nW%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W%=;\n}\n" ::"r"(bar), "r"(ph) : "memory");
}

// TMA: kBoxD columns per box, D / kBoxD boxes per tile per tensor. Dense smem tiles.
template <int kBoxD, int BN, int STAGES>
__global__ void __launch_bounds__(128) tma_ring(const __grid_constant__ CUtensorMap km, const __grid_constant__ CUtensorMap vm, float* out, int S) {
  extern __shared__ __align__(128) char smem[];
  constexpr int TILE_DENSE = BN * D * 2;
  const int hk = blockIdx.x % H, b = (blockIdx.x / H) % B, sp = blockIdx.x / (H * B), tid = threadIdx.x;
  const uint32_t base = smem_u32(smem);
  const uint32_t bars = base + STAGES * 2 * TILE_DENSE;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bars + 8 * s));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int nb = L / BN / S;
  const int blk0 = sp * nb;
  auto load = [&](int st, int blk) {
    blk += blk0;
    const uint32_t bar = bars + 8 * st;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(2 * TILE_DENSE) : "memory");
    for (int j = 0; j < D / kBoxD; ++j) {
      const uint32_t dk = base + st * 2 * TILE_DENSE + j * BN * kBoxD * 2;
      const uint32_t dv = dk + TILE_DENSE;
      const int c0 = j * kBoxD, c1 = hk, c2 = blk * BN + b * L;
      asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                   ::"r"(dk), "l"(&km), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
      asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                   ::"r"(dv), "l"(&vm), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
    }
  };
  float acc = 0.f;
  if (tid == 0) for (int s = 0; s < STAGES - 1; ++s) load(s, s);
  for (int it = 0; it < nb; ++it) {
    __syncthreads();  // all done with slot it-1
    const int nxt = it + STAGES - 1;
    if (tid == 0 && nxt < nb) load(nxt % STAGES, nxt);
    mbar_wait(bars + 8 * (it % STAGES), (it / STAGES) & 1);
    const char* t = smem + (it % STAGES) * 2 * TILE_DENSE;
    acc += __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(t + (tid % 64) * 256 + (tid / 64) * TILE_DENSE));
  }
  if (acc == 12345.f) out[blockIdx.x] = acc;
}

__global__ void fill(uint16_t* p, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = (uint16_t)(0x3c00 ^ (uint16_t)(i * 2654435761u >> 7));
}

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                             const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

int main() {
  const int64_t n = (int64_t)B * L * H * D;
  uint16_t *k, *v; float* out;
  CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, n * 2)); CK(cudaMalloc(&out, 4096));
  fill<<<1024, 256>>>(k, n); fill<<<1024, 256>>>(v, n); CK(cudaDeviceSynchronize());
  EncodeFn enc = nullptr; cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&enc, 12000, cudaEnableDefault, &q));
  auto make = [&](void* p, int boxd, CUtensorMapL2promotion promo, int bn = BN) {
    CUtensorMap m;
    cuuint64_t dims[3] = {D, H, (cuuint64_t)B * L};
    cuuint64_t strides[2] = {D * 2, (cuuint64_t)H * D * 2};
    cuuint32_t box[3] = {(cuuint32_t)boxd, 1, (cuuint32_t)bn};
    cuuint32_t es[3] = {1, 1, 1};
    CUresult r = enc(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, p, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     CU_TENSOR_MAP_SWIZZLE_NONE, promo, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("encode failed %d\n", (int)r); exit(1); }
    return m;
  };
  const double bytes = 2.0 * n * 2;
  auto timeit = [&](const char* name, auto launch) {
    for (int i = 0; i < 3; ++i) launch();
    CK(cudaDeviceSynchronize());
    std::vector<float> ts;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 15; ++i) { cudaEventRecord(a); launch(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms); }
    CK(cudaGetLastError());
    std::sort(ts.begin(), ts.end());
    printf("%-34s %8.1f us  %7.0f GB/s\n", name, ts[ts.size() / 2] * 1e3, bytes / (ts[ts.size() / 2] * 1e-3) / 1e9);
  };
  CUtensorMap km = make(k, 128, CU_TENSOR_MAP_L2_PROMOTION_L2_256B), vm = make(v, 128, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  auto cpa = [&](const char* name, auto kern, int st, int S) {
    const int sm = st * 2 * TILE;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
    int occ = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, 128, sm));
    char buf[128]; snprintf(buf, sizeof buf, "%s occ%d", name, occ);
    timeit(buf, [&] { kern<<<B * H * S, 128, sm>>>(k, v, out, S); });
  };
  auto tma = [&](const char* name, auto kern, int bn, int st, int S, const CUtensorMap& a, const CUtensorMap& b) {
    const int sm = st * 2 * bn * D * 2 + 64;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
    int occ = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, 128, sm));
    char buf[128]; snprintf(buf, sizeof buf, "%s occ%d", name, occ);
    timeit(buf, [&] { kern<<<B * H * S, 128, sm>>>(a, b, out, S); });
  };
  for (int rep = 0; rep < 2; ++rep) {
    cpa("cp.async 64x3 S1", cpasync_ring<1, 3>, 3, 1);
    cpa("cp.async 64x4 S1", cpasync_ring<1, 4>, 4, 1);
    cpa("cp.async 64x3 S2", cpasync_ring<1, 3>, 3, 2);
    cpa("cp.async 64x2 S2", cpasync_ring<1, 2>, 2, 2);
    cpa("cp.async 64x2 S3", cpasync_ring<1, 2>, 2, 3);
    tma("TMA 64x3 S1", tma_ring<128, 64, 3>, 64, 3, 1, km, vm);
    tma("TMA 64x3 S2", tma_ring<128, 64, 3>, 64, 3, 2, km, vm);
    tma("TMA 64x2 S2", tma_ring<128, 64, 2>, 64, 2, 2, km, vm);
    tma("TMA 64x2 S3", tma_ring<128, 64, 2>, 64, 2, 3, km, vm);
  }
  return 0;
}
