// Global <-> shared movement of SwizzledTile128 tiles (fragment.h) with
// ordinary threads (cp.async in, 16-byte stores out): for kernels that read
// their tiles with wgmma descriptors but need what the copy engine cannot do
// cheaply, i.e. per-thread zero-fill at any row / column bound and any row
// stride (varlen sequences, padded head dims, strided views).
//
//   SwizzledTileLoader<kThreads, Tile, Elem> ld;
//   ld.init(base, row_stride, col_limit, tid);      // per-thread address and predicates, once
//   ld.load(tile_addr, row0, row_limit);            // rows [row0, row0 + kRows) of the source;
//                                                   // rows >= row_limit, chunks >= col_limit -> 0
//   store_swizzled_tile<kThreads, Tile>(dst, row_stride, tile_addr_generic, row_limit, col_limit, tid)
//   swizzled_offset<Tile>(row, col)                 // byte offset of an element (col even)
//
// Thread map: consecutive threads take consecutive 16-byte chunks of a row
// (coalesced), kThreads / chunks-per-row rows per pass. The pass stride is a
// multiple of 8 rows, so a thread's row & 7, and with it its chunk's swizzled
// position, is the same in every pass: the shared address is one add per pass.
#pragma once
#include <cstdint>

#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"

namespace fastattn {

// Byte offset of element (row, col) of a SwizzledTile128 from the tile start.
template <typename Tile>
__device__ __forceinline__ constexpr int swizzled_offset(int row, int col) {
  return (col / Tile::kBoxCols) * Tile::kBoxBytes + row * Tile::kStrideBytes +
         ((((col % Tile::kBoxCols) / 8) ^ (row & 7)) << 4) + (col % 8) * 2;
}

template <int kThreads, typename Tile>
struct SwizzledCopyMap {
  static constexpr int kChunks = Tile::kCols / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = (Tile::kRows + kRowsPerPass - 1) / kRowsPerPass;
  // The last pass covers rows past the tile (e.g. 384 threads over 128 rows).
  static constexpr bool kRagged = kPasses * kRowsPerPass != Tile::kRows;
  static_assert(kThreads % kChunks == 0 && kRowsPerPass % 8 == 0, "passes keep row & 7");
  static __device__ __forceinline__ bool in_tile(int row) { return !kRagged || row < Tile::kRows; }
};

template <int kThreads, typename Tile, typename Elem>
struct SwizzledTileLoader {
  using Map = SwizzledCopyMap<kThreads, Tile>;
  const Elem* base;         // row 0, column 0 of the source (target of zero-filled copies)
  const Elem* thread_base;  // own first row, own chunk (column 0 if the chunk is padding)
  int64_t row_stride;
  int r0;        // own first row within the tile
  int smem_off;  // swizzled offset of (r0, own chunk)
  bool chunk_ok;

  __device__ __forceinline__ void init(const Elem* src, int64_t rs, int col_limit, int tid) {
    const int chunk = tid % Map::kChunks;
    r0 = tid / Map::kChunks;
    base = src;
    row_stride = rs;
    chunk_ok = chunk * 8 < col_limit;
    thread_base = src + r0 * rs + (chunk_ok ? chunk * 8 : 0);
    smem_off = swizzled_offset<Tile>(r0, chunk * 8);
  }

  __device__ __forceinline__ void load(uint32_t tile_addr, int row0, int row_limit) const {
    const Elem* p = thread_base + row0 * row_stride;
    const int rows_left = row_limit - row0 - r0;
#pragma unroll
    for (int i = 0; i < Map::kPasses; ++i) {
      const int r = i * Map::kRowsPerPass;
      if (!Map::in_tile(r0 + r)) break;
      const bool ok = chunk_ok && r < rows_left;
      ptx::cp_async_16(tile_addr + smem_off + r * Tile::kStrideBytes, ok ? p + r * row_stride : base,
                       ok);
    }
  }
};

// Rows [0, row_limit) and columns [0, col_limit) of the tile at smem to global.
template <int kThreads, typename Tile, typename Elem>
__device__ __forceinline__ void store_swizzled_tile(Elem* dst, int64_t row_stride, const char* smem,
                                                    int row_limit, int col_limit, int tid) {
  using Map = SwizzledCopyMap<kThreads, Tile>;
  const int chunk = tid % Map::kChunks;
  const int r0 = tid / Map::kChunks;
  if (chunk * 8 >= col_limit) return;
  const int off = swizzled_offset<Tile>(r0, chunk * 8);
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const int r = r0 + i * Map::kRowsPerPass;
    if (Map::in_tile(r) && r < row_limit) {
      *reinterpret_cast<uint4*>(dst + r * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + off + i * Map::kRowsPerPass * Tile::kStrideBytes);
    }
  }
}

}  // namespace fastattn
