// Attention mask policy (causal / sliding window, top-left or bottom-right
// aligned, plus sequence bounds) and tile-skipping helpers, shared by the
// forward, backward, decode and paged kernels.
//
// Semantics are exactly those of MaskParams in cuda/params.h: query row i
// (0-based within its sequence of lengths sq, sk) sees key j iff 0 <= j < sk and
//     (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr),
// off = bottom_right ? sk - sq : 0. So every row sees a contiguous key range
// [key_begin(i), key_end(i)) (empty when key_begin >= key_end).
//
// API (all __host__ __device__, int math with int64 intermediates):
//   MaskPolicy m = MaskPolicy::make(params.mask, sq, sk);
//   m.key_begin(i), m.key_end(i)                     visible keys of row i, clamped to [0, sk]
//   m.kv_block_begin(r0, r1, bn), m.kv_block_end(r0, r1, bn)
//                                                    KV blocks of size bn that rows [r0, r1) can
//                                                    see; iterate n in [begin, end) (empty if >=)
//   m.q_row_begin(c0, c1), m.q_row_end(c0, c1)       rows that see at least one key of [c0, c1)
//                                                    (backward: which query blocks to visit)
//   m.tile_needs_mask(r0, r1, c0, c1)                false when every (row, key) of the tile with
//                                                    row < sq is visible (skip the element mask)
//   apply_mask_c<MT, NT>(s, m, row0, col0)           sets invisible scores of mma C fragments to -inf
#pragma once
#include <cstdint>

#include "cuda/common/types.h"
#include "cuda/common/params.h"

namespace fastattn {

struct MaskPolicy {
  int sq = 0;
  int sk = 0;
  int off = 0;  // bottom_right ? sk - sq : 0
  int wl = -1;  // < 0: unbounded
  int wr = -1;  // < 0: unbounded

  __host__ __device__ __forceinline__ static MaskPolicy make(const MaskParams& mp, int sq, int sk) {
    MaskPolicy m;
    m.sq = sq;
    m.sk = sk;
    m.off = mp.bottom_right ? sk - sq : 0;
    m.wl = mp.window_left;
    m.wr = mp.window_right;
    return m;
  }

  __host__ __device__ __forceinline__ static int clamp_i64(int64_t x, int lo, int hi) {
    return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
  }

  __host__ __device__ __forceinline__ int key_begin(int i) const {
    return wl < 0 ? 0 : clamp_i64(int64_t(i) + off - wl, 0, sk);
  }
  __host__ __device__ __forceinline__ int key_end(int i) const {
    return wr < 0 ? sk : clamp_i64(int64_t(i) + off + wr + 1, 0, sk);
  }

  // Rows [r0, r1) (r1 > r0, only rows < sq matter): the union of their key
  // ranges is [key_begin(r0), key_end(last)) because both bounds grow with i.
  __host__ __device__ __forceinline__ int kv_block_begin(int r0, int /*r1*/, int bn) const {
    return key_begin(r0) / bn;
  }
  __host__ __device__ __forceinline__ int kv_block_end(int /*r0*/, int r1, int bn) const {
    int last = (r1 < sq ? r1 : sq) - 1;
    int e = key_end(last);
    return (e + bn - 1) / bn;
  }

  // Rows that see some key in [c0, c1): from j >= i + off - wl  => i <= j - off + wl
  //                                    and j <= i + off + wr  => i >= j - off - wr.
  __host__ __device__ __forceinline__ int q_row_begin(int c0, int /*c1*/) const {
    return wr < 0 ? 0 : clamp_i64(int64_t(c0) - off - wr, 0, sq);
  }
  __host__ __device__ __forceinline__ int q_row_end(int /*c0*/, int c1) const {
    int last = (c1 < sk ? c1 : sk) - 1;
    return wl < 0 ? sq : clamp_i64(int64_t(last) - off + wl + 1, 0, sq);
  }

  // True if some (row, key) of rows [r0, r1) x keys [c0, c1) with row < sq is
  // invisible (or key >= sk), i.e. the element mask has to run on this tile.
  __host__ __device__ __forceinline__ bool tile_needs_mask(int r0, int r1, int c0, int c1) const {
    if (c1 > sk) return true;
    int last = (r1 < sq ? r1 : sq) - 1;
    if (last < r0) return false;  // no live rows
    // Right bound binds hardest on the first row, left bound on the last row.
    if (wr >= 0 && int64_t(c1) - 1 > int64_t(r0) + off + wr) return true;
    if (wl >= 0 && int64_t(c0) < int64_t(last) + off - wl) return true;
    return false;
  }
};

// Masks mma C fragments s[MT][NT][4] (rows of m-tile mt at row0 + mt * kRowStep,
// the fragment's own rows g and g + 8 already folded into row0 by the caller;
// columns of n-tile nt at col0 + nt * 8, element e at + e): invisible entries
// become -inf. row0 = first row of this thread's fragment (tile row + lane / 4),
// col0 = first column of this thread (tile column + 2 * (lane % 4)).
template <int MT, int NT, int kRowStep = 16>
__device__ __forceinline__ void apply_mask_c(float (&s)[MT][NT][4], const MaskPolicy& m, int row0,
                                             int col0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + mt * kRowStep + h * 8;
      // Visible columns [lo, hi) relative to col0.
      const int lo = m.key_begin(row) - col0;
      const int hi = m.key_end(row) - col0;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = nt * 8 + e;
          if (c < lo || c >= hi) s[mt][nt][h * 2 + e] = neg_inf();
        }
      }
    }
  }
}

}  // namespace fastattn
