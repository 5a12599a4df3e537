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
// SwizzledTile128 (tiles the sm90 copy engine writes) has its own B-pair loads:
//   load_b_pair_sw128 / load_b_trans_pair_sw128 with sw128_b_lane / sw128_b_trans_lane.
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

// ---------------------------------------------------------------------------
// Tiles written by the sm90 copy engine (TMA) with 128-byte swizzling: the
// columns are split into 64-element (128-byte) boxes stored one after the
// other, each kRows rows of 128 bytes, and 16-byte chunk j of row r lives at
// chunk j ^ (r & 7) (the copy engine's SWIZZLE_128B; each box must start at a
// 1024-byte aligned address). ldmatrix then reads 8 rows x 16 bytes from 8
// different bank groups, as with the padded SmemTile, without the pad.
template <int kRows_, int kCols_>
struct SwizzledTile128 {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kStrideBytes = 128;  // between rows of one box
  static constexpr int kBoxCols = 64;
  static constexpr int kBoxes = kCols / kBoxCols;
  static constexpr int kBoxBytes = kRows * kStrideBytes;
  static constexpr int kBytes = kBoxes * kBoxBytes;
  static_assert(kCols % kBoxCols == 0 && kRows % 8 == 0, "whole boxes of whole swizzle periods");
};

// Per-lane address parts of a B-operand pair load from a swizzled tile: the
// lane's row offset and the value its chunk index is XORed with. For row
// offsets that are multiples of 8 and column offsets that are multiples of 16
// (every fragment load), row & 7 is fixed per lane and the chunk's low bit is
// fixed per lane, so chunk ^ (row & 7) = (col / 8 within the box) ^ lane_xor.
struct SwizzledLane {
  int row_bytes;
  int lane_xor;
};

// Address of the 16-byte row piece this lane hands ldmatrix for the 8x8
// matrices at (row0, col0) (row0 % 8 == 0, col0 % 16 == 0).
template <typename Tile>
__device__ __forceinline__ uint32_t sw128_addr(uint32_t tile_addr, SwizzledLane l, int row0,
                                               int col0) {
  const uint32_t box = (col0 / Tile::kBoxCols) * Tile::kBoxBytes;
  const uint32_t chunk = static_cast<uint32_t>(((col0 % Tile::kBoxCols) / 8) ^ l.lane_xor);
  return tile_addr + box + row0 * Tile::kStrideBytes + l.row_bytes + (chunk << 4);
}

// B for two n8 tiles from a [n][k] swizzled tile (K for Q K^T), as load_b_pair.
__device__ __forceinline__ SwizzledLane sw128_b_lane(int lane) {
  return {((lane & 7) + (lane >> 4) * 8) * 128, ((lane >> 3) & 1) ^ (lane & 7)};
}
template <typename Tile>
__device__ __forceinline__ void load_b_pair_sw128(uint32_t (&b)[4], uint32_t tile_addr,
                                                  SwizzledLane l, int n0, int k0) {
  ptx::ldsm_x4(b, sw128_addr<Tile>(tile_addr, l, n0, k0));
}

// B for two n8 tiles from a [k][n] swizzled tile (V for P V), as load_b_trans_pair.
__device__ __forceinline__ SwizzledLane sw128_b_trans_lane(int lane) {
  return {(lane & 15) * 128, (lane >> 4) ^ (lane & 7)};
}
template <typename Tile>
__device__ __forceinline__ void load_b_trans_pair_sw128(uint32_t (&b)[4], uint32_t tile_addr,
                                                        SwizzledLane l, int k0, int n0) {
  ptx::ldsm_x4_trans(b, sw128_addr<Tile>(tile_addr, l, k0, n0));
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
