// Chunk-local gradients of the chunked linear-attention backward without the
// delta rule (op linear_chunk_bwd_local; the math: csrc/ops.cpp). One CTA of
// 4 warps per (chunk, value head, batch row); warp w owns chunk rows
// 16w..16w+15 of every C-row product (mma.sync m16n8k16, fp32 accumulators):
//   qk = Q K^T, dM = tril(scale dO V^T)   -> Mg = dM o Gamma (shared, input dtype) and
//                                            the row / column sums of G = dM o qk o Gamma
//   dq = scale e o (dO S0^T) + Mg K        (S0 in shared memory in the input dtype)
//   dk = e^{b_last - b} o (V dS1^T) + Mg^T Q  (Mg^T through ldmatrix.trans)
// db gathers its row terms in shared memory: each row's terms are added by
// the one lane (a quad's first) that owns the row in every product, in order,
// so the row sums need no atomics; the column sums of G do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_tiles.h"

namespace fastattn {
namespace gpu {
namespace {

using namespace linear_tiles;
constexpr int C = LinearChunkBwdLocalParams::kChunk;
using TileC = SmemTile<C, C>;

template <int kK, int kV>
struct BwdLocalSmem {
  using TileK = SmemTile<C, kK>;
  using TileV = SmemTile<C, kV>;
  using TileS = SmemTile<kK, kV>;
  static constexpr int kQ = 0;
  static constexpr int kKey = kQ + TileK::kBytes;
  static constexpr int kVal = kKey + TileK::kBytes;
  static constexpr int kDo = kVal + TileV::kBytes;
  static constexpr int kS0 = kDo + TileV::kBytes;     // S0, input dtype
  static constexpr int kDS1 = kS0 + TileS::kBytes;    // dS1, input dtype
  static constexpr int kMg = kDS1 + TileS::kBytes;    // Mg = dM o Gamma, input dtype
  static constexpr int kB = kMg + TileC::kBytes;      // b (C floats)
  static constexpr int kDb = kB + C * 4;              // db's row terms (C floats)
  static constexpr int kCol = kDb + C * 4;            // column sums of G (C floats)
  static constexpr int kRed = kCol + C * 4;           // <S0, dS1> per warp (4), sum of the Kt terms (1)
  static constexpr int kTotal = kRed + 8 * 4;
};

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// acc += A B^T for A a [m][k] row tile (the warp's 16 rows) and B a [n][k]
// tile (TileB::kRows output columns, the same inner size).
template <typename Elem, typename TileA, typename TileB>
__device__ __forceinline__ void rows_times_transposed(float (&acc)[TileB::kRows / 8][4], uint32_t a_tile,
                                                      uint32_t b_tile, int warp, int lane) {
  static_assert(TileA::kCols == TileB::kCols, "inner sizes differ");
  const int a_off = a_lane_offset<TileA>(lane), b_off = b_lane_offset<TileB>(lane);
#pragma unroll
  for (int k0 = 0; k0 < TileA::kCols; k0 += 16) {
    uint32_t a[4];
    load_a<TileA>(a, a_tile, a_off, 16 * warp, k0);
#pragma unroll
    for (int n0 = 0; n0 < TileB::kRows; n0 += 16) {
      uint32_t b[4];
      load_b_pair<TileB>(b, b_tile, b_off, n0, k0);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8], a, b[0], b[1]);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8 + 1], a, b[2], b[3]);
    }
  }
}

// acc += Mg B (kTransA: Mg^T B) for the C x C tile Mg and a [k][n] tile B of C rows.
template <typename Elem, typename TileB, bool kTransA>
__device__ __forceinline__ void chunk_matrix_times(float (&acc)[TileB::kCols / 8][4], uint32_t m_tile,
                                                   uint32_t b_tile, int warp, int lane) {
  const int a_off = kTransA ? a_trans_lane_offset<TileC>(lane) : a_lane_offset<TileC>(lane);
  const int b_off = b_trans_lane_offset<TileB>(lane);
#pragma unroll
  for (int k0 = 0; k0 < C; k0 += 16) {
    uint32_t a[4];
    if constexpr (kTransA) {
      load_a_trans<TileC>(a, m_tile, a_off, 16 * warp, k0);
    } else {
      load_a<TileC>(a, m_tile, a_off, 16 * warp, k0);
    }
#pragma unroll
    for (int n0 = 0; n0 < TileB::kCols; n0 += 16) {
      uint32_t b[4];
      load_b_trans_pair<TileB>(b, b_tile, b_off, k0, n0);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8], a, b[0], b[1]);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8 + 1], a, b[2], b[3]);
    }
  }
}

template <typename Elem, int kK, int kV>
__global__ void __launch_bounds__(kThreads, 1)
    linear_chunk_bwd_local_kernel(const __grid_constant__ LinearChunkBwdLocalParams p) {
  using L = BwdLocalSmem<kK, kV>;
  using TileK = typename L::TileK;
  using TileV = typename L::TileV;
  using TileS = typename L::TileS;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem + L::kQ;
  char* s_k = smem + L::kKey;
  char* s_s0 = smem + L::kS0;
  char* s_ds1 = smem + L::kDS1;
  char* s_mg = smem + L::kMg;
  float* s_b = reinterpret_cast<float*>(smem + L::kB);
  float* s_db = reinterpret_cast<float*>(smem + L::kDb);
  float* s_col = reinterpret_cast<float*>(smem + L::kCol);
  float* s_red = reinterpret_cast<float*>(smem + L::kRed);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t chunk = (static_cast<int64_t>(blockIdx.z) * p.HV + blockIdx.y) * p.chunks + blockIdx.x;
  const int64_t row0 = chunk * C;
  const uint32_t q_tile = ptx::smem_u32(s_q), k_tile = ptx::smem_u32(s_k);
  const uint32_t v_tile = ptx::smem_u32(smem + L::kVal), do_tile = ptx::smem_u32(smem + L::kDo);
  const uint32_t mg_tile = ptx::smem_u32(s_mg);

  load_rows_async<TileK>(q_tile, static_cast<const Elem*>(p.q) + row0 * kK, kK, C);
  load_rows_async<TileK>(k_tile, static_cast<const Elem*>(p.k) + row0 * kK, kK, C);
  load_rows_async<TileV>(v_tile, static_cast<const Elem*>(p.v) + row0 * kV, kV, C);
  load_rows_async<TileV>(do_tile, static_cast<const Elem*>(p.dout) + row0 * kV, kV, C);
  ptx::cp_async_commit();
  if (tid < C) {
    s_b[tid] = p.b[row0 + tid];
    s_db[tid] = 0.f;
    s_col[tid] = 0.f;
  }
  if (tid == 0) s_red[4] = 0.f;
  {  // S0, dS1 -> shared in the input dtype; <S0, dS1> from the fp32 values.
    const float* s0 = p.states + chunk * kK * kV;
    const float* ds1 = p.dstates + chunk * kK * kV;
    float dot = 0.f;
    for (int e = tid; e < kK * kV / 2; e += kThreads) {
      const int r = e / (kV / 2), col = 2 * (e % (kV / 2));
      const float2 x = *reinterpret_cast<const float2*>(s0 + r * kV + col);
      const float2 y = *reinterpret_cast<const float2*>(ds1 + r * kV + col);
      store_pair<Elem>(s_s0, TileS::offset(r, col), x.x, x.y);
      store_pair<Elem>(s_ds1, TileS::offset(r, col), y.x, y.y);
      dot += x.x * y.x + x.y * y.y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) s_red[warp] = dot;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  const float b_last = s_b[C - 1];
  const int my_row = 16 * warp + (lane >> 2);  // this quad's rows: my_row, my_row + 8
  const bool row_owner = (lane & 3) == 0;

  {  // Mg = tril(scale dO V^T) o Gamma; row and column sums of G = Mg o (Q K^T).
    float qk[C / 8][4], dm[C / 8][4];
    zero(qk);
    zero(dm);
    rows_times_transposed<Elem, TileK, TileK>(qk, q_tile, k_tile, warp, lane);
    rows_times_transposed<Elem, TileV, TileV>(dm, do_tile, v_tile, warp, lane);
    float row_g[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < C / 8; ++n) {
      float mg[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = acc_row(lane, 16 * warp, e), j = acc_col(lane, 8 * n, e);
        // Gamma only where j <= i: the exponent is then <= 0 for decays <= 0.
        mg[e] = j <= i ? p.scale * dm[n][e] * __expf(s_b[i] - s_b[j]) : 0.f;
        const float g = mg[e] * qk[n][e];
        row_g[e >> 1] += g;
        if (j <= i) atomicAdd(&s_col[j], g);
      }
      const int j0 = acc_col(lane, 8 * n, 0);
      store_pair<Elem>(s_mg, TileC::offset(my_row, j0), mg[0], mg[1]);
      store_pair<Elem>(s_mg, TileC::offset(my_row + 8, j0), mg[2], mg[3]);
    }
    row_g[0] = quad_sum(row_g[0]);
    row_g[1] = quad_sum(row_g[1]);
    if (row_owner) {
      s_db[my_row] += row_g[0];
      s_db[my_row + 8] += row_g[1];
    }
  }
  __syncthreads();  // Mg and the column sums complete

  {  // dq = scale e o (dO S0^T) + Mg K; db += scale e o rowsum(q o dO S0^T).
    float acc[kK / 8][4];
    zero(acc);
    rows_times_transposed<Elem, TileV, TileS>(acc, do_tile, ptx::smem_u32(s_s0), warp, lane);
    float de[2] = {0.f, 0.f};
    const float f[2] = {p.scale * __expf(s_b[my_row]), p.scale * __expf(s_b[my_row + 8])};
#pragma unroll
    for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float q0, q1;
        load_pair<Elem>(s_q, TileK::offset(my_row + 8 * half, acc_col(lane, 8 * n, 0)), q0, q1);
        de[half] += q0 * acc[n][2 * half] + q1 * acc[n][2 * half + 1];
        acc[n][2 * half] *= f[half];
        acc[n][2 * half + 1] *= f[half];
      }
    }
    de[0] = quad_sum(de[0]);
    de[1] = quad_sum(de[1]);
    if (row_owner) {
      s_db[my_row] += f[0] * de[0];
      s_db[my_row + 8] += f[1] * de[1];
    }
    chunk_matrix_times<Elem, TileK, false>(acc, mg_tile, k_tile, warp, lane);
    float* dq = p.dq + row0 * kK;
#pragma unroll
    for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        *reinterpret_cast<float2*>(dq + (my_row + 8 * half) * kK + acc_col(lane, 8 * n, 0)) =
            make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
      }
    }
  }

  {  // dk = e^{b_last - b} o (V dS1^T) + Mg^T Q; db -= rowsum(Kt o V dS1^T).
    float acc[kK / 8][4];
    zero(acc);
    rows_times_transposed<Elem, TileV, TileS>(acc, v_tile, ptx::smem_u32(s_ds1), warp, lane);
    float skt[2] = {0.f, 0.f};
    const float f[2] = {__expf(b_last - s_b[my_row]), __expf(b_last - s_b[my_row + 8])};
#pragma unroll
    for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float k0, k1;
        load_pair<Elem>(s_k, TileK::offset(my_row + 8 * half, acc_col(lane, 8 * n, 0)), k0, k1);
        skt[half] += k0 * acc[n][2 * half] + k1 * acc[n][2 * half + 1];
        acc[n][2 * half] *= f[half];
        acc[n][2 * half + 1] *= f[half];
      }
    }
    skt[0] = f[0] * quad_sum(skt[0]);
    skt[1] = f[1] * quad_sum(skt[1]);
    if (row_owner) {
      s_db[my_row] -= skt[0];
      s_db[my_row + 8] -= skt[1];
      atomicAdd(&s_red[4], skt[0] + skt[1]);
    }
    chunk_matrix_times<Elem, TileK, true>(acc, mg_tile, q_tile, warp, lane);
    float* dk = p.dk + row0 * kK;
#pragma unroll
    for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        *reinterpret_cast<float2*>(dk + (my_row + 8 * half) * kK + acc_col(lane, 8 * n, 0)) =
            make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
      }
    }
  }
  __syncthreads();
  if (tid < C) {
    float db = s_db[tid] - s_col[tid];
    // b_last moves every Kt row and the carried state: d/db_last of Kt^T V and of e^{b_last} S0.
    if (tid == C - 1) db += s_red[4] + (s_red[0] + s_red[1] + s_red[2] + s_red[3]) * __expf(b_last);
    p.db[row0 + tid] = db;
  }
}

template <typename Elem, int kK, int kV>
cudaError_t launch(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  using L = BwdLocalSmem<kK, kV>;
  auto kernel = linear_chunk_bwd_local_kernel<Elem, kK, kV>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.HV), static_cast<unsigned>(p.B));
  kernel<<<grid, kThreads, L::kTotal, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t run_elem(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  if (p.K == 64) return p.V == 64 ? launch<Elem, 64, 64>(p, stream) : launch<Elem, 64, 128>(p, stream);
  return p.V == 64 ? launch<Elem, 128, 64>(p, stream) : launch<Elem, 128, 128>(p, stream);
}

}  // namespace

cudaError_t run_linear_chunk_bwd_local(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  if (!linear_chunk_supported(p.K, p.V) || p.HV > 65535 || p.B > 65535 || p.chunks < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.B == 0 || p.HV == 0 || p.chunks == 0) return cudaSuccess;
  return p.dtype == ElemType::kFloat16 ? run_elem<__half>(p, stream) : run_elem<__nv_bfloat16>(p, stream);
}

}  // namespace gpu
}  // namespace fastattn
