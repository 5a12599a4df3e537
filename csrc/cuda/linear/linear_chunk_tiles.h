// Tile helpers shared by the chunked linear-attention kernels (forward:
// linear_chunk_params.h; the training path's scans and chunk-local
// gradients): cp.async loads of row tiles into padded shared tiles, the
// coordinates of mma accumulator elements, and the scans' state products.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"
#include "cuda/common/types.h"
#include "cuda/linear/linear_chunk_params.h"

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

// Every element of a register array of m16n8 accumulators set to zero / multiplied by d.
template <int kA, int kB>
__device__ __forceinline__ void acc_zero(float (&acc)[kA][kB][4]) {
#pragma unroll
  for (int i = 0; i < kA; ++i) {
#pragma unroll
    for (int j = 0; j < kB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    }
  }
}
template <int kA, int kB>
__device__ __forceinline__ void acc_scale(float (&acc)[kA][kB][4], float d) {
#pragma unroll
  for (int i = 0; i < kA; ++i) {
#pragma unroll
    for (int j = 0; j < kB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] *= d;
    }
  }
}

// Per-row factors of a state slice (per-key decays): f[mt][0] for the rows of
// elements 0, 1 of m16 tile mt, f[mt][1] for elements 2, 3 (rows as in
// state_from_global); d indexed by key row.
template <int kMT>
__device__ __forceinline__ void acc_row_factors(float (&f)[kMT][2], const float* d, int lane, int warp) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    f[mt][0] = d[acc_row(lane, 16 * (kMT * warp + mt), 0)];
    f[mt][1] = d[acc_row(lane, 16 * (kMT * warp + mt), 2)];
  }
}
template <int kMT, int kN>
__device__ __forceinline__ void acc_scale_rows(float (&S)[kMT][kN][4], const float (&f)[kMT][2]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
      S[mt][nt][0] *= f[mt][0];
      S[mt][nt][1] *= f[mt][0];
      S[mt][nt][2] *= f[mt][1];
      S[mt][nt][3] *= f[mt][1];
    }
  }
}

// The two products of a scan step, for the chunk of C rows and the state
// slice (linear_chunk_scan.cu, linear_chunk_scan_bwd.cu):
// acc[i] += A_i S for kA row tiles A_i (C x kK; warp w: rows 16w..16w+15) and
// the slice S (kK x kVt, input dtype in shared memory); S's fragments are
// loaded once for all kA tiles.
template <typename Elem, typename TileK, typename TileS, int kA, int kN>
__device__ __forceinline__ void rows_times_state(float (&acc)[kA][kN][4], const uint32_t (&a_tiles)[kA],
                                                 uint32_t s_tile, int a_off, int s_off, int warp) {
#pragma unroll
  for (int k0 = 0; k0 < TileK::kCols; k0 += 16) {
    uint32_t a[kA][4];
#pragma unroll
    for (int i = 0; i < kA; ++i) load_a<TileK>(a[i], a_tiles[i], a_off, 16 * warp, k0);
#pragma unroll
    for (int n0 = 0; n0 < TileS::kCols; n0 += 16) {
      uint32_t b[4];
      load_b_trans_pair<TileS>(b, s_tile, s_off, k0, n0);
#pragma unroll
      for (int i = 0; i < kA; ++i) {
        ptx::mma_m16n8k16<Elem>(acc[i][n0 / 8], a[i], b[0], b[1]);
        ptx::mma_m16n8k16<Elem>(acc[i][n0 / 8 + 1], a[i], b[2], b[3]);
      }
    }
  }
}
// S += A^T B for A (C x kK) and B (C x kVt) row tiles in shared memory, S the
// slice in registers (key rows as in state_from_global): A^T through ldmatrix.trans.
template <typename Elem, typename TileK, typename TileVt, int kMT, int kN>
__device__ __forceinline__ void state_add_trans_product(float (&S)[kMT][kN][4], uint32_t a_tile, uint32_t b_tile,
                                                        int a_tr_off, int b_off, int warp) {
#pragma unroll
  for (int k0 = 0; k0 < TileK::kRows; k0 += 16) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) load_a_trans<TileK>(a[mt], a_tile, a_tr_off, 16 * (kMT * warp + mt), k0);
#pragma unroll
    for (int n0 = 0; n0 < TileVt::kCols; n0 += 16) {
      uint32_t b[4];
      load_b_trans_pair<TileVt>(b, b_tile, b_off, k0, n0);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ptx::mma_m16n8k16<Elem>(S[mt][n0 / 8], a[mt], b[0], b[1]);
        ptx::mma_m16n8k16<Elem>(S[mt][n0 / 8 + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// The tokens [t0, seq_end) of workspace chunk wc (chunk-local kernels: one CTA
// per chunk); false for a CTA past the last chunk of a varlen batch (the grid
// is an upper bound there). Varlen bounds are clamped into [0, T], so a bad
// cu_seqlens reads nothing out of range.
__device__ __forceinline__ bool chunk_tokens(const LinearChunkParams& p, int wc, int& t0, int& seq_end) {
  constexpr int C = LinearChunkParams::kChunk;
  if (p.cu_seqlens == nullptr) {
    t0 = wc * C;
    seq_end = p.T;
    return true;
  }
  if (wc >= p.chunk_offsets[p.N]) return false;
  int lo = 0, hi = p.N;  // the last sequence n with chunk_offsets[n] <= wc
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (p.chunk_offsets[mid] <= wc) lo = mid; else hi = mid;
  }
  seq_end = min(max(p.cu_seqlens[lo + 1], 0), p.T);
  t0 = min(max(p.cu_seqlens[lo], 0) + (wc - p.chunk_offsets[lo]) * C, seq_end);
  return true;
}

// Starts the cp.async copies of a chunk's q, k (query / key head h) and v (value
// head hv) rows, tokens [t0, t0 + len) of batch row b, into the padded shared
// tiles at s_q / s_k (TileK) and s_v (TileV); rows >= len are zero-filled. One
// commit group.
template <typename Elem, typename TileK, typename TileV>
__device__ __forceinline__ void load_chunk_qkv(const LinearChunkParams& p, int b, int h, int hv, int t0, int len,
                                               char* s_q, char* s_k, char* s_v) {
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_stride_b + t0 * p.q_stride_t + h * p.q_stride_h;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_stride_b + t0 * p.k_stride_t + h * p.k_stride_h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_stride_b + t0 * p.v_stride_t + hv * p.v_stride_h;
  load_rows_async<TileK>(ptx::smem_u32(s_q), q, p.q_stride_t, len);
  load_rows_async<TileK>(ptx::smem_u32(s_k), k, p.k_stride_t, len);
  load_rows_async<TileV>(ptx::smem_u32(s_v), v, p.v_stride_t, len);
  ptx::cp_async_commit();
}

// acc (16 rows of warp `warp` x kN columns) = a_tile[rows, 0:C] @ b_tile[0:C, 0:kN],
// a_tile C x C, b_tile C x kN, both padded shared tiles (C: the chunk).
template <typename Elem, int kN>
__device__ __forceinline__ void rows_times_tile(float (&acc)[kN / 8][4], uint32_t a_tile, uint32_t b_tile,
                                                int warp, int lane) {
  constexpr int C = LinearChunkParams::kChunk;
  using TileC = SmemTile<C, C>;
  using TileN = SmemTile<C, kN>;
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  const int a_off = a_lane_offset<TileC>(lane), b_off = b_trans_lane_offset<TileN>(lane);
#pragma unroll
  for (int k0 = 0; k0 < C; k0 += 16) {
    uint32_t a[4];
    load_a<TileC>(a, a_tile, a_off, 16 * warp, k0);
#pragma unroll
    for (int n0 = 0; n0 < kN; n0 += 16) {
      uint32_t b[4];
      load_b_trans_pair<TileN>(b, b_tile, b_off, k0, n0);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8], a, b[0], b[1]);
      ptx::mma_m16n8k16<Elem>(acc[n0 / 8 + 1], a, b[2], b[3]);
    }
  }
}

// O_intra = scale M V for warp `warp`'s 16 rows (M: C x C, V: C x kV in shared
// memory) to the workspace rows at oi.
template <typename Elem, int kV>
__device__ __forceinline__ void intra_chunk_output(Elem* oi, const char* s_m, const char* s_v, float scale,
                                                   int warp, int lane) {
  float acc[kV / 8][4];
  rows_times_tile<Elem, kV>(acc, ptx::smem_u32(s_m), ptx::smem_u32(s_v), warp, lane);
#pragma unroll
  for (int n = 0; n < kV / 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = acc_row(lane, 16 * warp, 2 * half), j = acc_col(lane, 8 * n, 0);
      store_pair_global<Elem>(oi + i * kV + j, scale * acc[n][2 * half], scale * acc[n][2 * half + 1]);
    }
  }
}

// Launches a chunk-local kernel (linear_chunk_local.cu, linear_chunk_local_gla.cu):
// one CTA per (workspace chunk, value head, batch row).
template <typename Kernel>
inline cudaError_t launch_per_chunk(Kernel kernel, int smem_bytes, const LinearChunkParams& p,
                                    cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.HV), static_cast<unsigned>(p.B));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_tiles
}  // namespace fastattn
