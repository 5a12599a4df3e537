// Additive score bias (BiasParams, params.h: a tensor and/or ALiBi) on mma C fragments. Kernels keep
// raw scores s (softmax of scale * s), so a bias b enters as s + b / scale
// (the glue requires scale > 0 with a bias).
//   add_bias_c<MT, NT>(s, bp, b, h, row0, col0, sq, sk, inv_scale)
//       forward layout (rows = queries: row0 + 16 mt + 8 hh, cols col0 + 8 nt + e)
//   add_bias_c_transposed<NT>(s, bp, b, h, key0, q0, sq, sk, inv_scale)
//       backward layout (rows = keys key0, key0 + 8; cols = queries q0 + 8 nt + e)
//   store_bias_grad_c_transposed<NT>(ds, bp, b, h, key0, q0, sq, sk)
//       dS (= dL/dbias) of in-range pairs into bp.grad (its own strides;
//       accumulated with atomics when elements alias)
// Pairs outside [0, sq) x [0, sk) are left alone (they are masked anyway).
#pragma once
#include <cstdint>

#include "cuda/common/types.h"
#include "cuda/common/params.h"

namespace fastattn {

__device__ __forceinline__ float bias_at(const BiasParams& bp, int64_t off) {
  return __ldg(bp.ptr + off);
}

// The ALiBi slope of (sequence b, head h) in raw-score units (0 without ALiBi).
__device__ __forceinline__ float alibi_slope(const BiasParams& bp, int b, int h, float inv_scale) {
  return bp.slopes != nullptr
             ? __ldg(bp.slopes + b * bp.slope_batch_stride + h * bp.slope_stride) * inv_scale
             : 0.f;
}

// ALiBi of query row, key col (raw units): slope * (col - row), or flash-attn's
// -slope * |col - row - (sk - sq)|.
__device__ __forceinline__ float alibi_term(const BiasParams& bp, float slope, int row, int col,
                                            int sq, int sk) {
  return bp.alibi_symmetric ? -slope * fabsf(float(col - row - (sk - sq))) : slope * float(col - row);
}

template <int MT, int NT, int kRowStep = 16>
__device__ __forceinline__ void add_bias_c(float (&s)[MT][NT][4], const BiasParams& bp, int b, int h,
                                           int row0, int col0, int sq, int sk, float inv_scale) {
  const float slope = alibi_slope(bp, b, h, inv_scale);
  if (bp.ptr == nullptr && bp.alibi_symmetric) {
    // flash-attn's form: an add and an FMA (|x| is a free operand modifier).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float at_col0 = float(col0 - (row0 + mt * kRowStep + hh * 8) - (sk - sq));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            s[mt][nt][hh * 2 + e] = fmaf(-slope, fabsf(at_col0 + float(nt * 8 + e)), s[mt][nt][hh * 2 + e]);
      }
    return;
  }
  if (bp.ptr == nullptr) {
    // ALiBi alone: one FMA per score with a constant column offset (no int to
    // float conversion per element, no bounds tests: pairs outside the
    // sequences are masked afterwards anyway).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float at_col0 = slope * float(col0 - (row0 + mt * kRowStep + hh * 8));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) s[mt][nt][hh * 2 + e] += fmaf(slope, float(nt * 8 + e), at_col0);
      }
    return;
  }
  const int64_t base = int64_t(b) * bp.sb + int64_t(h) * bp.sh;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + mt * kRowStep + hh * 8;
      if (row >= sq) continue;
      const int64_t rbase = base + int64_t(row) * bp.si;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + nt * 8 + e;
          if (col >= sk) continue;
          s[mt][nt][hh * 2 + e] += alibi_term(bp, slope, row, col, sq, sk) +
                                   bias_at(bp, rbase + int64_t(col) * bp.sj) * inv_scale;
        }
    }
}

template <int NT>
__device__ __forceinline__ void add_bias_c_transposed(float (&s)[NT][4], const BiasParams& bp, int b,
                                                      int h, int key0, int q0, int sq, int sk,
                                                      float inv_scale) {
  const float slope = alibi_slope(bp, b, h, inv_scale);
  if (bp.ptr == nullptr && bp.alibi_symmetric) {  // as in add_bias_c: |key - q - (sk - sq)|
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float at_q0 = float(key0 + hh * 8 - q0 - (sk - sq));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          s[nt][hh * 2 + e] = fmaf(-slope, fabsf(at_q0 - float(nt * 8 + e)), s[nt][hh * 2 + e]);
    }
    return;
  }
  if (bp.ptr == nullptr) {  // ALiBi alone, as in add_bias_c
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float at_q0 = slope * float(key0 + hh * 8 - q0);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) s[nt][hh * 2 + e] += fmaf(-slope, float(nt * 8 + e), at_q0);
    }
    return;
  }
  const int64_t base = int64_t(b) * bp.sb + int64_t(h) * bp.sh;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int key = key0 + hh * 8;
    if (key >= sk) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = q0 + nt * 8 + e;
        if (q >= sq) continue;
        s[nt][hh * 2 + e] += alibi_term(bp, slope, q, key, sq, sk) +
                             bias_at(bp, base + int64_t(q) * bp.si + int64_t(key) * bp.sj) * inv_scale;
      }
  }
}

template <int NT>
__device__ __forceinline__ void store_bias_grad_c_transposed(const float (&ds)[NT][4],
                                                             const BiasParams& bp, int b, int h,
                                                             int key0, int q0, int sq, int sk) {
  float* g = bp.grad + int64_t(b) * bp.gb + int64_t(h) * bp.gh;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int key = key0 + hh * 8;
    if (key >= sk) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = q0 + nt * 8 + e;
        if (q >= sq) continue;
        float* dst = g + int64_t(q) * bp.gi + int64_t(key) * bp.gj;
        // Aliased gradients (a relative-position table: many pairs, one
        // element) accumulate; a dense gradient has one writer per element.
        if (bp.grad_accumulate) atomicAdd(dst, ds[nt][hh * 2 + e]);
        else *dst = ds[nt][hh * 2 + e];
      }
  }
}

}  // namespace fastattn
