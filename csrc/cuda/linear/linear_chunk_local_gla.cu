// Chunk-local kernel of the chunked linear-attention forward with a log decay
// per key channel (GLA: g (B, T, HV, K)), no delta rule. With b (C x K) the
// chunk-local cumulative sums of g per key channel:
//     M_ij = sum_c q_ic k_jc e^{b_ic - b_jc} (j <= i),   O_intra = scale M V,
//     Qt = scale q o e^{b},   Kt = k o e^{b_last - b},   e^{b_last} per channel,
// and the scan (linear_chunk_scan.cu, kPerKey) carries
// S <- diag(e^{b_last}) S + Kt^T V.
//
// M is not one product of e^{b}-scaled Q with e^{-b}-scaled K: e^{-b} overflows
// after a few strongly decaying tokens. Warp w owns rows I = 16w..16w+15 and
// meets each earlier block J < w through the reference row r = 16w:
//     M_IJ = (q_I o e^{b_I - b_r}) (k_J o e^{b_r - b_J})^T,
// both exponents <= 0 since b falls along the rows (g <= 0), as an mma over
// the key channels; the diagonal block's pairs j <= i are summed channel by
// channel, every exponent b_ic - b_jc <= 0.
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
constexpr int C = LinearChunkParams::kChunk;

template <int kK, int kV>
struct GlaSmem {
  using TileK = SmemTile<C, kK>;
  using TileV = SmemTile<C, kV>;
  using TileC = SmemTile<C, C>;
  using TileR = SmemTile<16, kK>;           // one warp's 16 rows, rescaled
  static constexpr int kBStride = kK + 4;   // floats per row of b (rows 4 banks apart)
  static constexpr int kQ = 0;
  static constexpr int kKey = kQ + TileK::kBytes;
  static constexpr int kVal = kKey + TileK::kBytes;
  static constexpr int kM = kVal + TileV::kBytes;
  static constexpr int kB = kM + TileC::kBytes;
  static constexpr int kScratch = kB + C * kBStride * 4;  // per warp: the A and B operands of M_IJ
  static constexpr int kTotal = kScratch + 4 * 2 * TileR::kBytes;
};

// dst (rows of a TileR) = rows r0.. r0 + 15 of src (a TileK) o e^{sign (b_row - b_ref)}
// per channel: sign +1 for the A operand (b_I - b_r), -1 for the B operand (b_r - b_J).
template <typename Elem, typename TileK, typename TileR, int kBStride>
__device__ __forceinline__ void rescale_rows(char* dst, const char* src, int r0, const float* s_b,
                                             const float* b_ref, float sign, int lane) {
  constexpr int kK = TileK::kCols;
  for (int e = lane; e < 16 * kK / 2; e += 32) {
    const int r = e / (kK / 2), c = 2 * (e % (kK / 2));
    float x0, x1;
    load_pair<Elem>(src, TileK::offset(r0 + r, c), x0, x1);
    const float2 br = *reinterpret_cast<const float2*>(s_b + (r0 + r) * kBStride + c);
    const float2 bf = *reinterpret_cast<const float2*>(b_ref + c);
    store_pair<Elem>(dst, TileR::offset(r, c), x0 * __expf(sign * (br.x - bf.x)),
                     x1 * __expf(sign * (br.y - bf.y)));
  }
}

template <typename Elem, int kK, int kV>
__global__ void __launch_bounds__(kThreads)
    linear_chunk_local_gla_kernel(const __grid_constant__ LinearChunkParams p) {
  using L = GlaSmem<kK, kV>;
  using TileK = typename L::TileK;
  using TileV = typename L::TileV;
  using TileC = typename L::TileC;
  using TileR = typename L::TileR;
  constexpr int kBS = L::kBStride;
  extern __shared__ __align__(128) char smem[];
  char* s_q = smem + L::kQ;
  char* s_k = smem + L::kKey;
  char* s_v = smem + L::kVal;
  char* s_m = smem + L::kM;
  float* s_b = reinterpret_cast<float*>(smem + L::kB);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wc = blockIdx.x, hv = blockIdx.y, b = blockIdx.z;  // wc: workspace chunk
  const int h = hv / (p.HV / p.H);
  int t0, seq_end;
  if (!chunk_tokens(p, wc, t0, seq_end)) return;
  const int len = min(C, seq_end - t0);
  const int64_t chunk_index = (static_cast<int64_t>(b) * p.HV + hv) * p.chunks + wc;
  const int64_t row0 = chunk_index * C;  // workspace row

  load_chunk_qkv<Elem, TileK, TileV>(p, b, h, hv, t0, len, s_q, s_k, s_v);

  // b: per channel, the inclusive cumulative sum over the chunk's rows
  // (padding rows add 0); e^{b_last} per channel for the scan.
  {
    const float* g = p.g + b * p.g_stride_b + static_cast<int64_t>(t0) * p.g_stride_t + hv * p.g_stride_h;
    for (int c = tid; c < kK; c += kThreads) {
      float x = 0.f;
#pragma unroll 8
      for (int r = 0; r < C; ++r) {
        if (r < len) x += g[r * p.g_stride_t + c];
        s_b[r * kBS + c] = x;
      }
      p.decay_last[chunk_index * kK + c] = __expf(x);
    }
  }
  ptx::cp_async_wait<0>();
  __syncthreads();

  // Qt = scale q o e^{b}, Kt = k o e^{b_last - b}.
  {
    const float* b_last = s_b + (C - 1) * kBS;
    Elem* qt = static_cast<Elem*>(p.qt) + row0 * kK;
    Elem* kt = static_cast<Elem*>(p.kt) + row0 * kK;
    for (int e = tid; e < C * kK / 2; e += kThreads) {
      const int r = e / (kK / 2), c = 2 * (e % (kK / 2));
      float q0, q1, k0, k1;
      load_pair<Elem>(s_q, TileK::offset(r, c), q0, q1);
      load_pair<Elem>(s_k, TileK::offset(r, c), k0, k1);
      const float2 br = *reinterpret_cast<const float2*>(s_b + r * kBS + c);
      const float2 bl = *reinterpret_cast<const float2*>(b_last + c);
      store_pair_global<Elem>(qt + r * kK + c, p.scale * q0 * __expf(br.x), p.scale * q1 * __expf(br.y));
      store_pair_global<Elem>(kt + r * kK + c, k0 * __expf(bl.x - br.x), k1 * __expf(bl.y - br.y));
    }
  }

  // M, warp by warp: rows I = r0..r0 + 15.
  {
    const int r0 = 16 * warp;
    const float* b_ref = s_b + r0 * kBS;
    char* s_ra = smem + L::kScratch + warp * 2 * TileR::kBytes;
    char* s_rb = s_ra + TileR::kBytes;
    rescale_rows<Elem, TileK, TileR, kBS>(s_ra, s_q, r0, s_b, b_ref, 1.f, lane);
    __syncwarp();
    uint32_t a[kK / 16][4];
    const int a_off = a_lane_offset<TileR>(lane), b_off = b_lane_offset<TileR>(lane);
#pragma unroll
    for (int k0 = 0; k0 < kK; k0 += 16) load_a<TileR>(a[k0 / 16], ptx::smem_u32(s_ra), a_off, 0, k0);
#pragma unroll 1
    for (int J = 0; J < warp; ++J) {
      rescale_rows<Elem, TileK, TileR, kBS>(s_rb, s_k, 16 * J, s_b, b_ref, -1.f, lane);
      __syncwarp();
      float part[2][4] = {};
#pragma unroll
      for (int k0 = 0; k0 < kK; k0 += 16) {
        uint32_t bk[4];
        load_b_pair<TileR>(bk, ptx::smem_u32(s_rb), b_off, 0, k0);
        ptx::mma_m16n8k16<Elem>(part[0], a[k0 / 16], bk[0], bk[1]);
        ptx::mma_m16n8k16<Elem>(part[1], a[k0 / 16], bk[2], bk[3]);
      }
      __syncwarp();  // s_rb is rewritten for the next block
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = acc_row(lane, r0, 2 * half), j = acc_col(lane, 16 * J + 8 * nt, 0);
          store_pair<Elem>(s_m, TileC::offset(i, j), part[nt][2 * half], part[nt][2 * half + 1]);
        }
      }
    }
    // Right of the diagonal block: zero (j > i).
    for (int e = lane; e < 16 * C / 2; e += 32) {
      const int i = e / (C / 2), j = 2 * (e % (C / 2));
      if (j >= r0 + 16) store_pair<Elem>(s_m, TileC::offset(r0 + i, j), 0.f, 0.f);
    }
    // The diagonal block, two columns (j, j + 1) per lane and pass.
#pragma unroll 1
    for (int e = lane; e < 16 * 8; e += 32) {
      const int i = e >> 3, j = 2 * (e & 7);
      float m0 = 0.f, m1 = 0.f;
      if (j <= i) {
        const float* bi = s_b + (r0 + i) * kBS;
        const float* bj0 = s_b + (r0 + j) * kBS;
        const float* bj1 = bj0 + kBS;
        const bool second = j + 1 <= i;
#pragma unroll 4
        for (int c = 0; c < kK; c += 2) {
          float q0, q1, ka0, ka1, kb0, kb1;
          load_pair<Elem>(s_q, TileK::offset(r0 + i, c), q0, q1);
          load_pair<Elem>(s_k, TileK::offset(r0 + j, c), ka0, ka1);
          const float2 fi = *reinterpret_cast<const float2*>(bi + c);
          const float2 f0 = *reinterpret_cast<const float2*>(bj0 + c);
          m0 += q0 * ka0 * __expf(fi.x - f0.x) + q1 * ka1 * __expf(fi.y - f0.y);
          if (second) {
            load_pair<Elem>(s_k, TileK::offset(r0 + j + 1, c), kb0, kb1);
            const float2 f1 = *reinterpret_cast<const float2*>(bj1 + c);
            m1 += q0 * kb0 * __expf(fi.x - f1.x) + q1 * kb1 * __expf(fi.y - f1.y);
          }
        }
      }
      store_pair<Elem>(s_m, TileC::offset(r0 + i, r0 + j), m0, m1);
    }
  }
  __syncthreads();
  intra_chunk_output<Elem, kV>(static_cast<Elem*>(p.o_intra) + row0 * kV, s_m, s_v, p.scale, warp, lane);
}

}  // namespace

template <typename Elem, int kK, int kV>
cudaError_t launch_linear_chunk_local_gla(const LinearChunkParams& p, cudaStream_t stream) {
  return launch_per_chunk(linear_chunk_local_gla_kernel<Elem, kK, kV>, GlaSmem<kK, kV>::kTotal, p, stream);
}

#define FASTATTN_LINEAR_LOCAL_GLA(E, K, V) \
  template cudaError_t launch_linear_chunk_local_gla<E, K, V>(const LinearChunkParams&, cudaStream_t);
FASTATTN_LINEAR_CHUNK_TYPES(FASTATTN_LINEAR_LOCAL_GLA)
#undef FASTATTN_LINEAR_LOCAL_GLA

}  // namespace gpu
}  // namespace fastattn
