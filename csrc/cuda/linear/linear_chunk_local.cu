// Chunk-local kernel of the chunked linear-attention forward (the math:
// linear_chunk_params.h). One CTA of 4 warps per (chunk, value head, batch);
// warp w owns chunk rows 16w..16w+15 of every C x . product (mma.sync
// m16n8k16, fp32 accumulators).
//
// Delta rule: T = (I + A)^{-1} for the strictly lower A in fp32
// (linear_ut_inverse.h); T then enters the mma products rounded to the input
// dtype, as the other operands.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_tiles.h"
#include "cuda/linear/linear_ut_inverse.h"

namespace fastattn {
namespace gpu {
namespace {

using namespace linear_tiles;
constexpr int C = LinearChunkParams::kChunk;
using linear_ut::invert_unit_lower;
using linear_ut::kFStride;

template <int kK, int kV, bool kDelta>
struct LocalSmem {
  using TileK = SmemTile<C, kK>;
  using TileV = SmemTile<C, kV>;
  using TileC = SmemTile<C, C>;
  static constexpr int kQ = 0;
  static constexpr int kKey = kQ + TileK::kBytes;        // K, then e^b K, then W
  static constexpr int kVal = kKey + TileK::kBytes;      // V, then U
  static constexpr int kM = kVal + TileV::kBytes;        // M (input dtype)
  static constexpr int kT = kM + TileC::kBytes;          // T (input dtype)
  static constexpr int kA = kT + (kDelta ? TileC::kBytes : 0);      // A, fp32
  static constexpr int kTf = kA + (kDelta ? C * kFStride * 4 : 0);  // T, fp32
  static constexpr int kB = kTf + (kDelta ? C * kFStride * 4 : 0);  // b (cumulative log decay)
  static constexpr int kBeta = kB + C * 4;
  static constexpr int kTotal = kBeta + C * 4 + 16;
};

// operand <- T operand (C x kN, in place in shared memory, after every warp
// has read it) and a copy to the workspace rows at dst.
template <typename Elem, int kN>
__device__ __forceinline__ void t_times_operand(const char* t_tile, char* operand, Elem* dst, int warp,
                                                int lane) {
  using TileN = SmemTile<C, kN>;
  float acc[kN / 8][4];
  rows_times_tile<Elem, kN>(acc, ptx::smem_u32(t_tile), ptx::smem_u32(operand), warp, lane);
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = acc_row(lane, 16 * warp, 2 * half), j = acc_col(lane, 8 * n, 0);
      store_pair<Elem>(operand, TileN::offset(i, j), acc[n][2 * half], acc[n][2 * half + 1]);
      store_pair_global<Elem>(dst + i * kN + j, acc[n][2 * half], acc[n][2 * half + 1]);
    }
  }
}

template <typename Elem, int kK, int kV, bool kDelta>
__global__ void __launch_bounds__(kThreads)
    linear_chunk_local_kernel(const __grid_constant__ LinearChunkParams p) {
  using L = LocalSmem<kK, kV, kDelta>;
  using TileK = typename L::TileK;
  using TileV = typename L::TileV;
  using TileC = typename L::TileC;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem + L::kQ;
  char* s_k = smem + L::kKey;
  char* s_v = smem + L::kVal;
  char* s_m = smem + L::kM;
  char* s_t = smem + L::kT;
  float* s_a = reinterpret_cast<float*>(smem + L::kA);
  float* s_tf = reinterpret_cast<float*>(smem + L::kTf);
  float* s_b = reinterpret_cast<float*>(smem + L::kB);
  float* s_beta = reinterpret_cast<float*>(smem + L::kBeta);
  __shared__ float s_warp0_total;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wc = blockIdx.x, hv = blockIdx.y, b = blockIdx.z;  // wc: workspace chunk
  const int h = hv / (p.HV / p.H);
  int t0, seq_end;  // tokens [t0, t0 + len) of batch row b
  if (!chunk_tokens(p, wc, t0, seq_end)) return;
  const int len = min(C, seq_end - t0);
  const int64_t row0 = ((static_cast<int64_t>(b) * p.HV + hv) * p.chunks + wc) * C;  // workspace row

  load_chunk_qkv<Elem, TileK, TileV>(p, b, h, hv, t0, len, s_q, s_k, s_v);

  // b = chunk-local inclusive cumulative sum of g (padding rows add 0, so b
  // stays at the last token's value), beta (padding rows 0).
  if (tid < C) {
    const int64_t gate = b * p.g_stride_b + static_cast<int64_t>(t0 + tid) * p.g_stride_t + hv * p.g_stride_h;
    float x = (p.g != nullptr && tid < len) ? p.g[gate] : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (tid == 31) s_warp0_total = x;
    s_b[tid] = x;
    s_beta[tid] = tid < len ? (p.beta != nullptr ? p.beta[gate] : 1.f) : 0.f;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  if (tid >= 32 && tid < C) s_b[tid] += s_warp0_total;
  __syncthreads();
  if (p.b_out != nullptr && tid < C) p.b_out[row0 + tid] = s_b[tid];

  // M = (Q K^T o Gamma) on j <= i; A = diag(beta) (K K^T o Gamma) on j < i.
  {
    float acc_qk[C / 8][4], acc_kk[C / 8][4];
#pragma unroll
    for (int n = 0; n < C / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_qk[n][e] = acc_kk[n][e] = 0.f;
    }
    const int a_off = a_lane_offset<TileK>(lane), b_off = b_lane_offset<TileK>(lane);
    const uint32_t q_tile = ptx::smem_u32(s_q), k_tile = ptx::smem_u32(s_k);
#pragma unroll
    for (int k0 = 0; k0 < kK; k0 += 16) {
      uint32_t aq[4], ak[4];
      load_a<TileK>(aq, q_tile, a_off, 16 * warp, k0);
      if (kDelta) load_a<TileK>(ak, k_tile, a_off, 16 * warp, k0);
#pragma unroll
      for (int n0 = 0; n0 < C; n0 += 16) {
        uint32_t bk[4];
        load_b_pair<TileK>(bk, k_tile, b_off, n0, k0);
        ptx::mma_m16n8k16<Elem>(acc_qk[n0 / 8], aq, bk[0], bk[1]);
        ptx::mma_m16n8k16<Elem>(acc_qk[n0 / 8 + 1], aq, bk[2], bk[3]);
        if (kDelta) {
          ptx::mma_m16n8k16<Elem>(acc_kk[n0 / 8], ak, bk[0], bk[1]);
          ptx::mma_m16n8k16<Elem>(acc_kk[n0 / 8 + 1], ak, bk[2], bk[3]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < C / 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = acc_row(lane, 16 * warp, 2 * half);
        const int j = acc_col(lane, 8 * n, 0);
        const float bi = s_b[i];
        // Gamma only where j <= i: the exponent is then <= 0 for decays <= 0.
        const float g0 = j <= i ? __expf(bi - s_b[j]) : 0.f;
        const float g1 = j + 1 <= i ? __expf(bi - s_b[j + 1]) : 0.f;
        store_pair<Elem>(s_m, TileC::offset(i, j), acc_qk[n][2 * half] * g0, acc_qk[n][2 * half + 1] * g1);
        if (p.m_out != nullptr) {
          store_pair_global<Elem>(static_cast<Elem*>(p.m_out) + (row0 + i) * C + j, acc_qk[n][2 * half] * g0,
                                  acc_qk[n][2 * half + 1] * g1);
        }
        if (kDelta) {
          const float bt = s_beta[i];
          s_a[i * kFStride + j] = j < i ? bt * acc_kk[n][2 * half] * g0 : 0.f;
          s_a[i * kFStride + j + 1] = j + 1 < i ? bt * acc_kk[n][2 * half + 1] * g1 : 0.f;
        }
      }
    }
  }
  __syncthreads();
  if (kDelta) invert_unit_lower<Elem>(s_a, s_tf, s_beta, s_t, warp, lane);

  // Kt = e^{b_last - b} K to the workspace; for the delta rule the B operand
  // e^b K replaces K in shared memory (V is used as it is).
  const float b_last = s_b[C - 1];
  {
    Elem* kt = static_cast<Elem*>(p.kt) + row0 * kK;
    for (int e = tid; e < C * kK / 2; e += kThreads) {
      const int r = e / (kK / 2), c = 2 * (e % (kK / 2));
      float x0, x1;
      load_pair<Elem>(s_k, TileK::offset(r, c), x0, x1);
      const float to_end = __expf(b_last - s_b[r]);
      store_pair_global<Elem>(kt + r * kK + c, x0 * to_end, x1 * to_end);
      if (kDelta) {
        const float f = __expf(s_b[r]);
        store_pair<Elem>(s_k, TileK::offset(r, c), x0 * f, x1 * f);
      }
    }
    if (tid == 0) p.decay_last[(static_cast<int64_t>(b) * p.HV + hv) * p.chunks + wc] = __expf(b_last);
  }
  __syncthreads();

  if (kDelta) {
    // W = (T diag(beta)) (e^b K), U = (T diag(beta)) V: each replaces its operand in shared
    // memory (after every warp has read it) and goes to the workspace.
    t_times_operand<Elem, kK>(s_t, s_k, static_cast<Elem*>(p.w) + row0 * kK, warp, lane);
    t_times_operand<Elem, kV>(s_t, s_v, static_cast<Elem*>(p.u) + row0 * kV, warp, lane);
    __syncthreads();
  }

  // Qt = scale (e^b Q - M W) (W = 0 without the delta rule).
  {
    Elem* qt = static_cast<Elem*>(p.qt) + row0 * kK;
    if (kDelta) {
      float acc[kK / 8][4];
      rows_times_tile<Elem, kK>(acc, ptx::smem_u32(s_m), ptx::smem_u32(s_k), warp, lane);
#pragma unroll
      for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = acc_row(lane, 16 * warp, 2 * half), j = acc_col(lane, 8 * n, 0);
          float q0, q1;
          load_pair<Elem>(s_q, TileK::offset(i, j), q0, q1);
          const float eb = __expf(s_b[i]);
          store_pair_global<Elem>(qt + i * kK + j, p.scale * (eb * q0 - acc[n][2 * half]),
                                  p.scale * (eb * q1 - acc[n][2 * half + 1]));
        }
      }
    } else {
      for (int e = tid; e < C * kK / 2; e += kThreads) {
        const int r = e / (kK / 2), c = 2 * (e % (kK / 2));
        float q0, q1;
        load_pair<Elem>(s_q, TileK::offset(r, c), q0, q1);
        const float f = p.scale * __expf(s_b[r]);
        store_pair_global<Elem>(qt + r * kK + c, q0 * f, q1 * f);
      }
    }
  }
  // O_intra = scale M U (U = V without the delta rule).
  intra_chunk_output<Elem, kV>(static_cast<Elem*>(p.o_intra) + row0 * kV, s_m, s_v, p.scale, warp, lane);
}

}  // namespace

template <typename Elem, int kK, int kV, bool kDelta>
cudaError_t launch_linear_chunk_local(const LinearChunkParams& p, cudaStream_t stream) {
  return launch_per_chunk(linear_chunk_local_kernel<Elem, kK, kV, kDelta>, LocalSmem<kK, kV, kDelta>::kTotal, p, stream);
}

#define FASTATTN_LINEAR_LOCAL(E, K, V)                                                           \
  template cudaError_t launch_linear_chunk_local<E, K, V, true>(const LinearChunkParams&,         \
                                                                cudaStream_t);                    \
  template cudaError_t launch_linear_chunk_local<E, K, V, false>(const LinearChunkParams&,        \
                                                                 cudaStream_t);
FASTATTN_LINEAR_CHUNK_TYPES(FASTATTN_LINEAR_LOCAL)
#undef FASTATTN_LINEAR_LOCAL

}  // namespace gpu
}  // namespace fastattn
