// Warp-level MMA fragments loaded from shared-memory tiles with ldmatrix.
//
// Shared tiles are row-major with a padded row stride (SmemTile<kRows, kCols>):
// kCols + 8 elements per row, so the 8 rows that one ldmatrix phase reads land
// in 8 different 16-byte bank groups (conflict-free) and every row start stays
// 16-byte aligned for cp.async.
//
// Loaders (all take a per-lane byte offset precomputed once by the matching
// *_lane_offset helper, so the inner loops only add compile-time constants):
//   load_a(a, tile_addr, ...)          A 16x16 from a [m][k] tile           (e.g. Q, P, dS)
//   load_a_trans(a, ...)               A 16x16 from a [k][m] tile           (e.g. dS^T, P^T)
//   load_b_pair(b, ...)                B for two n8 tiles from a [n][k] tile (e.g. K for QK^T)
//   load_b_trans_pair(b, ...)          B for two n8 tiles from a [k][n] tile (e.g. V for PV)
// Each returns uint32_t[4]; for the B pairs, {b[0], b[1]} is n-tile n0 and
// {b[2], b[3]} is n-tile n0 + 8: mma_m16n8k16<Elem>(c, a, b[0], b[1]) / (c, a, b[2], b[3]).
//   c_pair_to_a<Elem>(a, c0, c1)       two fp32 C tiles (16 cols) -> A fragment (P for PV)
#pragma once
#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/common/types.h"

namespace fastattn {

// Row-major shared tile of 2-byte elements with a 16-byte pad per row.
template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kStride = kCols + 8;  // elements
  static constexpr int kStrideBytes = kStride * 2;
  static constexpr int kBytes = kRows * kStrideBytes;
  static_assert(kCols % 8 == 0, "tile columns must be a multiple of 8 (16 bytes)");
  // Byte offset of element (row, col) from the tile start.
  static __device__ __forceinline__ constexpr int offset(int row, int col) {
    return row * kStrideBytes + col * 2;
  }
};

// --- A operand, tile stored [m][k]: matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
template <typename Tile>
__device__ __forceinline__ int a_lane_offset(int lane) {
  return Tile::offset(lane & 15, (lane >> 4) * 8);
}
// A fragment for rows m0..m0+15, k0..k0+15 (m0, k0 compile-time in unrolled loops).
template <typename Tile>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t tile_addr, int lane_off, int m0,
                                       int k0) {
  ptx::ldsm_x4(a, tile_addr + lane_off + Tile::offset(m0, k0));
}

// --- A operand, tile stored [k][m] (the transpose is done by ldmatrix.trans)
template <typename Tile>
__device__ __forceinline__ int a_trans_lane_offset(int lane) {
  return Tile::offset((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
}
template <typename Tile>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], uint32_t tile_addr, int lane_off,
                                             int m0, int k0) {
  ptx::ldsm_x4_trans(a, tile_addr + lane_off + Tile::offset(k0, m0));
}

// --- B operand, tile stored [n][k] (k contiguous = mma "col" B): two n8 tiles
template <typename Tile>
__device__ __forceinline__ int b_lane_offset(int lane) {
  return Tile::offset((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
}
template <typename Tile>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], uint32_t tile_addr, int lane_off,
                                            int n0, int k0) {
  ptx::ldsm_x4(b, tile_addr + lane_off + Tile::offset(n0, k0));
}

// --- B operand, tile stored [k][n] (n contiguous, e.g. V[key][d]): two n8 tiles
template <typename Tile>
__device__ __forceinline__ int b_trans_lane_offset(int lane) {
  return Tile::offset(lane & 15, (lane >> 4) * 8);
}
template <typename Tile>
__device__ __forceinline__ void load_b_trans_pair(uint32_t (&b)[4], uint32_t tile_addr,
                                                  int lane_off, int k0, int n0) {
  ptx::ldsm_x4_trans(b, tile_addr + lane_off + Tile::offset(k0, n0));
}

// Converts fp32 C fragments of two adjacent n8 tiles (16 columns) into the A
// fragment of a following mma whose k runs over those 16 columns (P for PV).
template <typename Elem>
__device__ __forceinline__ void c_pair_to_a(uint32_t (&a)[4], const float (&c0)[4],
                                            const float (&c1)[4]) {
  a[0] = pack2<Elem>(c0[0], c0[1]);
  a[1] = pack2<Elem>(c0[2], c0[3]);
  a[2] = pack2<Elem>(c1[0], c1[1]);
  a[3] = pack2<Elem>(c1[2], c1[3]);
}

}  // namespace fastattn
