// Tile helpers shared by the two kernels of the chunked linear-attention
// forward (linear_chunk_params.h): cp.async loads of row tiles into padded
// shared tiles, and the coordinates of mma accumulator elements.
#pragma once
#include <cstdint>

#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"
#include "cuda/common/types.h"

namespace fastattn {
namespace linear_tiles {

constexpr int kThreads = 128;  // both kernels: 4 warps

// Copies rows [0, Tile::kRows) of a row-major global matrix (row r at
// base + r * row_stride, Tile::kCols contiguous elements) into a padded
// shared tile; rows >= valid_rows are zero-filled without being read.
template <typename Tile, typename Elem>
__device__ __forceinline__ void load_rows_async(uint32_t tile, const Elem* base, int64_t row_stride,
                                                int valid_rows) {
  constexpr int kChunksPerRow = Tile::kCols / 8;
#pragma unroll 4
  for (int i = threadIdx.x; i < Tile::kRows * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    const bool ok = r < valid_rows;
    ptx::cp_async_16(tile + Tile::offset(r, c), ok ? base + r * row_stride + c : base, ok);
  }
}

// Element e (0..3) of an m16n8 accumulator held by `lane`, for the tile at
// (row0, col0): row row0 + lane / 4 (+ 8 for e >= 2), column col0 + 2 (lane % 4) + (e & 1).
__device__ __forceinline__ int acc_row(int lane, int row0, int e) {
  return row0 + (lane >> 2) + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int lane, int col0, int e) {
  return col0 + 2 * (lane & 3) + (e & 1);
}

// Two adjacent elements of a padded shared tile of Elem, as floats.
template <typename Elem>
__device__ __forceinline__ void load_pair(const char* tile, int offset, float& lo, float& hi) {
  unpack2<Elem>(*reinterpret_cast<const uint32_t*>(tile + offset), lo, hi);
}
template <typename Elem>
__device__ __forceinline__ void store_pair(char* tile, int offset, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(tile + offset) = pack2<Elem>(lo, hi);
}
template <typename Elem>
__device__ __forceinline__ void store_pair_global(Elem* p, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(p) = pack2<Elem>(lo, hi);
}

// A scan CTA's state slice (kK x kVt, fp32) lives in registers as mma
// accumulators: S[mt][nt] is the m16n8 tile of key rows 16 kMT warp + 16 mt
// and value columns 8 nt. These move it to / from global memory (element
// (r, c) at r * stride_k + c * stride_v; nullptr source: zeros) and into a
// shared tile of Elem (the B operand of the next products).
template <int kMT, int kN>
__device__ __forceinline__ void state_from_global(float (&S)[kMT][kN][4], const float* src, int64_t stride_k,
                                                  int64_t stride_v, int lane, int warp) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = acc_row(lane, 16 * (kMT * warp + mt), e), c = acc_col(lane, 8 * nt, e);
        S[mt][nt][e] = src != nullptr ? src[r * stride_k + c * stride_v] : 0.f;
      }
    }
  }
}

template <int kMT, int kN>
__device__ __forceinline__ void state_to_global(float* dst, int64_t stride_k, int64_t stride_v,
                                                const float (&S)[kMT][kN][4], int lane, int warp) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dst[acc_row(lane, 16 * (kMT * warp + mt), e) * stride_k + acc_col(lane, 8 * nt, e) * stride_v] =
            S[mt][nt][e];
      }
    }
  }
}

template <typename Elem, typename TileS, int kMT, int kN>
__device__ __forceinline__ void state_to_smem(char* tile, const float (&S)[kMT][kN][4], int lane, int warp) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = acc_row(lane, 16 * (kMT * warp + mt), 2 * half), c = acc_col(lane, 8 * nt, 0);
        store_pair<Elem>(tile, TileS::offset(r, c), S[mt][nt][2 * half], S[mt][nt][2 * half + 1]);
      }
    }
  }
}

}  // namespace linear_tiles
}  // namespace fastattn
