// Plain parameters of the chunked linear-attention forward (torch-free).
//
// The recurrence (linear_params.h) with a scalar log decay g_t per (token,
// value head) or none, and the delta rule or not, is computed over chunks of
// C = 64 tokens in two kernels:
//
// 1. chunk-local (one CTA per chunk and value head, all chunks in parallel).
//    With b_i the chunk-local cumulative sum of g up to token i (so every
//    exponent b_i - b_j taken below, j <= i, is <= 0), Gamma_ij = e^{b_i - b_j}:
//        M     = (Q K^T o Gamma), j <= i                        (C x C)
//      delta rule:
//        A     = diag(beta) (K K^T o Gamma), j < i;  T = (I + A)^{-1}
//        W     = T diag(beta e^b) K,   U = T diag(beta) V      (the UT / WY form)
//      without it: W = 0, U = V.
//    Then, for the state S0 at the chunk's start, the chunk's updates are
//    u = U - W S0 and its outputs
//        O = scale (diag(e^b) Q S0 + M u) = O_intra + Qt S0
//    with O_intra = scale M U and Qt = scale (diag(e^b) Q - M W), and the state
//    after the chunk is S_C = e^{b_last} S0 + Kt^T u with Kt = diag(e^{b_last - b}) K.
//    It writes Qt, W, Kt (rows of K), U (delta rule only) and O_intra (rows of
//    V), each (B, HV, T_pad, .) in the input dtype, and e^{b_last} per chunk.
// 2. scan (one CTA per sequence, value head and slice of V, chunks in order):
//    the state slice in registers as mma accumulators; per chunk
//    O = O_intra + Qt S0, u = U - W S0, S <- e^{b_last} S + Kt^T u.
#pragma once
#include <cstdint>

#include "cuda/common/params.h"

namespace fastattn {

struct LinearChunkParams {
  static constexpr int kChunk = 64;
  // Inputs: q, k (B, T, H, K), v (B, T, HV, V); the last dim contiguous.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_t = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_t = 0, v_stride_h = 0;
  const float* g = nullptr;     // contiguous (B, T, HV) log decays; nullptr: none
  const float* beta = nullptr;  // contiguous (B, T, HV); nullptr: 1 (delta rule)
  // Workspace (B, HV, T_pad, .) with T_pad = chunks * 64, contiguous.
  void* qt = nullptr;       // (.., K)
  void* w = nullptr;        // (.., K), delta rule only
  void* kt = nullptr;       // (.., K)
  void* u = nullptr;        // (.., V), delta rule only (else the scan reads v)
  void* o_intra = nullptr;  // (.., V)
  float* decay_last = nullptr;  // (B, HV, chunks): e^{b_last}
  // States fp32 (B, HV, K, V) contiguous; nullptr: zeros / not written.
  const float* initial_state = nullptr;
  float* final_state = nullptr;
  void* out = nullptr;  // (B, T, HV, V) contiguous, the input dtype
  int B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
  int chunks = 0;  // ceil(T / 64)
  float scale = 1.f;
  bool delta = false;
  ElemType dtype = ElemType::kBFloat16;
};

}  // namespace fastattn
