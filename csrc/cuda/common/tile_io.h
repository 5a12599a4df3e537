// Global <-> shared tile movement and sequence bookkeeping:
//   - seq_bounds(...)                    per-sequence start row and length (dense or varlen),
//                                        clamping untrusted cu_seqlens into [0, total]
//   - row sources, the "KV-block iterator": where row r of one (sequence, head) lives
//       ContiguousRows<Elem>{base, row_stride}       base + r * row_stride
//     Kernels only call src.row(r) for valid rows and src.safe_ptr() for the
//     zero-filled ones (used for Q tiles and one-off loads).
//   - load_tile_async<kThreads, Tile>(tile_addr, src, row0, row_limit, col_limit, tid)
//       cp.async 16-byte copies of rows [row0, row0 + Tile::kRows) into a SmemTile,
//       zero-filling rows >= row_limit and 8-column chunks >= col_limit.
//   - ContiguousTileLoader<kThreads, Tile, Elem>: the same for a contiguous source with the
//     per-thread pointer / predicates computed once (init), so a tile load costs one
//     64-bit add per 16-byte copy: loader.init(base, row_stride, col_limit, tid);
//     loader.load(tile_addr, row0, row_limit).
//   - PagedKvTileLoader<kThreads, Tile, Elem>: the KV-block iterator of a paged
//     cache: the same tile loads with each row's address found through the block
//     table (load_k / load_v / load_kv), so contiguous and paged K/V differ only
//     in the loader type a kernel is instantiated with.
//   - store_tile<kThreads, Tile>(dst, row_stride, smem, row_limit, col_limit, tid)
//       16-byte stores of the tile's valid rows / chunks to global memory.
// Columns are counted in elements of 2-byte types; col_limit must be a multiple
// of 8 (the glue pads head dims that are not).
#pragma once
#include <climits>
#include <cstdint>

#include "cuda/common/fragment.h"
#include "cuda/common/ptx.h"

namespace fastattn {

struct SeqBounds {
  int64_t start;  // first row of the sequence in the (possibly packed) tensor
  int len;        // its length
};

// Dense (cu == nullptr): start = 0, len = dense_len. Varlen: rows
// [cu[b], cu[b+1]) clamped into [0, total] and the length to max_len.
__device__ __forceinline__ SeqBounds seq_bounds(const int* cu, int b, int dense_len, int max_len,
                                                int64_t total) {
  SeqBounds r;
  if (cu == nullptr) {
    r.start = 0;
    r.len = dense_len;
    return r;
  }
  int64_t s = cu[b];
  int64_t e = cu[b + 1];
  s = s < 0 ? 0 : (s > total ? total : s);
  e = e < s ? s : (e > total ? total : e);
  int64_t len = e - s;
  r.start = s;
  r.len = static_cast<int>(len > max_len ? max_len : len);
  return r;
}

template <typename Elem>
struct ContiguousRows {
  const Elem* base;    // row 0 of this (sequence, head)
  int64_t row_stride;  // elements between consecutive rows
  __device__ __forceinline__ const Elem* row(int r) const { return base + r * row_stride; }
  __device__ __forceinline__ const Elem* safe_ptr() const { return base; }
};

constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Thread -> (row, 16-byte chunk) mapping shared by load_tile_async and store_tile:
// a row is covered by kSlots consecutive threads (power of two >= chunks per row),
// kRowsPerPass rows per pass.
template <int kThreads, typename Tile>
struct TileCopyMap {
  static constexpr int kChunks = Tile::kCols / 8;
  static constexpr int kSlots = next_pow2(kChunks) < kThreads ? next_pow2(kChunks) : kThreads;
  static constexpr int kRowsPerPass = kThreads / kSlots;
  static constexpr int kPasses = (Tile::kRows + kRowsPerPass - 1) / kRowsPerPass;
  static constexpr int kChunkPasses = (kChunks + kSlots - 1) / kSlots;
  static_assert(kThreads % kSlots == 0, "threads must cover whole rows");
};

template <int kThreads, typename Tile, typename Src>
__device__ __forceinline__ void load_tile_async(uint32_t tile_addr, const Src& src, int row0,
                                                int row_limit, int col_limit, int tid) {
  using Map = TileCopyMap<kThreads, Tile>;
  const int slot = tid % Map::kSlots;
  const int r0 = tid / Map::kSlots;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const int r = r0 + i * Map::kRowsPerPass;
    if (Map::kPasses * Map::kRowsPerPass > Tile::kRows && r >= Tile::kRows) continue;
    const bool row_ok = row0 + r < row_limit;
#pragma unroll
    for (int j = 0; j < Map::kChunkPasses; ++j) {
      const int c = slot + j * Map::kSlots;
      if (c < Map::kChunks) {
        const bool ok = row_ok && c * 8 < col_limit;
        const auto* g = ok ? src.row(row0 + r) + c * 8 : src.safe_ptr();
        ptx::cp_async_16(tile_addr + Tile::offset(r, c * 8), g, ok);
      }
    }
  }
}

// Contiguous-source tile streamer. Rows >= row_limit and chunks >= col_limit
// are zero-filled. cp.async still translates the address of a zero-filled
// (src-size 0) copy, so those copies are pointed at row 0 / column 0 of the
// source, which exists whenever a tile is loaded at all (row_limit > 0).
template <int kThreads, typename Tile, typename Elem>
struct ContiguousTileLoader {
  using Map = TileCopyMap<kThreads, Tile>;
  static_assert(Map::kChunkPasses == 1, "one 16-byte chunk per thread and row");
  const Elem* base;         // row 0, column 0 of the source
  const Elem* thread_base;  // base + r0 * row_stride + (own chunk valid ? slot * 8 : 0)
  int64_t row_stride;
  int r0;                   // this thread's first row within the tile
  int smem_off;             // Tile::offset(r0, slot * 8)
  bool active;              // slot < chunks per row (threads past the row's end idle)
  bool chunk_ok;            // own chunk is < col_limit (else zero-filled)

  __device__ __forceinline__ void init(const Elem* src, int64_t rs, int col_limit, int tid) {
    const int slot = tid % Map::kSlots;
    r0 = tid / Map::kSlots;
    base = src;
    row_stride = rs;
    active = slot < Map::kChunks;
    chunk_ok = active && slot * 8 < col_limit;
    thread_base = src + r0 * rs + (chunk_ok ? slot * 8 : 0);
    smem_off = Tile::offset(r0, active ? slot * 8 : 0);
  }

  // Rows [row0, row0 + Tile::kRows) of the source into the tile at tile_addr.
  __device__ __forceinline__ void load(uint32_t tile_addr, int row0, int row_limit) const {
    if (Map::kSlots != Map::kChunks && !active) return;
    const Elem* p = thread_base + row0 * row_stride;
    if (row0 + Tile::kRows <= row_limit) {  // whole tile inside the sequence
#pragma unroll
      for (int i = 0; i < Map::kPasses; ++i) {
        const int r = i * Map::kRowsPerPass;  // relative to r0
        if (Map::kPasses * Map::kRowsPerPass > Tile::kRows && r0 + r >= Tile::kRows) continue;
        ptx::cp_async_16(tile_addr + smem_off + r * Tile::kStrideBytes, p + r * row_stride,
                         chunk_ok);
      }
    } else {
      const int rows_left = row_limit - row0 - r0;
#pragma unroll
      for (int i = 0; i < Map::kPasses; ++i) {
        const int r = i * Map::kRowsPerPass;
        if (Map::kPasses * Map::kRowsPerPass > Tile::kRows && r0 + r >= Tile::kRows) continue;
        const bool row_ok = r < rows_left;
        ptx::cp_async_16(tile_addr + smem_off + r * Tile::kStrideBytes,
                         row_ok ? p + r * row_stride : base, row_ok && chunk_ok);
      }
    }
  }
};

// Paged K/V source of one (sequence, KV head): logical key row r lives in
// page block_table[r / page_size] at slot r % page_size of the K and V pools.
// Only the address of a row differs from the contiguous case; the tile shape,
// the thread -> (row, chunk) map and the zero-fill rules are those of
// ContiguousTileLoader, so the kernels' main loops do not change.
//
// Page ids are looked up per thread for the rows it copies and cached in
// registers (K and V share them). The table read is a dependent global load
// in front of the tile's copies: done at copy time it would add a full
// memory round trip to every tile's latency (measured: paged decode at half
// the contiguous speed). So kernels call prefetch(next tile's row0) right
// after issuing a tile: the table loads are in flight while the current tile
// is computed, and the next load_* finds its page ids ready. A load whose
// row0 was not prefetched looks its pages up on the spot (correct, slower).
// Page ids outside [0, num_pages) (bad device data the host cannot check
// without a sync) read as zero rows instead of faulting. The K and V pools
// must share their page / slot strides, each < 2^31 elements (the glue
// guarantees it), so one 32-bit-stride offset per row serves both. The page
// size must be a power of two (the glue's rule; the CPU backend takes any).
template <int kThreads, typename Tile, typename Elem>
struct PagedKvTileLoader {
  // Thread map: each thread copies kCPT = 2 16-byte chunks (kTPR chunks
  // apart) of each of its rows, so a row's address (the costly part) is
  // computed once per two chunks and both tensors: half the address math of
  // one chunk per thread and row, which matters because decode is issue-bound
  // at small batch. (Measured on H200: 4 chunks per thread was slower at every
  // batch size; a warp instruction then covers 8 rows x 64 bytes instead of
  // 4 rows x 128 bytes.)
  static constexpr int kChunks = Tile::kCols / 8;
  static constexpr int kCPT = kChunks >= 2 ? 2 : 1;
  static constexpr int kTPR = next_pow2(kChunks) / kCPT < kThreads ? next_pow2(kChunks) / kCPT
                                                                     : kThreads;
  static constexpr int kRowsPerPass = kThreads / kTPR;
  static constexpr int kPasses = (Tile::kRows + kRowsPerPass - 1) / kRowsPerPass;
  static constexpr bool kRagged = kPasses * kRowsPerPass > Tile::kRows;
  static_assert(kThreads % kTPR == 0, "threads must cover whole rows");
  static_assert(kCPT * kTPR >= kChunks, "every chunk of a row has a thread");
  static_assert((Tile::kRows & (Tile::kRows - 1)) == 0, "power-of-two tile rows");
  const Elem* k_col;  // K pool + head offset + own first chunk column
  const Elem* v_col;
  const int* table;   // this sequence's block table row
  int page_stride;    // elements between pages (K and V pools share strides: the glue's rule)
  int slot_stride;    // elements between slots of a page
  int page_size;      // a power of two (the glue's rule)
  int page_shift;     // log2(page_size)
  int num_pages;
  int r0;             // this thread's first row within the tile
  int smem_off;       // of its first chunk in row r0
  bool chunk_ok[kCPT];    // chunk exists and is < col_limit (else zero-filled)
  bool chunk_live[kCPT];  // chunk exists: with a chunk count that is not a power of two
                          // (head dims 96, 192) the last thread slots map past the
                          // row, and a (zero-filling) copy there would land in the
                          // next row's first chunks
  // Tiles start at multiples of Tile::kRows, so pages of >= Tile::kRows rows
  // hold whole tiles: one table read per tile and contiguous-style addressing.
  // Smaller pages divide the tile, so the page index and slot of this thread's
  // pass i relative to the tile start are fixed for the whole kernel:
  // page_rel[i] = (r0 + i * kRowsPerPass) >> page_shift and
  // slot_off[i] = ((r0 + i * kRowsPerPass) & (page_size - 1)) * slot_stride.
  bool one_page;
  int page_rel[kPasses];
  int slot_off[kPasses];
  int cached_row0;        // tile whose page ids `page` holds (INT_MIN: none)
  int cached_limit;       // its row_limit
  int page[kPasses];      // page id per row this thread copies (-1: zero-fill);
                          // one_page: page[0] for the whole tile

  __device__ __forceinline__ void init(const Elem* k_head, const Elem* v_head, int pstride,
                                       int sstride, const int* block_table_row, int ps,
                                       int pages, int col_limit, int tid) {
    const int slot = tid % kTPR;
    r0 = tid / kTPR;
#pragma unroll
    for (int j = 0; j < kCPT; ++j) {
      const int c = slot + j * kTPR;
      chunk_live[j] = c < kChunks;
      chunk_ok[j] = chunk_live[j] && c * 8 < col_limit;
    }
    k_col = k_head + slot * 8;
    v_col = v_head + slot * 8;
    table = block_table_row;
    page_stride = pstride;
    slot_stride = sstride;
    page_size = ps;
    page_shift = __ffs(ps) - 1;
    one_page = ps >= Tile::kRows;
    num_pages = pages;
    smem_off = Tile::offset(r0, slot * 8);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int rel = r0 + i * kRowsPerPass;
      page_rel[i] = rel >> page_shift;
      slot_off[i] = (rel & (ps - 1)) * sstride;
    }
    cached_row0 = INT_MIN;
    cached_limit = 0;
  }

  // Issues the table reads for the tile at row0 (a multiple of Tile::kRows):
  // independent loads, back to back; nothing waits for them until a copy.
  __device__ __forceinline__ void prefetch(int row0, int row_limit) {
    cached_row0 = row0;
    cached_limit = row_limit;
    const int* t = table + (row0 >> page_shift);
    if (one_page) {  // uniform over the CTA
      page[0] = -1;
      if (row0 < row_limit) page[0] = ptx::ld_global_nc_early(t);
      return;
    }
    const int rows_left = row_limit - row0 - r0;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const bool ok = i * kRowsPerPass < rows_left &&
                      (!kRagged || r0 + i * kRowsPerPass < Tile::kRows);
      page[i] = -1;
      if (ok) page[i] = ptx::ld_global_nc_early(t + page_rel[i]);
    }
  }

  // Copies the cached tile into the K and/or V tiles. Every row's address is
  // computed once and serves both tensors and all of the thread's chunks;
  // zero-filled copies point at the pool (a valid address).
  template <bool kK, bool kV>
  __device__ __forceinline__ void copy(uint32_t k_addr, uint32_t v_addr) const {
    auto issue = [&](int r, bool ok, int64_t off) {
      const int64_t o = ok ? off : 0;
#pragma unroll
      for (int j = 0; j < kCPT; ++j) {
        if (kCPT * kTPR > kChunks && !chunk_live[j]) continue;
        const bool go = ok && chunk_ok[j];
        const int s = smem_off + r * Tile::kStrideBytes + j * kTPR * 16;
        if (kK) ptx::cp_async_16(k_addr + s, k_col + o + j * kTPR * 8, go);
        if (kV) ptx::cp_async_16(v_addr + s, v_col + o + j * kTPR * 8, go);
      }
    };
    if (one_page) {
      const bool page_ok = static_cast<unsigned>(page[0]) < static_cast<unsigned>(num_pages);
      const int rows_left = cached_limit - cached_row0 - r0;
      const int64_t base = static_cast<int64_t>(page[0]) * page_stride +
                           ((cached_row0 & (page_size - 1)) + r0) * slot_stride;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = i * kRowsPerPass;
        if (kRagged && r0 + r >= Tile::kRows) continue;
        issue(r, page_ok && r < rows_left, base + r * slot_stride);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = i * kRowsPerPass;
        if (kRagged && r0 + r >= Tile::kRows) continue;
        const bool ok = static_cast<unsigned>(page[i]) < static_cast<unsigned>(num_pages);
        issue(r, ok, static_cast<int64_t>(page[i]) * page_stride + slot_off[i]);
      }
    }
  }

  // Key rows [row0, row0 + Tile::kRows) into K and/or V tiles; rows >= row_limit
  // zero-filled. row0 is a multiple of Tile::kRows.
  __device__ __forceinline__ void load_k(uint32_t tile_addr, int row0, int row_limit) {
    if (row0 != cached_row0 || row_limit != cached_limit) prefetch(row0, row_limit);
    copy<true, false>(tile_addr, 0);
  }
  __device__ __forceinline__ void load_v(uint32_t tile_addr, int row0, int row_limit) {
    if (row0 != cached_row0 || row_limit != cached_limit) prefetch(row0, row_limit);
    copy<false, true>(0, tile_addr);
  }
  __device__ __forceinline__ void load_kv(uint32_t k_addr, uint32_t v_addr, int row0,
                                          int row_limit) {
    if (row0 != cached_row0 || row_limit != cached_limit) prefetch(row0, row_limit);
    copy<true, true>(k_addr, v_addr);
  }
};

template <int kThreads, typename Tile, typename Elem>
__device__ __forceinline__ void store_tile(Elem* dst, int64_t row_stride, const char* smem_tile,
                                           int row_limit, int col_limit, int tid) {
  using Map = TileCopyMap<kThreads, Tile>;
  const int slot = tid % Map::kSlots;
  const int r0 = tid / Map::kSlots;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const int r = r0 + i * Map::kRowsPerPass;
    if (Map::kPasses * Map::kRowsPerPass > Tile::kRows && r >= Tile::kRows) continue;
    if (r >= row_limit) continue;
#pragma unroll
    for (int j = 0; j < Map::kChunkPasses; ++j) {
      const int c = slot + j * Map::kSlots;
      if (c < Map::kChunks && c * 8 < col_limit) {
        const uint4 v = *reinterpret_cast<const uint4*>(smem_tile + Tile::offset(r, c * 8));
        *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) = v;
      }
    }
  }
}

}  // namespace fastattn
