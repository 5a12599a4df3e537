// The CPU kernels' one online-softmax state and one merge (the CPU twin of
// csrc/cuda/common/softmax.h). Forward, split-KV decode and (later) paged
// and block-sparse variants differ only in which key/value rows they feed
// and in how they find a key's address.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"

namespace fastattn::cpu {

// Online softmax for a block of up to kBlockQ query rows. Per row it keeps
// the running max m, the running sum l of exp(s - m) and the unnormalized
// output o = sum exp(s - m) v; when m grows, l and o are rescaled by
// exp(m_old - m_new). No score matrix is kept beyond one key tile.
template <typename acc_t>
struct RowBlockState {
  int64_t rows = 0, D = 0;
  std::vector<acc_t> q, o, m, l;
  std::vector<acc_t> kt, vt, s;  // one key tile: K^T (D x kBlockK), V (kBlockK x D), scores

  explicit RowBlockState(int64_t head_dim)
      : D(head_dim), q(kBlockQ * head_dim), o(kBlockQ * head_dim), m(kBlockQ), l(kBlockQ),
        kt(head_dim * kBlockK), vt(kBlockK * head_dim), s(kBlockK) {}

  static constexpr acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

  // Starts `n` rows; row r's query is q_row(r).
  template <typename QRow>
  void reset(int64_t n, QRow q_row) {
    rows = n;
    for (int64_t r = 0; r < n; ++r) {
      load_row(&q[r * D], q_row(r), D);
      m[r] = neg_inf();
      l[r] = 0;
    }
    std::fill(o.begin(), o.begin() + n * D, acc_t(0));
  }

  // Feeds keys [j0, j0 + cols): key c's rows are k_row(j0 + c), v_row(j0 + c);
  // row r sees the keys of key_range(r) = [lo, hi) only.
  template <typename KRow, typename VRow, typename Range>
  void visit(int64_t j0, int64_t cols, KRow k_row, VRow v_row, Range key_range, acc_t scale) {
    visit(j0, cols, k_row, v_row, key_range, scale, [](int64_t, int64_t, acc_t s) { return s; });
  }

  // The same with score_mod(r, j, s) applied to each scaled score s of row r and
  // key j in its range (block-sparse bits, additive masks): -inf hides the key.
  template <typename KRow, typename VRow, typename Range, typename ScoreMod>
  void visit(int64_t j0, int64_t cols, KRow k_row, VRow v_row, Range key_range, acc_t scale,
             ScoreMod score_mod) {
    visit(j0, cols, k_row, v_row, key_range, scale, score_mod,
          [](int64_t, int64_t) { return acc_t(1); });
  }

  // And with pv_weight(r, j) multiplying probability (r, j) where it meets V
  // but not in the normalizer (dropout: 0 or 1 / keep probability).
  template <typename KRow, typename VRow, typename Range, typename ScoreMod, typename PvWeight>
  void visit(int64_t j0, int64_t cols, KRow k_row, VRow v_row, Range key_range, acc_t scale,
             ScoreMod score_mod, PvWeight pv_weight) {
    // K is stored transposed so that the score loop is an axpy over keys.
    for (int64_t c = 0; c < cols; ++c) {
      const auto* krow = k_row(j0 + c);
      for (int64_t x = 0; x < D; ++x) kt[x * kBlockK + c] = static_cast<acc_t>(krow[x]);
      load_row(&vt[c * D], v_row(j0 + c), D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const KeyRange kr = key_range(r);
      const int64_t c_lo = std::max<int64_t>(kr.lo - j0, 0);
      const int64_t c_hi = std::min<int64_t>(kr.hi - j0, cols);
      if (c_lo >= c_hi) continue;
      std::fill(s.begin(), s.begin() + cols, acc_t(0));
      const acc_t* qr = &q[r * D];
      for (int64_t x = 0; x < D; ++x) {
        const acc_t qx = qr[x];
        const acc_t* kx = &kt[x * kBlockK];
        for (int64_t c = c_lo; c < c_hi; ++c) s[c] += qx * kx[c];
      }
      acc_t tile_max = neg_inf();
      for (int64_t c = c_lo; c < c_hi; ++c) {
        s[c] = score_mod(r, j0 + c, s[c] * scale);
        tile_max = std::max(tile_max, s[c]);
      }
      if (tile_max == neg_inf()) continue;  // every key of the tile hidden: nothing to add
      acc_t* orow = &o[r * D];
      const acc_t m_new = std::max(m[r], tile_max);
      if (m_new > m[r] && m[r] != neg_inf()) {
        const acc_t alpha = std::exp(m[r] - m_new);
        l[r] *= alpha;
        for (int64_t x = 0; x < D; ++x) orow[x] *= alpha;
      }
      m[r] = m_new;
      for (int64_t c = c_lo; c < c_hi; ++c) {
        const acc_t pc = std::exp(s[c] - m_new);
        l[r] += pc;
        const acc_t pw = pc * pv_weight(r, j0 + c);
        if (pw == acc_t(0)) continue;
        const acc_t* vc = &vt[c * D];
        for (int64_t x = 0; x < D; ++x) orow[x] += pw * vc[x];
      }
    }
  }

  // Normalized output of row r into dst (D values) and its lse; a row that
  // saw no key gives 0 and -inf.
  template <typename T, typename L>
  void finish(int64_t r, T* dst, L* lse) const {
    const bool empty = l[r] == acc_t(0);
    const acc_t inv_l = empty ? acc_t(0) : acc_t(1) / l[r];
    for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(o[r * D + x] * inv_l);
    *lse = static_cast<L>(empty ? neg_inf() : m[r] + std::log(l[r]));
  }
};

// Merges n partial results of one row over disjoint key sets:
// lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i.
// Parts with lse = -inf weigh 0; if every part is empty, out = 0 and lse = -inf.
template <typename acc_t, typename PartOut, typename PartLse, typename T, typename L>
void merge_row(int64_t n, int64_t D, PartOut part_out, PartLse part_lse, T* dst, L* lse,
               acc_t* scratch) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<acc_t>(part_lse(i)));
  std::fill(scratch, scratch + D, acc_t(0));
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(0);
    *lse = static_cast<L>(m);
    return;
  }
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t w = std::exp(static_cast<acc_t>(part_lse(i)) - m);
    if (w == acc_t(0)) continue;
    sum += w;
    const auto* o = part_out(i);
    for (int64_t x = 0; x < D; ++x) scratch[x] += w * static_cast<acc_t>(o[x]);
  }
  for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(scratch[x] / sum);
  *lse = static_cast<L>(m + std::log(sum));
}

}  // namespace fastattn::cpu
