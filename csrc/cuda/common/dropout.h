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
// a grouping of which one thread of an mma C fragment holds exactly half both
// in the forward (rows = queries: rows r, r + 8 and column pairs) and in the
// transposed backward (rows = keys), the other half being held by lane ^ 4
// (see DropoutTile below).
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

// Per-thread dropout state of one (sequence, head): the stream and the byte
// threshold replicated into the four bytes of a word (for __vcmpltu4).
//
// Work sharing: in both fragment layouts the lanes L and L ^ 4 hold the two
// halves of the same 4 x 4 groups (rows r and r + 1 of an m16 tile), so for
// two neighbouring 16 x 16 tiles each lane of the pair computes one Philox
// block and passes the other lane the 8 keep bytes it needs (one Philox
// block per 16 scores per thread instead of per 8).
struct DropoutTile {
  DropoutStream stream;
  uint32_t threshold4;

  __device__ __forceinline__ void init(const int64_t* rng_state, uint32_t threshold, int64_t bh) {
    stream = DropoutStream::make(static_cast<uint64_t>(rng_state[0]),
                                 static_cast<uint64_t>(rng_state[1]), static_cast<uint64_t>(bh));
    threshold4 = threshold * 0x01010101u;
  }
  template <typename DropoutParamsT>
  static __device__ __forceinline__ DropoutTile make(const DropoutParamsT& p, int64_t bh) {
    DropoutTile d;
    d.init(p.rng_state, p.keep_threshold, bh);
    return d;
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
};

// Forward layout (rows = queries). A thread's scores of one 16 x 16 tile are
// s[2k + t][2 hh + c]: query i + 8 hh, key j + 8 t + c, with i its row (i % 16
// < 8) and j its first column (j % 16 == 2 (lane % 4)). Their byte numbers are
// (i & 1) | hh << 1 | c << 2 | t << 3: word c | t << 1, byte (i & 1) | hh << 1.
// fwd_pack gathers those 8 bytes of the group's words m as two words
// [m(2t).b(w), m(2t).b(w + 2), m(2t + 1).b(w), m(2t + 1).b(w + 2)], t = 0, 1
// (w = i & 1): score (t, hh, c) is kept iff bit 8 (2c + hh) of word t is set.
__device__ __forceinline__ void fwd_pack(uint32_t (&packed)[2], const uint32_t (&m)[4], int w) {
  const uint32_t sel = w ? 0x7531u : 0x6420u;
  packed[0] = __byte_perm(m[0], m[1], sel);
  packed[1] = __byte_perm(m[2], m[3], sel);
}

// Bit b of each byte of x (bytes 0 / 1) gathered into a nibble: byte n -> bit n.
__device__ __forceinline__ uint32_t byte_flags_to_nibble(uint32_t x) {
  return ((x & 0x01010101u) * 0x01020408u) >> 24;
}

// Forward: the keep flags of a thread's P fragments s[MT][NT][4] (rows row0 +
// 16 mt (+ 8), columns col0 + 8 nt (+ 1)), 8 per 16 x 16 tile (score (t, hh, c)
// at bit 4 t + 2 c + hh), four tiles to a word. Independent of the scores, so
// the sm90 kernels compute them while the tensor cores run S = Q K^T.
template <int MT, int NT>
struct DropoutBitsF {
  static_assert(NT % 2 == 0, "dropout works on 16-column tiles");
  static constexpr int kTiles = NT / 2;  // per m16 tile
  static constexpr int kWords = (MT * kTiles + 3) / 4;
  uint32_t w[kWords];

  static __device__ __forceinline__ uint32_t flags(const uint32_t (&packed)[2]) {
    return byte_flags_to_nibble(packed[0]) | (byte_flags_to_nibble(packed[1]) << 4);
  }
  __device__ __forceinline__ void put(int tile, uint32_t f) { w[tile / 4] |= f << (8 * (tile % 4)); }

  __device__ __forceinline__ void compute(const DropoutTile& d, int row0, int col0) {
#pragma unroll
    for (int x = 0; x < kWords; ++x) w[x] = 0;
    const int wb = row0 & 1;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t gy = dropout_group(row0 + 16 * mt);
#pragma unroll
      for (int k = 0; k + 1 < kTiles; k += 2) {
        // Lane wb computes tile k + wb and swaps with lane ^ 4 (which has 1 - wb).
        uint32_t m[4], own[2], other[2], recv[2];
        d.keep_bytes(m, gy, dropout_group(col0 + 16 * (k + wb)));
        fwd_pack(own, m, wb);
        fwd_pack(other, m, 1 - wb);
        recv[0] = __shfl_xor_sync(0xffffffffu, other[0], 4);
        recv[1] = __shfl_xor_sync(0xffffffffu, other[1], 4);
        const uint32_t a[2] = {wb ? recv[0] : own[0], wb ? recv[1] : own[1]};
        const uint32_t b[2] = {wb ? own[0] : recv[0], wb ? own[1] : recv[1]};
        put(mt * kTiles + k, flags(a));
        put(mt * kTiles + k + 1, flags(b));
      }
      if constexpr (kTiles % 2 == 1) {  // a last unpaired tile: both lanes compute it
        constexpr int k = kTiles - 1;
        uint32_t m[4], own[2];
        d.keep_bytes(m, gy, dropout_group(col0 + 16 * k));
        fwd_pack(own, m, wb);
        put(mt * kTiles + k, flags(own));
      }
    }
  }

  // Zero the dropped probabilities (the kept ones are scaled once, on O).
  __device__ __forceinline__ void apply(float (&s)[MT][NT][4]) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tile = mt * kTiles + nt / 2, t = nt & 1, hh = e >> 1, c = e & 1;
          const int bit = 8 * (tile % 4) + 4 * t + 2 * c + hh;
          if (!((w[tile / 4] >> bit) & 1u)) s[mt][nt][e] = 0.f;
        }
  }
};

// Forward, in one place (kernels whose MMAs are synchronous).
template <int MT, int NT>
__device__ __forceinline__ void drop_probs_c(float (&s)[MT][NT][4], const DropoutTile& d, int row0,
                                             int col0) {
  DropoutBitsF<MT, NT> bits;
  bits.compute(d, row0, col0);
  bits.apply(s);
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
// queries q0 + 8 nt (+ 1)). Score (t, hh, c) of tile k (= x[2k + t][2 hh + c]:
// key j + 8 hh, query i + 8 t + c) has byte number c | t << 1 | (j & 1) << 2 |
// hh << 3: word (j & 1) | hh << 1, byte c | t << 1. The keep flags of all
// NT / 2 tiles, 8 per tile (bit 4 hh + 2 t + c), packed four tiles to a word,
// are computed once and applied twice (to dP, then P).
template <int NT>
struct DropoutBitsT {
  static constexpr int kTiles = NT / 2;
  static constexpr int kWords = (kTiles + 3) / 4;
  uint32_t w[kWords];

  // This thread's two words (hh = 0, 1) of a group's words m, as 8 flags.
  static __device__ __forceinline__ uint32_t flags(uint32_t lo, uint32_t hi) {
    return byte_flags_to_nibble(lo) | (byte_flags_to_nibble(hi) << 4);
  }

  __device__ __forceinline__ void compute(const DropoutTile& d, int key0, int q0) {
    static_assert(NT % 2 == 0, "dropout works on 16-column tiles");
#pragma unroll
    for (int x = 0; x < kWords; ++x) w[x] = 0;
    const int jb = key0 & 1;
    const uint32_t gx = dropout_group(key0);
#pragma unroll
    for (int k = 0; k + 1 < kTiles; k += 2) {
      // Lane jb computes tile k + jb; it keeps words jb, jb + 2 and sends the others.
      uint32_t m[4];
      d.keep_bytes(m, dropout_group(q0 + 16 * (k + jb)), gx);
      const uint32_t own_lo = jb ? m[1] : m[0], own_hi = jb ? m[3] : m[2];
      const uint32_t recv_lo = __shfl_xor_sync(0xffffffffu, jb ? m[0] : m[1], 4);
      const uint32_t recv_hi = __shfl_xor_sync(0xffffffffu, jb ? m[2] : m[3], 4);
      const uint32_t fa = flags(jb ? recv_lo : own_lo, jb ? recv_hi : own_hi);
      const uint32_t fb = flags(jb ? own_lo : recv_lo, jb ? own_hi : recv_hi);
      w[k / 4] |= fa << (8 * (k % 4));
      w[(k + 1) / 4] |= fb << (8 * ((k + 1) % 4));
    }
    if constexpr (kTiles % 2 == 1) {
      constexpr int k = kTiles - 1;
      uint32_t m[4];
      d.keep_bytes(m, dropout_group(q0 + 16 * k), gx);
      w[k / 4] |= flags(jb ? m[1] : m[0], jb ? m[3] : m[2]) << (8 * (k % 4));
    }
  }
  // x <- x * scale where kept, 0 where dropped: one n8 tile nt, or all.
  __device__ __forceinline__ void apply_tile(float (&x)[4], int nt, float scale) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e >> 1, c = e & 1, t = nt & 1;
      const int bit = 8 * ((nt / 2) % 4) + 4 * hh + 2 * t + c;
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
