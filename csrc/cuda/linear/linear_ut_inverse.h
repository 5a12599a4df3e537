// The UT / WY form's triangular inverse, shared by the chunk-local kernels of
// the chunked linear-attention forward (linear_chunk_local.cu) and backward
// (linear_chunk_bwd_local.cu): T = (I + A)^{-1} for the strictly lower C x C
// A in fp32, blockwise over 16 x 16 blocks. Each warp inverts one unit-lower
// diagonal block by forward substitution in registers (D_i), then the
// off-diagonal blocks follow by block distance d = 1, 2, 3:
// T_ij = -D_i sum_{m=j}^{i-1} A_im T_mj, which only reads blocks of T at
// distance < d. Needs 4 warps (kThreads = 128) and C = 64.
#pragma once
#include <cstdint>

#include "cuda/linear/linear_chunk_params.h"
#include "cuda/linear/linear_chunk_tiles.h"

namespace fastattn {
namespace gpu {
namespace linear_ut {

using namespace linear_tiles;
constexpr int C = LinearChunkParams::kChunk;
constexpr int kFStride = C + 1;  // fp32 C x C scratch rows (odd: column reads spread over banks)

// T = (I + A)^{-1} into tf (both fp32 C x C, row stride kFStride), then
// T diag(beta) rounded into the mma tile t_tile (zeros above the diagonal).
// beta goes into T's columns rather than into the operands (beta V, beta e^b K):
// rounding beta v_j to 16 bits before the product was the largest error term
// of the delta-rule forward in fp16 (about 2x the same-precision recurrence's
// error on some inputs); T diag(beta) rounds no worse than T.
template <typename Elem>
__device__ void invert_unit_lower(const float* a, float* tf, const float* beta, char* t_tile,
                                  int warp, int lane) {
  using TileC = SmemTile<C, C>;
  {  // Diagonal block `warp`: lane owns column jj of D.
    const int jj = lane & 15, base = 16 * warp;
    float x[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      float s = r == jj ? 1.f : 0.f;
#pragma unroll
      for (int m = 0; m < r; ++m) s -= a[(base + r) * kFStride + base + m] * x[m];
      x[r] = s;
    }
    if (lane < 16) {
#pragma unroll
      for (int r = 0; r < 16; ++r) tf[(base + r) * kFStride + base + jj] = x[r];
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int d = 1; d < 4; ++d) {
    const int entries = (4 - d) * 256;
    // P_ij = sum_{m=j}^{i-1} A_im T_mj, stored where T_ij goes.
    for (int e = threadIdx.x; e < entries; e += kThreads) {
      const int i = d + e / 256, j = i - d, r = (e % 256) / 16, c = e % 16;
      float s = 0.f;
      for (int m = j; m < i; ++m) {
#pragma unroll
        for (int x = 0; x < 16; ++x) {
          s += a[(16 * i + r) * kFStride + 16 * m + x] * tf[(16 * m + x) * kFStride + 16 * j + c];
        }
      }
      tf[(16 * i + r) * kFStride + 16 * j + c] = s;
    }
    __syncthreads();
    float out[6];  // (4 - d) * 256 / kThreads <= 6 entries per thread
#pragma unroll
    for (int s = 0; s < 6; ++s) {
      const int e = threadIdx.x + s * kThreads;
      out[s] = 0.f;
      if (e < entries) {
        const int i = d + e / 256, j = i - d, r = (e % 256) / 16, c = e % 16;
        float acc = 0.f;
#pragma unroll
        for (int x = 0; x < 16; ++x) {
          acc += tf[(16 * i + r) * kFStride + 16 * i + x] * tf[(16 * i + x) * kFStride + 16 * j + c];
        }
        out[s] = -acc;
      }
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 6; ++s) {
      const int e = threadIdx.x + s * kThreads;
      if (e < entries) {
        const int i = d + e / 256, j = i - d, r = (e % 256) / 16, c = e % 16;
        tf[(16 * i + r) * kFStride + 16 * j + c] = out[s];
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < C * C / 2; e += kThreads) {
    const int i = e / (C / 2), j = 2 * (e % (C / 2));
    const float lo = (j <= i) ? tf[i * kFStride + j] * beta[j] : 0.f;
    const float hi = (j + 1 <= i) ? tf[i * kFStride + j + 1] * beta[j + 1] : 0.f;
    store_pair<Elem>(t_tile, TileC::offset(i, j), lo, hi);
  }
}

}  // namespace linear_ut
}  // namespace gpu
}  // namespace fastattn
