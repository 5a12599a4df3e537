// Pieces shared by the CPU forward and backward: where a sequence's rows
// live (dense or varlen), which keys a query row may see, and strided views.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "torch/attention_problem.h"

namespace fastattn::cpu {

// Tile sizes of the CPU kernels. Small enough that a Q tile, a K^T/V tile and
// the score tile stay in L1/L2 for head dims up to 256.
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 64;

// fp64 inputs accumulate in fp64, everything else in fp32.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Element (b, row, h, :) of a (B, S, H, D) or varlen (total, H, D) tensor.
template <typename T>
struct RowView {
  T* data;
  int64_t batch_stride, row_stride, head_stride;

  RowView(const at::Tensor& t, bool varlen)
      : data(static_cast<T*>(t.data_ptr())),
        batch_stride(varlen ? 0 : t.stride(0)),
        row_stride(t.stride(varlen ? 0 : 1)),
        head_stride(t.stride(varlen ? 1 : 2)) {}

  T* row(int64_t b, int64_t r, int64_t h) const {
    return data + b * batch_stride + r * row_stride + h * head_stride;
  }
};

// Rows [q_begin, q_begin + sq) of q and [k_begin, k_begin + sk) of k/v belong
// to sequence b; dense batches start every sequence at row 0 of its batch.
struct SeqSpan {
  int64_t q_begin, sq, k_begin, sk;
};

inline SeqSpan seq_span(const AttnProblem& p, const int32_t* cu_q, const int32_t* cu_k,
                        int64_t b) {
  if (!p.varlen) return {0, p.seqlen_q, 0, p.seqlen_k};
  return {cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]};
}

// Keys visible to query row i form one interval [lo, hi) (possibly empty):
// the window is a band around the diagonal through (0, 0) (top-left) or
// (sq - 1, sk - 1) (bottom-right); causal is window_right == 0.
struct KeyRange {
  int64_t lo, hi;
};

inline KeyRange visible_keys(const AttnProblem& p, int64_t i, int64_t sq, int64_t sk) {
  const int64_t diag = i + (p.bottom_right ? sk - sq : 0);
  int64_t lo = p.window_left < 0 ? 0 : std::max<int64_t>(0, diag - p.window_left);
  int64_t hi = p.window_right < 0 ? sk : std::min<int64_t>(sk, diag + p.window_right + 1);
  return {lo, std::max(lo, hi)};
}

// The dense ops' score transforms of one (sequence, head), applied to a
// scaled score x of query i, key j, in flash-attn's order: the softcap
// (x -> c tanh(x / c)), then ALiBi (-slope * |i + sk - sq - j|). slope() reads
// checked_alibi_slopes' tensor (undefined: 0). With dcap, also dx'/dx of the cap.
template <typename acc_t>
struct DenseScoreMods {
  acc_t softcap = 0, slope = 0, diag_offset = 0;  // diag_offset = sk - sq

  static acc_t slope_of(const at::Tensor& slopes, int64_t b, int64_t h) {
    if (!slopes.defined()) return 0;
    const float* s = slopes.data_ptr<float>();
    return static_cast<acc_t>(slopes.dim() == 2 ? s[b * slopes.size(1) + h] : s[h]);
  }
  acc_t operator()(int64_t i, int64_t j, acc_t x, acc_t* dcap = nullptr) const {
    if (softcap > acc_t(0)) {
      const acc_t t = std::tanh(x / softcap);
      x = softcap * t;
      if (dcap != nullptr) *dcap = 1 - t * t;
    } else if (dcap != nullptr) {
      *dcap = 1;
    }
    if (slope != acc_t(0)) x -= slope * std::abs(static_cast<acc_t>(j - i) - diag_offset);
    return x;
  }
};

template <typename acc_t, typename scalar_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t d) {
  for (int64_t x = 0; x < d; ++x) dst[x] = static_cast<acc_t>(src[x]);
}

}  // namespace fastattn::cpu
