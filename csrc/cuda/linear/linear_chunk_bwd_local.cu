// Chunk-local gradients of the chunked linear-attention backward (op
// linear_chunk_bwd_local; the math: csrc/ops.cpp). One CTA of 4 warps per
// (chunk, value head, batch row); warp w owns chunk rows 16w..16w+15 of every
// C-row product (mma.sync m16n8k16, fp32 accumulators). U is u (the forward's
// updates) with the delta rule, else V:
//   Mg = tril(scale dO U^T) o Gamma       (shared, input dtype)
//   dq = scale e o (dO S0^T) + Mg K        (S0, then dS1, in shared memory in the input dtype)
//   dk = e^{b_last - b} o (U dS1^T) + Mg^T Q  (Mg^T through ldmatrix.trans)
// and with the delta rule, T = (I + A)^{-1} recomputed (linear_ut_inverse.h):
//   dW = -du S0^T;  dT = du (beta V)^T + dW (beta e K)^T;  dV = beta o T^T du;
//   dK += beta e o T^T dW;  dA = -T^T dT T^T (strictly lower);  dK += (X + X^T) K
//   with X = beta o dA o Gamma; dbeta's row terms from row dots.
// db needs the row and column sums of G = Mg o (Q K^T) (+ X o (K K^T)); they
// are row dots of the products above: rowsum_i(Mg o Q K^T) = q_i . (Mg K)_i
// and colsum_j = k_j . (Mg^T Q)_j (likewise with X and K), so with the e^b
// and e^{b_last - b} terms  db_i = q_i . dq_i - k_i . (dk_i before the delta
// rule's terms) + the delta rule's terms (+ the last row's): no C x C sums.
// dk is accumulated in global memory by the one thread that owns each element
// in every product (the same fragment layout each time); db / dbeta gather
// their row terms in shared memory, each row's terms added by the one lane (a
// quad's first) that owns the row in every product, in order. No atomics: the
// results are deterministic.
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
constexpr int C = LinearChunkBwdLocalParams::kChunk;
using TileC = SmemTile<C, C>;
using linear_ut::invert_unit_lower;
using linear_ut::kFStride;

template <int kK, int kV, bool kDelta>
struct BwdLocalSmem {
  using TileK = SmemTile<C, kK>;
  using TileV = SmemTile<C, kV>;
  using TileS = SmemTile<kK, kV>;
  static constexpr int kFloatsC = C * kFStride * 4;  // fp32 C x C
  static constexpr int kQ = 0;
  static constexpr int kKey = kQ + TileK::kBytes;
  static constexpr int kU = kKey + TileK::kBytes;     // u (delta rule) or v
  static constexpr int kDo = kU + TileV::kBytes;
  static constexpr int kS = kDo + TileV::kBytes;      // S0, then dS1, input dtype
  static constexpr int kMg = kS + TileS::kBytes;      // Mg = dM o Gamma; delta rule: later X
  // Delta rule only:
  static constexpr int kVal = kMg + TileC::kBytes;                 // v
  static constexpr int kDu = kVal + (kDelta ? TileV::kBytes : 0);  // du
  static constexpr int kW = kDu + (kDelta ? TileV::kBytes : 0);    // dW
  static constexpr int kT = kW + (kDelta ? TileK::kBytes : 0);     // T, input dtype
  static constexpr int kDt = kT + (kDelta ? TileC::kBytes : 0);    // dT, input dtype
  static constexpr int kA = kDt + (kDelta ? TileC::kBytes : 0);    // A fp32; after the inverse: dT T^T
  static constexpr int kTf = kA + (kDelta ? kFloatsC : 0);         // T fp32
  static constexpr int kB = kTf + (kDelta ? kFloatsC : 0);         // b (C floats)
  static constexpr int kBeta = kB + C * 4;                         // beta (delta rule)
  static constexpr int kOnes = kBeta + C * 4;                      // ones (delta rule)
  static constexpr int kDb = kOnes + C * 4;                        // db's row terms
  static constexpr int kDbeta = kDb + C * 4;                       // dbeta's row terms
  static constexpr int kSkt = kDbeta + C * 4;                      // rowsum(Kt o U dS1^T) per row
  static constexpr int kRed = kSkt + C * 4;                        // <S0, dS1> per warp (4)
  static constexpr int kTotal = kRed + 4 * 4;
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

// Helpers of the kernel below: the terms a row's owner lane adds into a
// shared row array, and the fragment loops over the warp's rows of a
// 16 x (8 kN) accumulator.
__device__ __forceinline__ void add_row_terms(float* rows, int my_row, bool owner, float r0, float r1) {
  if (owner) {
    rows[my_row] += r0;
    rows[my_row + 8] += r1;
  }
}

// dst[row, col] (+)= acc for the warp's 16 rows of a row-major fp32 matrix with
// `cols` columns (accumulate: read-modify-write by the element's owner thread).
template <int kN, bool kAccumulate>
__device__ __forceinline__ void rows_to_global(float* dst, int cols, const float (&acc)[kN][4], int my_row,
                                               int lane) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float2* p = reinterpret_cast<float2*>(dst + (my_row + 8 * half) * cols + acc_col(lane, 8 * n, 0));
      float2 x = make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
      if (kAccumulate) {
        const float2 y = *p;
        x.x += y.x;
        x.y += y.y;
      }
      *p = x;
    }
  }
}

// Fragment n8 tile `n` of the warp's 16 rows (x[0..1]: row my_row, x[2..3]: my_row + 8) into a shared tile.
template <typename Elem, typename Tile>
__device__ __forceinline__ void fragment_to_shared(char* tile, int n, const float (&x)[4], int my_row, int lane) {
  const int j0 = acc_col(lane, 8 * n, 0);
  store_pair<Elem>(tile, Tile::offset(my_row, j0), x[0], x[1]);
  store_pair<Elem>(tile, Tile::offset(my_row + 8, j0), x[2], x[3]);
}

// dots[h]: the dot of accumulator row my_row + 8 h with the same row of a shared tile,
// reduced over the row's quad (every lane of the quad gets it).
template <typename Elem, typename Tile, int kN>
__device__ __forceinline__ void row_dots(float (&dots)[2], const float (&acc)[kN][4], const char* tile,
                                         int my_row, int lane) {
  dots[0] = dots[1] = 0.f;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float x0, x1;
      load_pair<Elem>(tile, Tile::offset(my_row + 8 * half, acc_col(lane, 8 * n, 0)), x0, x1);
      dots[half] += x0 * acc[n][2 * half] + x1 * acc[n][2 * half + 1];
    }
  }
  dots[0] = quad_sum(dots[0]);
  dots[1] = quad_sum(dots[1]);
}

// acc's rows my_row + 8 h scaled by f[h].
template <int kN>
__device__ __forceinline__ void scale_rows(float (&acc)[kN][4], const float (&f)[2]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    acc[n][0] *= f[0];
    acc[n][1] *= f[0];
    acc[n][2] *= f[1];
    acc[n][3] *= f[1];
  }
}

// fp32 (K x V) global -> the shared S tile in the input dtype.
template <typename Elem, typename TileS>
__device__ __forceinline__ void state_to_shared(char* tile, const float* src, int tid) {
  constexpr int kHalfV = TileS::kCols / 2;
  for (int e = tid; e < TileS::kRows * kHalfV; e += kThreads) {
    const int r = e / kHalfV, col = 2 * (e % kHalfV);
    const float2 x = *reinterpret_cast<const float2*>(src + r * TileS::kCols + col);
    store_pair<Elem>(tile, TileS::offset(r, col), x.x, x.y);
  }
}

template <typename Elem, int kK, int kV, bool kDelta>
__global__ void __launch_bounds__(kThreads, 1)
    linear_chunk_bwd_local_kernel(const __grid_constant__ LinearChunkBwdLocalParams p) {
  using L = BwdLocalSmem<kK, kV, kDelta>;
  using TileK = typename L::TileK;
  using TileV = typename L::TileV;
  using TileS = typename L::TileS;
  constexpr int kNK = kK / 8, kNV = kV / 8, kNC = C / 8;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem + L::kQ;
  char* s_k = smem + L::kKey;
  char* s_mg = smem + L::kMg;
  float* s_b = reinterpret_cast<float*>(smem + L::kB);
  float* s_beta = reinterpret_cast<float*>(smem + L::kBeta);
  float* s_db = reinterpret_cast<float*>(smem + L::kDb);
  float* s_dbeta = reinterpret_cast<float*>(smem + L::kDbeta);
  float* s_skt = reinterpret_cast<float*>(smem + L::kSkt);
  float* s_red = reinterpret_cast<float*>(smem + L::kRed);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t chunk = (static_cast<int64_t>(blockIdx.z) * p.HV + blockIdx.y) * p.chunks + blockIdx.x;
  const int64_t row0 = chunk * C;
  const uint32_t q_tile = ptx::smem_u32(s_q), k_tile = ptx::smem_u32(s_k);
  const uint32_t u_tile = ptx::smem_u32(smem + L::kU), do_tile = ptx::smem_u32(smem + L::kDo);
  const uint32_t s_tile = ptx::smem_u32(smem + L::kS), mg_tile = ptx::smem_u32(s_mg);
  const float* s0 = p.states + chunk * kK * kV;
  const float* ds1 = p.dstates + chunk * kK * kV;

  load_rows_async<TileK>(q_tile, static_cast<const Elem*>(p.q) + row0 * kK, kK, C);
  load_rows_async<TileK>(k_tile, static_cast<const Elem*>(p.k) + row0 * kK, kK, C);
  load_rows_async<TileV>(u_tile, static_cast<const Elem*>(kDelta ? p.u : p.v) + row0 * kV, kV, C);
  load_rows_async<TileV>(do_tile, static_cast<const Elem*>(p.dout) + row0 * kV, kV, C);
  if constexpr (kDelta) {
    load_rows_async<TileV>(ptx::smem_u32(smem + L::kVal), static_cast<const Elem*>(p.v) + row0 * kV, kV, C);
    load_rows_async<TileV>(ptx::smem_u32(smem + L::kDu), static_cast<const Elem*>(p.du) + row0 * kV, kV, C);
  }
  ptx::cp_async_commit();
  if (tid < C) {
    s_b[tid] = p.b[row0 + tid];
    s_db[tid] = s_dbeta[tid] = 0.f;
    if constexpr (kDelta) {
      s_beta[tid] = p.beta[row0 + tid];
      reinterpret_cast<float*>(smem + L::kOnes)[tid] = 1.f;
    }
  }
  state_to_shared<Elem, TileS>(smem + L::kS, s0, tid);
  {  // <S0, dS1> from the fp32 values.
    float dot = 0.f;
    for (int e = tid; e < kK * kV; e += kThreads) dot += s0[e] * ds1[e];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) s_red[warp] = dot;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  const float b_last = s_b[C - 1];
  const int my_row = 16 * warp + (lane >> 2);  // this quad's rows: my_row, my_row + 8
  const bool row_owner = (lane & 3) == 0;
  const float e_row[2] = {__expf(s_b[my_row]), __expf(s_b[my_row + 8])};

  {  // Mg = tril(scale dO U^T) o Gamma.
    float dm[kNC][4];
    zero(dm);
    rows_times_transposed<Elem, TileV, TileV>(dm, do_tile, u_tile, warp, lane);
#pragma unroll
    for (int n = 0; n < kNC; ++n) {
      float mg[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = acc_row(lane, 16 * warp, e), j = acc_col(lane, 8 * n, e);
        // Gamma only where j <= i: the exponent is then <= 0 for decays <= 0.
        mg[e] = j <= i ? p.scale * dm[n][e] * __expf(s_b[i] - s_b[j]) : 0.f;
      }
      fragment_to_shared<Elem, TileC>(s_mg, n, mg, my_row, lane);
    }
  }
  if constexpr (kDelta) {  // A = diag(beta) (K K^T o Gamma), strictly lower, fp32.
    float kk[kNC][4];
    zero(kk);
    rows_times_transposed<Elem, TileK, TileK>(kk, k_tile, k_tile, warp, lane);
    float* s_a = reinterpret_cast<float*>(smem + L::kA);
#pragma unroll
    for (int n = 0; n < kNC; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = acc_row(lane, 16 * warp, e), j = acc_col(lane, 8 * n, e);
        s_a[i * kFStride + j] = j < i ? s_beta[i] * kk[n][e] * __expf(s_b[i] - s_b[j]) : 0.f;
      }
    }
  }
  __syncthreads();  // Mg, the column sums and A complete
  if constexpr (kDelta) {  // T, fp32 and in the input dtype (unit column scales)
    invert_unit_lower<Elem>(reinterpret_cast<const float*>(smem + L::kA), reinterpret_cast<float*>(smem + L::kTf),
                            reinterpret_cast<const float*>(smem + L::kOnes), smem + L::kT, warp, lane);
  }

  {  // dq = scale e o (dO S0^T) + Mg K; db += q . dq.
    float acc[kNK][4];
    zero(acc);
    rows_times_transposed<Elem, TileV, TileS>(acc, do_tile, s_tile, warp, lane);
    const float f[2] = {p.scale * e_row[0], p.scale * e_row[1]};
    scale_rows(acc, f);
    chunk_matrix_times<Elem, TileK, false>(acc, mg_tile, k_tile, warp, lane);
    float dots[2];  // q . dq = the e^b term of db plus rowsum(Mg o Q K^T)
    row_dots<Elem, TileK>(dots, acc, s_q, my_row, lane);
    add_row_terms(s_db, my_row, row_owner, dots[0], dots[1]);
    rows_to_global<kNK, false>(p.dq + row0 * kK, kK, acc, my_row, lane);
  }
  if constexpr (kDelta) {  // dW = -du S0^T, to shared memory (input dtype).
    float acc[kNK][4];
    zero(acc);
    rows_times_transposed<Elem, TileV, TileS>(acc, ptx::smem_u32(smem + L::kDu), s_tile, warp, lane);
#pragma unroll
    for (int n = 0; n < kNK; ++n) {
      const float neg[4] = {-acc[n][0], -acc[n][1], -acc[n][2], -acc[n][3]};
      fragment_to_shared<Elem, TileK>(smem + L::kW, n, neg, my_row, lane);
    }
  }
  __syncthreads();  // S0 read by every warp; dW complete
  state_to_shared<Elem, TileS>(smem + L::kS, ds1, tid);
  __syncthreads();

  {  // dk = e^{b_last - b} o (U dS1^T) + Mg^T Q; db -= k . dk (the Kt terms and colsum(G)).
    float acc[kNK][4];
    zero(acc);
    rows_times_transposed<Elem, TileV, TileS>(acc, u_tile, s_tile, warp, lane);
    const float f[2] = {__expf(b_last - s_b[my_row]), __expf(b_last - s_b[my_row + 8])};
    scale_rows(acc, f);
    float skt[2];
    row_dots<Elem, TileK>(skt, acc, s_k, my_row, lane);
    chunk_matrix_times<Elem, TileK, true>(acc, mg_tile, q_tile, warp, lane);
    float dots[2];
    row_dots<Elem, TileK>(dots, acc, s_k, my_row, lane);
    if (row_owner) {
      s_db[my_row] -= dots[0];
      s_db[my_row + 8] -= dots[1];
      s_skt[my_row] = skt[0];
      s_skt[my_row + 8] = skt[1];
    }
    rows_to_global<kNK, false>(p.dk + row0 * kK, kK, acc, my_row, lane);
  }

  if constexpr (kDelta) {
    const uint32_t t_tile = ptx::smem_u32(smem + L::kT), dt_tile = ptx::smem_u32(smem + L::kDt);
    const uint32_t val_tile = ptx::smem_u32(smem + L::kVal), du_tile = ptx::smem_u32(smem + L::kDu);
    const uint32_t w_tile = ptx::smem_u32(smem + L::kW);
    const float beta_row[2] = {s_beta[my_row], s_beta[my_row + 8]};
    {  // dT = du (beta V)^T + dW (beta e K)^T: column j scaled by beta_j (and e_j).
      float dv_[kNC][4], dw_[kNC][4];
      zero(dv_);
      zero(dw_);
      rows_times_transposed<Elem, TileV, TileV>(dv_, du_tile, val_tile, warp, lane);
      rows_times_transposed<Elem, TileK, TileK>(dw_, w_tile, k_tile, warp, lane);
#pragma unroll
      for (int n = 0; n < kNC; ++n) {
        float t[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = acc_col(lane, 8 * n, e);
          t[e] = s_beta[j] * (dv_[n][e] + __expf(s_b[j]) * dw_[n][e]);
        }
        fragment_to_shared<Elem, TileC>(smem + L::kDt, n, t, my_row, lane);
      }
    }
    {  // dV = beta o T^T du; dbeta += rowsum(V o T^T du).
      float acc[kNV][4];
      zero(acc);
      chunk_matrix_times<Elem, TileV, true>(acc, t_tile, du_tile, warp, lane);
      float r[2];
      row_dots<Elem, TileV>(r, acc, smem + L::kVal, my_row, lane);
      scale_rows(acc, beta_row);
      add_row_terms(s_dbeta, my_row, row_owner, r[0], r[1]);
      rows_to_global<kNV, false>(p.dv + row0 * kV, kV, acc, my_row, lane);
    }
    {  // dK += beta e o T^T dW; with r = rowsum(K o T^T dW): db += beta e r, dbeta += e r.
      float acc[kNK][4];
      zero(acc);
      chunk_matrix_times<Elem, TileK, true>(acc, t_tile, w_tile, warp, lane);
      float r[2];
      const float f[2] = {beta_row[0] * e_row[0], beta_row[1] * e_row[1]};
      row_dots<Elem, TileK>(r, acc, s_k, my_row, lane);
      scale_rows(acc, f);
      r[0] *= e_row[0];
      r[1] *= e_row[1];
      if (row_owner) {
        s_dbeta[my_row] += r[0];
        s_dbeta[my_row + 8] += r[1];
        s_db[my_row] += beta_row[0] * r[0];
        s_db[my_row + 8] += beta_row[1] * r[1];
      }
      rows_to_global<kNK, true>(p.dk + row0 * kK, kK, acc, my_row, lane);
    }
    __syncthreads();  // dT complete
    char* s_y = smem + L::kA;  // A's space, free since the inverse: Y = dT T^T (input dtype)
    {
      float acc[kNC][4];
      zero(acc);
      rows_times_transposed<Elem, TileC, TileC>(acc, dt_tile, t_tile, warp, lane);
#pragma unroll
      for (int n = 0; n < kNC; ++n) fragment_to_shared<Elem, TileC>(s_y, n, acc[n], my_row, lane);
    }
    __syncthreads();  // Y complete; Mg no longer read (X takes its place)
    {  // dA = -T^T Y (strictly lower); X = beta o dA o Gamma; dbeta += rowsum(dA o K K^T o Gamma).
      float da[kNC][4], kk[kNC][4];
      zero(da);
      zero(kk);
      chunk_matrix_times<Elem, TileC, true>(da, t_tile, ptx::smem_u32(s_y), warp, lane);
      rows_times_transposed<Elem, TileK, TileK>(kk, k_tile, k_tile, warp, lane);
      float row_b[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < kNC; ++n) {
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = acc_row(lane, 16 * warp, e), j = acc_col(lane, 8 * n, e);
          const float gam = j < i ? __expf(s_b[i] - s_b[j]) : 0.f;
          const float dag = j < i ? -da[n][e] * gam : 0.f;
          row_b[e >> 1] += dag * kk[n][e];
          x[e] = beta_row[e >> 1] * dag;
        }
        fragment_to_shared<Elem, TileC>(s_mg, n, x, my_row, lane);
      }
      add_row_terms(s_dbeta, my_row, row_owner, quad_sum(row_b[0]), quad_sum(row_b[1]));
    }
    __syncthreads();  // X complete
    {  // dK += (X + X^T) K; db += rowsum(X o K K^T) - colsum(X o K K^T) = k . X K - k . X^T K.
      float acc[kNK][4];
      zero(acc);
      chunk_matrix_times<Elem, TileK, false>(acc, mg_tile, k_tile, warp, lane);
      float rows_x[2], both[2];
      row_dots<Elem, TileK>(rows_x, acc, s_k, my_row, lane);
      chunk_matrix_times<Elem, TileK, true>(acc, mg_tile, k_tile, warp, lane);
      row_dots<Elem, TileK>(both, acc, s_k, my_row, lane);
      add_row_terms(s_db, my_row, row_owner, 2.f * rows_x[0] - both[0], 2.f * rows_x[1] - both[1]);
      rows_to_global<kNK, true>(p.dk + row0 * kK, kK, acc, my_row, lane);
    }
  }
  __syncthreads();
  if (tid < C) {
    float db = s_db[tid];
    if (tid == C - 1) {
      // b_last moves every Kt row and the carried state: d/db_last of Kt^T U and of e^{b_last} S0.
      float skt_sum = 0.f;
      for (int j = 0; j < C; ++j) skt_sum += s_skt[j];
      db += skt_sum + (s_red[0] + s_red[1] + s_red[2] + s_red[3]) * __expf(b_last);
    }
    p.db[row0 + tid] = db;
    if constexpr (kDelta) p.dbeta[row0 + tid] = s_dbeta[tid];
  }
}

template <typename Elem, int kK, int kV, bool kDelta>
cudaError_t launch(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  using L = BwdLocalSmem<kK, kV, kDelta>;
  auto kernel = linear_chunk_bwd_local_kernel<Elem, kK, kV, kDelta>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.HV), static_cast<unsigned>(p.B));
  kernel<<<grid, kThreads, L::kTotal, stream>>>(p);
  return cudaGetLastError();
}

template <typename Elem, bool kDelta>
cudaError_t run_rule(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  if (p.K == 64) {
    return p.V == 64 ? launch<Elem, 64, 64, kDelta>(p, stream) : launch<Elem, 64, 128, kDelta>(p, stream);
  }
  return p.V == 64 ? launch<Elem, 128, 64, kDelta>(p, stream) : launch<Elem, 128, 128, kDelta>(p, stream);
}

template <typename Elem>
cudaError_t run_elem(const LinearChunkBwdLocalParams& p, cudaStream_t stream) {
  return p.beta != nullptr ? run_rule<Elem, true>(p, stream) : run_rule<Elem, false>(p, stream);
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
