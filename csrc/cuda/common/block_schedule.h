// Which tiles of the other operand one CTA visits: the schedule that makes a
// kernel dense or block-sparse. The kernels' main loops only ask "how many
// steps" and "which tile at step i" (plus, for sparse steps, whether the tile
// is partial and where its bits are); everything else (loaders, online
// softmax, masks, epilogues) is shared.
//
//   BlockSchedule s = BlockSchedule::dense(first, count, descending);
//   BlockSchedule s = BlockSchedule::sparse(p.sparse, b, h, row_block, tiles_per_block, beyond);
//   for (i in [0, s.count())) {
//     tile = s.tile(i);
//     if (const uint32_t* bits = s.partial_bits(p.sparse, i)) apply them (block s.block(i))
//   }
//
// Sparse order: the partial blocks' tiles, then the full blocks' tiles, each
// block's kernel tiles consecutively. A block id outside [0, cols) maps to
// `beyond` (a tile past the sequence: loaded as zeros, fully masked), so a
// bad list costs a wasted step, never a wild read.
//
// Bits helpers (partial blocks; words = block's row of ceil(block_kv / 32) int32):
//   apply_bits_c<MT, NT>(s, words, words_per_row, r_rel, c_rel)
//       forward fragments (rows = queries): unset bit -> -inf. r_rel: this thread's
//       first row relative to the mask block, c_rel: its first column (tile column
//       + 2 * (lane % 4)) relative to the mask block, a multiple of 2 with
//       (c_rel - 2 * (lane % 4)) % 32 == 0 (tile starts are multiples of 64).
//   zero_unset_bits_c_transposed<NT>(p, words, words_per_row, key_rel, q_rel)
//       backward fragments (rows = keys, columns = queries): unset bit -> 0.
#pragma once
#include <cstdint>

#include "cuda/common/types.h"
#include "cuda/common/params.h"

namespace fastattn {

struct BlockSchedule {
  bool is_sparse = false;
  int first = 0, n = 0;   // dense: tiles first .. first + n - 1
  bool descending = false;
  const int* part = nullptr;
  const int* slots = nullptr;
  int n_part = 0;
  const int* full = nullptr;
  int n_full = 0;
  int sub = 1;            // kernel tiles per mask block
  int cols = 0;           // valid block ids: [0, cols)
  int beyond = 0;         // tile index past the sequence

  __device__ __forceinline__ static BlockSchedule dense(int first, int count, bool descending) {
    BlockSchedule s;
    s.first = first;
    s.n = count > 0 ? count : 0;
    s.descending = descending;
    return s;
  }

  // The lists of (batch b, head h, row block r) of sp; sub kernel tiles per mask block.
  __device__ __forceinline__ static BlockSchedule sparse(const BlockSparseParams& sp, int b, int h,
                                                         int r, int sub, int beyond) {
    BlockSchedule s;
    s.is_sparse = true;
    s.sub = sub;
    s.cols = sp.cols;
    s.beyond = beyond;
    if (r < 0 || r >= sp.rows) return s;
    const int64_t row = (int64_t(sp.bm > 1 ? b : 0) * sp.hm + (sp.hm > 1 ? h : 0)) * sp.rows + r;
    const int np = sp.num[row];
    const int nf = sp.full_num[row];
    s.n_part = np < 0 ? 0 : (np > sp.width ? sp.width : np);
    s.n_full = nf < 0 ? 0 : (nf > sp.full_width ? sp.full_width : nf);
    s.part = sp.idx + row * sp.width;
    s.slots = sp.bits_index != nullptr && sp.bits != nullptr ? sp.bits_index + row * sp.width
                                                             : nullptr;
    s.full = sp.full_idx + row * sp.full_width;
    return s;
  }

  __device__ __forceinline__ int count() const {
    return is_sparse ? (n_part + n_full) * sub : n;
  }
  // Mask block id of step i (sparse; -1 when out of range).
  __device__ __forceinline__ int block(int i) const {
    const int e = i / sub;
    const int id = e < n_part ? part[e] : full[e - n_part];
    return (id >= 0 && id < cols) ? id : -1;
  }
  __device__ __forceinline__ int tile(int i) const {
    if (!is_sparse) return descending ? first + n - 1 - i : first + i;
    const int id = block(i);
    return id < 0 ? beyond : id * sub + i % sub;
  }
  __device__ __forceinline__ bool partial(int i) const { return is_sparse && i < n_part * sub; }
  // Row 0 of the bits of step i's block when it is partial with bits (nullptr:
  // a full block, a partial one without bits, an invalid id or slot).
  __device__ __forceinline__ const uint32_t* partial_bits(const BlockSparseParams& sp, int i) const {
    if (!partial(i) || slots == nullptr || block(i) < 0) return nullptr;
    const int s = slots[i / sub];
    if (s < 0 || s >= sp.slots) return nullptr;
    return sp.bits + int64_t(s) * sp.block_q * sp.words;
  }
};

// Tile ids of steps i, i + 1, i + 2 in registers. A sparse schedule reads its
// lists from global memory; loading each id two steps before its use keeps
// that latency under a step's MMAs instead of in front of the next tile's
// copy. advance(s, i, steps) at the end of step i.
struct TileLookahead {
  int t0 = 0, t1 = 0, t2 = 0;
  __device__ __forceinline__ void init(const BlockSchedule& s, int steps) {
    t0 = steps > 0 ? s.tile(0) : 0;
    t1 = steps > 1 ? s.tile(1) : 0;
    t2 = steps > 2 ? s.tile(2) : 0;
  }
  __device__ __forceinline__ void advance(const BlockSchedule& s, int i, int steps) {
    t0 = t1;
    t1 = t2;
    t2 = i + 3 < steps ? s.tile(i + 3) : 0;
  }
};

template <int MT, int NT, int kRowStep = 16>
__device__ __forceinline__ void apply_bits_c(float (&s)[MT][NT][4], const uint32_t* words,
                                             int per_row, int r_rel, int c_rel) {
  // Columns c_rel + 8 nt + {0, 1} all sit in word (c_rel - 2 (lane % 4)) / 32 + nt / 4.
  const int w0 = c_rel >> 5;
  const int sh = c_rel & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* wr = words + int64_t(r_rel + mt * kRowStep + h * 8) * per_row + w0;
      uint32_t w[(NT + 3) / 4];
#pragma unroll
      for (int q = 0; q < (NT + 3) / 4; ++q) w[q] = __ldg(wr + q);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int bit = (sh + (nt % 4) * 8 + e);
          if (((w[nt / 4] >> bit) & 1u) == 0u) s[mt][nt][h * 2 + e] = neg_inf();
        }
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero_unset_bits_c_transposed(float (&p)[NT][4],
                                                             const uint32_t* words, int per_row,
                                                             int key_rel, int q_rel) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key_rel + h * 8;
    const int w = key >> 5;
    const int bit = key & 31;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = q_rel + nt * 8 + e;
        if (((__ldg(words + int64_t(q) * per_row + w) >> bit) & 1u) == 0u) p[nt][h * 2 + e] = 0.f;
      }
    }
  }
}

}  // namespace fastattn
