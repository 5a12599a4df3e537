// Online softmax (FlashAttention-2 style) in exp2 with the softmax scale folded
// in, plus the log-sum-exp merge used by split-KV / recursive attention.
//
// Scores are kept raw (unscaled q.k); with c = scale * log2(e) (FwdParams::
// scale_log2) the probabilities are p = 2^(s*c - m*c), m the raw running max,
// so one FFMA + one EX2 per score. This requires c >= 0 (the glue makes the
// scale non-negative); masked scores are -inf and give p = 0. A row whose max
// is still -inf uses m*c = 0 so no NaN (-inf - -inf) can appear.
//
// Scalar helpers (any layout):
//   quad_max(x), quad_sum(x)                        reduce over the 4 lanes of a quad (mma row group)
//   scaled_max(m, c)                                m*c, or 0 when m == -inf
//   lse_from(m, l, scale)                           natural-log LSE of a finished row (-inf if l == 0)
//   merge_lse(lse_a, lse_b, &wa, &wb)               merged LSE and the weights of the two partial outputs
//   LseMerge m; m.add(lse_i)...; m.result()          N-way merged LSE (online max + rescaled sum)
//   lse_weight(lse_i, lse)                          weight exp(lse_i - lse) of part i in the merged
//                                                   output; exactly 0 for an empty part (-inf), so
//                                                   callers skip reading that part's output
//
// OnlineSoftmax<MT> works on the mma.m16n8 C layout (see ptx.h): a thread owns
// rows g and g+8 of each of its MT m-tiles, i.e. 2*MT rows, index mt*2 + h.
//   OnlineSoftmax<MT> sm; sm.init();
//   sm.update(s, o, c);              s[MT][NT][4] raw scores -> p (in place); rescales o[MT][NO][4]
//                                    only when a row max of the warp moved; accumulates row sums.
//   if (sm.update_scores(s, c, f))   the same in two steps, for an o that an asynchronous MMA
//     sm.rescale(o, f);              is still accumulating into while the scores are processed
//   sm.finalize(o, scale, lse);      o /= rowsum (0 for empty rows); lse[2*MT] natural-log LSE.
#pragma once
#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/common/types.h"

namespace fastattn {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float scaled_max(float m, float scale_log2) {
  return m == neg_inf() ? 0.f : m * scale_log2;
}

// Natural-log LSE of a row with raw max m and sum l of 2^(s*c - m*c).
__device__ __forceinline__ float lse_from(float m, float l, float scale) {
  // ln(sum exp(scale*s)) = scale*m + ln(l)
  return l > 0.f ? m * scale + __logf(l) : neg_inf();
}

// Merge of two partial results over disjoint key sets: returns the merged LSE
// and the weights w_a, w_b with out = w_a * out_a + w_b * out_b. Both -inf
// gives -inf and zero weights.
__device__ __forceinline__ float merge_lse(float lse_a, float lse_b, float* w_a, float* w_b) {
  const float m = fmaxf(lse_a, lse_b);
  if (m == neg_inf()) {
    *w_a = 0.f;
    *w_b = 0.f;
    return neg_inf();
  }
  constexpr float kLog2e = 1.4426950408889634f;
  const float ea = ptx::ex2_approx((lse_a - m) * kLog2e);
  const float eb = ptx::ex2_approx((lse_b - m) * kLog2e);
  const float s = ea + eb;
  *w_a = ea / s;
  *w_b = eb / s;
  return m + __logf(s);
}

// N-way merge of partial results over disjoint key sets (split-KV combine,
// merge_states, the warps of one decode CTA): lse = log(sum_i exp(lse_i)) and
// out = sum_i lse_weight(lse_i, lse) * out_i. Parts with lse_i = -inf are
// ignored; no part left gives lse = -inf (and all weights 0: out = 0).
struct LseMerge {
  float max = neg_inf();  // largest lse added so far
  float sum = 0.f;        // sum of exp(lse_i - max)

  __device__ __forceinline__ void add(float lse_i) {
    constexpr float kLog2e = 1.4426950408889634f;
    if (lse_i == neg_inf()) return;
    if (lse_i > max) {
      sum = sum * ptx::ex2_approx((max - lse_i) * kLog2e) + 1.f;  // ex2(-inf) = 0 on the first part
      max = lse_i;
    } else {
      sum += ptx::ex2_approx((lse_i - max) * kLog2e);
    }
  }
  __device__ __forceinline__ float result() const {
    return sum > 0.f ? max + __logf(sum) : neg_inf();
  }
};

__device__ __forceinline__ float lse_weight(float lse_i, float lse) {
  constexpr float kLog2e = 1.4426950408889634f;
  return (lse_i == neg_inf() || lse == neg_inf()) ? 0.f : ptx::ex2_approx((lse_i - lse) * kLog2e);
}

// 2^x on the FMA pipe, for a share of the scores that would otherwise all
// queue on the special-function unit (16 results per clock per SM against
// 128 FMAs): x = j + f with j = round(x) (the 1.5 * 2^23 trick), f in
// [-1/2, 1/2]; 2^f by a cubic with p(0) = 1 (max relative error 1.0e-4, far
// below the bf16 / fp16 rounding of P); 2^j added into the exponent bits.
// x is clamped at -127, where the result is exactly +0 (so -inf gives 0, as
// ex2 does); the softmax only passes x <= 0.
__device__ __forceinline__ float exp2_fma(float x) {
  x = fmaxf(x, -127.f);
  const float t = x + 12582912.f;  // rounds x to an integer in t's low mantissa bits
  const float f = x - (t - 12582912.f);
  const int j = __float_as_int(t) - 0x4B400000;
  const float p = fmaf(f, fmaf(f, fmaf(f, 0.0550098643f, 0.242210895f), 0.693282723f), 1.f);
  return __int_as_float(__float_as_int(p) + (j << 23));
}

template <int MT>
struct OnlineSoftmax {
  static constexpr int kRows = 2 * MT;
  float row_max[kRows];  // raw running max over the quad (same in its 4 lanes)
  float row_sum[kRows];  // this lane's partial sum; quad-reduced in finalize()

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = neg_inf();
      row_sum[r] = 0.f;
    }
  }

  // s: raw scores of one KV tile (masked = -inf), turned into p in place.
  // o: the output accumulator. It is rescaled only when the max of one of the
  // warp's rows moved (decided warp-wide, so the branch never diverges; rows
  // whose max did not move get the factor 2^0 = 1 exactly).
  template <int NT, int NO>
  __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&o)[MT][NO][4],
                                         float scale_log2) {
    float factor[kRows];
    if (update_scores(s, scale_log2, factor)) rescale(o, factor);
  }

  // update() in two halves, for kernels whose MMA of the previous tile is
  // still accumulating into o while this tile's softmax runs: update_scores
  // turns s into p and advances the row statistics; it returns (warp-uniform)
  // whether o must be multiplied by factor[] (set only then), which the
  // caller does with rescale() once o is final for the previous tile.
  // kFmaEvery > 0: n-tiles nt with nt % kFmaEvery == kFmaEvery - 1 take
  // their exponentials on the FMA pipe (exp2_fma), the rest on ex2.
  template <int kFmaEvery = 0, int NT>
  __device__ __forceinline__ bool update_scores(float (&s)[MT][NT][4], float scale_log2,
                                                float (&factor)[kRows]) {
    float new_max[kRows];
    bool moved = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        float m = row_max[r];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          m = fmaxf(m, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        }
        new_max[r] = quad_max(m);
        moved |= new_max[r] != row_max[r];
      }
    }
    const bool any_moved = __any_sync(0xffffffffu, moved);
    if (any_moved) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        // A row's first keys: nothing to rescale (sum and output are 0). The
        // factor must not be 2^(-new max): with ALiBi or a large additive mask
        // far keys score below -128 / scale_log2, and 2^(+huge) * 0 is NaN.
        factor[r] = row_max[r] == neg_inf()
                        ? 0.f
                        : ptx::ex2_approx(scaled_max(row_max[r], scale_log2) -
                                          scaled_max(new_max[r], scale_log2));
        row_sum[r] *= factor[r];
        row_max[r] = new_max[r];
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        const float mc = scaled_max(row_max[r], scale_log2);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = fmaf(s[mt][nt][2 * h + e], scale_log2, -mc);
            float p;
            if constexpr (kFmaEvery > 0) {
              p = nt % kFmaEvery == kFmaEvery - 1 ? exp2_fma(x) : ptx::ex2_approx(x);
            } else {
              p = ptx::ex2_approx(x);
            }
            s[mt][nt][2 * h + e] = p;
            sum += p;
          }
        }
        row_sum[r] += sum;
      }
    }
    return any_moved;
  }

  template <int NO>
  __device__ __forceinline__ void rescale(float (&o)[MT][NO][4], const float (&factor)[kRows]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int no = 0; no < NO; ++no) {
          o[mt][no][2 * h] *= factor[mt * 2 + h];
          o[mt][no][2 * h + 1] *= factor[mt * 2 + h];
        }
      }
    }
  }

  // Normalizes o and returns the natural-log LSE per row (index mt*2 + h).
  template <int NO>
  __device__ __forceinline__ void finalize(float (&o)[MT][NO][4], float scale,
                                           float (&lse)[kRows]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        const float l = quad_sum(row_sum[r]);
        row_sum[r] = l;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int no = 0; no < NO; ++no) {
          o[mt][no][2 * h] *= inv;
          o[mt][no][2 * h + 1] *= inv;
        }
        lse[r] = lse_from(row_max[r], l, scale);
      }
    }
  }
};

}  // namespace fastattn
