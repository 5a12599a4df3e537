// Attention dropout: which (query, key) pairs are kept, as a pure function of
// (seed, offset, batch * heads index, query row, key column), so the forward
// draws a mask and the backward regenerates exactly the same one (nothing is
// stored), and the CPU kernels, the `dropout_mask` op and the CUDA kernels of
// every layout agree bit for bit.
//
// The mask of pair (i, j) (row i, column j within sequence b, head h, bh =
// b * heads_q + h) comes from one Philox4x32-10 block (Salmon et al., SC'11):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (group(j), group(i), lo(offset + bh), hi(offset + bh))
//   group(x) = (x >> 4) << 2 | (x >> 1) & 3
//   byte    = byte number (i & 1) | ((i >> 3) & 1) << 1 | (j & 1) << 2 | ((j >> 3) & 1) << 3
//             of the 16 output bytes (little-endian words x, y, z, w)
//   kept    iff byte < threshold (dropout_threshold below)
// One block serves the 4 x 4 pairs {a, a+1, a+8, a+9} x {c, c+1, c+8, c+9}:
// the only grouping that one thread of an mma C fragment owns half of both
// in the forward (rows = queries: rows r, r + 8 and column pairs) and in the
// transposed backward (rows = keys), so each layout computes one block per
// 16 x 16 tile per thread and uses the 8 bytes it holds (fragment_keep_*).
// Calls draw disjoint counters: the caller reserves batch * heads_q offsets
// from torch's Philox generator (offset advances by at least that much).
//
// Keep probabilities are multiples of 1/256 (threshold / 256, as
// flash-attn's 8-bit mask); kept values are scaled by 256 / threshold, the
// inverse of the probability actually used, so the expectation is exact.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_HD inline
#endif

namespace fastattn {

struct Philox4 {
  uint32_t x, y, z, w;
};

FASTATTN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (the multipliers and Weyl key increments of the paper).
FASTATTN_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

FASTATTN_HD uint32_t dropout_group(int64_t x) {
  return (static_cast<uint32_t>(x >> 4) << 2) | static_cast<uint32_t>((x >> 1) & 3);
}

// Keep iff byte < threshold: threshold = round(256 (1 - p)), at most 255 when
// p > 0 (a requested dropout always drops something) and 0 (drop all) near p = 1.
inline uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 256;
  double t = (1.0 - p) * 256.0 + 0.5;
  if (t < 0.0) t = 0.0;
  if (t > 255.0) t = 255.0;
  return static_cast<uint32_t>(t);
}
inline float dropout_keep_scale(uint32_t threshold) {
  return threshold == 0 ? 0.f : 256.f / static_cast<float>(threshold);
}

// The Philox block of one 4 x 4 group: rows group(i), columns group(j) of the
// (seed, offset, bh) stream.
struct DropoutStream {
  uint32_t k0, k1, z, w;
  FASTATTN_HD static DropoutStream make(uint64_t seed, uint64_t offset, uint64_t bh) {
    const uint64_t ctr = offset + bh;
    return DropoutStream{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                         static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32)};
  }
  FASTATTN_HD Philox4 block(uint32_t row_group, uint32_t col_group) const {
    return philox4x32_10(Philox4{col_group, row_group, z, w}, k0, k1);
  }
  // The reference form, one pair at a time (CPU kernels, dropout_mask op).
  FASTATTN_HD bool keep(int64_t i, int64_t j, uint32_t threshold) const {
    const Philox4 r = block(dropout_group(i), dropout_group(j));
    const int idx = static_cast<int>((i & 1) | ((i >> 2) & 2) | ((j & 1) << 2) | (((j >> 3) & 1) << 3));
    const uint32_t word = (idx >> 2) == 0 ? r.x : (idx >> 2) == 1 ? r.y : (idx >> 2) == 2 ? r.z : r.w;
    return ((word >> (8 * (idx & 3))) & 0xffu) < threshold;
  }
};

}  // namespace fastattn

#if defined(__CUDACC__)
namespace fastattn {
namespace gpu {

// Per-thread dropout state of one (sequence, head): the stream, the byte
// threshold replicated into the four bytes of a word (for __vcmpltu4), and the
// scale of kept values.
struct DropoutTile {
  DropoutStream stream;
  uint32_t threshold4;

  __device__ __forceinline__ void init(const int64_t* rng_state, uint32_t threshold, int64_t bh) {
    stream = DropoutStream::make(static_cast<uint64_t>(rng_state[0]),
                                 static_cast<uint64_t>(rng_state[1]), static_cast<uint64_t>(bh));
    threshold4 = threshold * 0x01010101u;
  }

  // The 16 keep bytes of one group as 0xff (kept) / 0x00 per byte.
  __device__ __forceinline__ void keep_bytes(uint32_t (&m)[4], uint32_t row_group,
                                             uint32_t col_group) const {
    const Philox4 r = stream.block(row_group, col_group);
    m[0] = __vcmpltu4(r.x, threshold4);
    m[1] = __vcmpltu4(r.y, threshold4);
    m[2] = __vcmpltu4(r.z, threshold4);
    m[3] = __vcmpltu4(r.w, threshold4);
  }

  // Forward layout (rows = queries): the keep bits of this thread's 8 scores
  // s[2k + t][2 hh + c] of the 16 x 16 tile whose thread element (0, 0) is
  // query i, key j (i: this lane's row, i % 16 < 8; j: its first column, even),
  // as bit t * 4 + 2 hh + c.
  __device__ __forceinline__ uint32_t fragment_keep_fwd(int i, int j) const {
    uint32_t m[4];
    keep_bytes(m, dropout_group(i), dropout_group(j));
    // byte index: (i & 1) | hh << 1 | c << 2 | t << 3 -> word c | t << 1, byte (i & 1) | hh << 1
    const int sh = 8 * (i & 1);
    uint32_t bits = 0;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          bits |= ((m[c | (t << 1)] >> (sh + 16 * hh)) & 1u) << (t * 4 + 2 * hh + c);
    return bits;
  }

  // Transposed backward layout (rows = keys): the keep bits of s[2k + t][2 hh + c]
  // (key j + 8 hh, query i + 8 t + c) with thread element (0, 0) at key j
  // (j % 16 < 8) and query i (even), as bit t * 4 + 2 hh + c.
  __device__ __forceinline__ uint32_t fragment_keep_bwd(int i, int j) const {
    uint32_t m[4];
    keep_bytes(m, dropout_group(i), dropout_group(j));
    // byte index: c | t << 1 | (j & 1) << 2 | hh << 3 -> word (j & 1) | hh << 1, byte c | t << 1
    const int jb = j & 1;
    uint32_t bits = 0;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint32_t word = jb ? m[1 | (hh << 1)] : m[hh << 1];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          bits |= ((word >> (8 * (c | (t << 1)))) & 1u) << (t * 4 + 2 * hh + c);
    }
    return bits;
  }
};

// Forward: zero the dropped probabilities of P (fp32 C fragments s[MT][NT][4];
// rows row0 + 16 mt (+ 8), columns col0 + 8 nt (+ 1)). The kept ones are
// scaled once, on O, in the epilogue.
template <int MT, int NT>
__device__ __forceinline__ void drop_probs_c(float (&s)[MT][NT][4], const DropoutTile& d, int row0,
                                             int col0) {
  static_assert(NT % 2 == 0, "dropout works on 16-column tiles");
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int k = 0; k < NT / 2; ++k) {
      const uint32_t bits = d.fragment_keep_fwd(row0 + 16 * mt, col0 + 16 * k);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!((bits >> (t * 4 + e)) & 1u)) s[mt][2 * k + t][e] = 0.f;
    }
}

// O *= keep scale (the forward's epilogue), any fragment array.
template <int N>
__device__ __forceinline__ void scale_fragments(float (&x)[N], float scale) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] *= scale;
}
template <int N, int M>
__device__ __forceinline__ void scale_fragments(float (&x)[N][M], float scale) {
#pragma unroll
  for (int i = 0; i < N; ++i) scale_fragments(x[i], scale);
}
template <int N, int M, int K>
__device__ __forceinline__ void scale_fragments(float (&x)[N][M][K], float scale) {
#pragma unroll
  for (int i = 0; i < N; ++i) scale_fragments(x[i], scale);
}

// Backward (transposed fragments x[NT][4], rows keys key0 (+ 8), columns
// queries q0 + 8 nt (+ 1)): the keep bits of all NT / 2 tiles, 8 per tile,
// packed four tiles to a word, computed once and applied twice (to dP, then P).
template <int NT>
struct DropoutBitsT {
  static constexpr int kWords = (NT / 2 + 3) / 4;
  uint32_t w[kWords];
  __device__ __forceinline__ void compute(const DropoutTile& d, int key0, int q0) {
#pragma unroll
    for (int x = 0; x < kWords; ++x) w[x] = 0;
#pragma unroll
    for (int k = 0; k < NT / 2; ++k) w[k / 4] |= d.fragment_keep_bwd(q0 + 16 * k, key0) << (8 * (k % 4));
  }
  // x <- x * scale where kept, 0 where dropped: one n8 tile nt, or all.
  __device__ __forceinline__ void apply_tile(float (&x)[4], int nt, float scale) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int bit = 8 * ((nt / 2) % 4) + (nt & 1) * 4 + e;
      x[e] = ((w[nt / 8] >> bit) & 1u) ? x[e] * scale : 0.f;
    }
  }
  __device__ __forceinline__ void apply(float (&x)[NT][4], float scale) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) apply_tile(x[nt], nt, scale);
  }
};

}  // namespace gpu
}  // namespace fastattn
#endif
