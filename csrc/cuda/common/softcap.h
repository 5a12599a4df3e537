// Score capping (Gemma 2's attn_logit_softcapping, flash-attn's softcap):
// the scaled score x = scale * s becomes c * tanh(x / c). The kernels keep
// raw scores s (their softmax is of scale * s), so on raw scores the cap is
//     s -> out * tanh(in * s),   in = scale / c,  out = c / scale
// (FwdParams::softcap_in / softcap_out; in == 0: no cap). It must run before
// the mask: masked scores are -inf, and tanh(-inf) would unmask them.
//
// Backward: with t = tanh(in * s), d(capped)/ds = out * in * (1 - t^2) =
// 1 - t^2, so dS_raw = P * (dP - D) * (1 - t^2). cap_scores_and_ds folds the
// factor into dP before P overwrites the scores: dP <- (dP - D) * (1 - t^2),
// after which the kernels form dS = P * dP with D taken as 0.
//
// tanh.approx.f32 (one MUFU op, max relative error about 2^-11) is what
// flash-attn uses too; the error it adds to a logit is below bf16's rounding
// of the same logit and about fp16's.
#pragma once

namespace fastattn {
namespace ptx {
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
}  // namespace ptx

// Forward: every score of a C-fragment array (any rank) capped in place.
template <int N>
__device__ __forceinline__ void cap_scores(float (&s)[N], float in, float out) {
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = out * ptx::tanh_approx(in * s[i]);
}
template <int N, int M>
__device__ __forceinline__ void cap_scores(float (&s)[N][M], float in, float out) {
#pragma unroll
  for (int i = 0; i < N; ++i) cap_scores(s[i], in, out);
}
template <int N, int M, int K>
__device__ __forceinline__ void cap_scores(float (&s)[N][M][K], float in, float out) {
#pragma unroll
  for (int i = 0; i < N; ++i) cap_scores(s[i], in, out);
}

// Backward, transposed fragments s[nt][2 h + e] / dp[nt][2 h + e] (rows =
// keys, columns = queries nt * 8 + e from dsum_cols): caps s and turns dp into
// (dP - D) * (1 - t^2). The caller then uses D = 0 in dS = P * (dP - D).
template <int NT>
__device__ __forceinline__ void cap_scores_and_ds(float (&s)[NT][4], float (&dp)[NT][4],
                                                  const float* dsum_cols, float in, float out) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float2 d2 = *reinterpret_cast<const float2*>(dsum_cols + nt * 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float t = ptx::tanh_approx(in * s[nt][i]);
      s[nt][i] = out * t;
      dp[nt][i] = (dp[nt][i] - ((i & 1) ? d2.y : d2.x)) * fmaf(-t, t, 1.f);
    }
  }
}

}  // namespace fastattn
