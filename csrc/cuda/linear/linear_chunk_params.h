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
//
// Varlen (B == 1, cu_seqlens): chunks never cross a sequence's end; sequence
// n owns workspace chunks [chunk_offsets[n], chunk_offsets[n + 1]) (offsets
// computed on the device, so no host sync), `chunks` is an upper bound
// (T / 64 + N) and the chunk-local CTAs past the last chunk exit. States are
// read and written through LinearStateRef (linear_params.h): a pool addressed
// by `indices` (negative or out-of-range slot: padding, zero state, nothing
// written), any strides (state_v_first).
#pragma once
#include <cstdint>

#include "cuda/common/params.h"
#include "cuda/linear/linear_params.h"

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
  const float* g = nullptr;     // (B, T, HV) log decays, (B, T, HV, K) with g_per_key; nullptr: none
  bool g_per_key = false;       // GLA: no delta rule; g's key channels contiguous
  const float* beta = nullptr;  // (B, T, HV), g's strides; nullptr: 1 (delta rule)
  // g's and beta's strides in elements (0: contiguous (B, T, HV), set by the launcher).
  int64_t g_stride_b = 0, g_stride_t = 0, g_stride_h = 0;
  // Varlen: cu_seqlens (N + 1) and chunk_offsets (N + 1), both int32; nullptr: dense.
  const int32_t* cu_seqlens = nullptr;
  const int32_t* chunk_offsets = nullptr;
  // Workspace (B, HV, chunks * 64, .), contiguous.
  void* qt = nullptr;       // (.., K)
  void* w = nullptr;        // (.., K), delta rule only
  void* kt = nullptr;       // (.., K)
  void* u = nullptr;        // (.., V), delta rule only (else the scan reads v)
  void* o_intra = nullptr;  // (.., V)
  float* decay_last = nullptr;  // (B, HV, chunks): e^{b_last}; (B, HV, chunks, K) with g_per_key
  // The training path also keeps M = Q K^T o Gamma (rows of 64, input dtype)
  // and b (fp32), workspace layout; nullptr: not written.
  void* m_out = nullptr;
  float* b_out = nullptr;
  // States fp32 (state_in.ptr nullptr: zeros; state_out.ptr nullptr: not written).
  LinearStateRef state_in, state_out;
  const void* indices = nullptr;  // (N,) int32 / int64 slots of indexed state refs
  bool indices_int64 = false;
  int64_t num_slots = 0;
  void* out = nullptr;  // (B, T, HV, V), the input dtype, V contiguous
  int64_t out_stride_b = 0, out_stride_t = 0, out_stride_h = 0;
  // The training path's scan (op linear_state_scan, dense): the state at
  // every chunk start, (B, HV, chunks, K, V) fp32, and the updates
  // u = U - W S0 (delta rule) in the input dtype, workspace layout of V
  // columns; nullptr: not written.
  float* chunk_states = nullptr;
  void* u_out = nullptr;
  int B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
  int N = 0;       // sequences: B, or cu_seqlens' N
  int chunks = 0;  // workspace chunks per (batch, head): ceil(T / 64), varlen T / 64 + N
  float scale = 1.f;
  bool delta = false;
  // Value columns per scan CTA: 0 for the default slice (kLinearScanCols), or
  // the wide slice (kLinearScanColsWide, V a multiple of it; scalar decays):
  // half the CTAs, each doing the value-slice work twice, for grids that
  // would otherwise take a second wave (linear_scan_cols_for).
  int scan_cols = 0;
  ElemType dtype = ElemType::kBFloat16;
};

// Reverse scan of the chunked backward (op linear_state_scan_bwd; dense, one
// CTA per value slice, value head and batch row, chunks in reverse). With dS
// the gradient of the state at the end of chunk c (dfinal after the last):
//     dstates[c] = dS;   du_c = X_c + Kt_c dS;
//     dS <- e^{b_last,c} dS + Qs_c^T dO_c - W_c^T du_c      (no W term without the delta rule)
// and dinitial = dS after chunk 0: the forward scan's recurrence transposed
// (u = U - W S0, O = O_intra + Qt S0, S1 = e^{b_last} S0 + Kt^T u), with
// X = scale M^T dO and Qs = scale diag(e^b) Q formed by the caller.
struct LinearScanBwdParams {
  static constexpr int kChunk = LinearChunkParams::kChunk;
  // (B, HV, chunks * 64, .) contiguous, the input dtype: K columns / V columns.
  const void* qs = nullptr;
  const void* kt = nullptr;
  const void* w = nullptr;  // delta rule only
  const void* x = nullptr;
  const void* dout = nullptr;
  const float* decay_last = nullptr;  // (B, HV, chunks)
  const float* dfinal = nullptr;      // (B, HV, K, V); nullptr: zeros
  float* du = nullptr;                // (B, HV, chunks * 64, V)
  float* dstates = nullptr;           // (B, HV, chunks, K, V)
  float* dinitial = nullptr;          // (B, HV, K, V)
  int B = 0, HV = 0, K = 0, V = 0, chunks = 0;
  bool delta = false;
  ElemType dtype = ElemType::kBFloat16;
};

// Chunk-local gradients of the chunked training path (op
// linear_chunk_bwd_local; the math: csrc/ops.cpp), one CTA per (chunk, value
// head, batch row). Chunk layout (B, HV, chunks * 64, .) contiguous.
struct LinearChunkBwdLocalParams {
  static constexpr int kChunk = LinearChunkParams::kChunk;
  const void* q = nullptr;     // rows of K, input dtype
  const void* k = nullptr;     // rows of K
  const void* v = nullptr;     // rows of V
  const void* dout = nullptr;  // rows of V
  const float* b = nullptr;    // (B, HV, chunks, 64) chunk-local cumulative log decays
  const float* states = nullptr;   // (B, HV, chunks, K, V) at the chunk starts
  const float* dstates = nullptr;  // (B, HV, chunks, K, V) gradients at the chunk ends
  // Delta rule (beta != nullptr): beta (B, HV, chunks, 64); the forward's
  // updates u and their gradients du (rows of V, input dtype).
  const float* beta = nullptr;
  const void* u = nullptr;
  const void* du = nullptr;
  float* dq = nullptr;  // rows of K
  float* dk = nullptr;  // rows of K
  float* db = nullptr;  // (B, HV, chunks, 64)
  float* dv = nullptr;     // rows of V (delta rule)
  float* dbeta = nullptr;  // (B, HV, chunks, 64) (delta rule)
  int B = 0, HV = 0, K = 0, V = 0, chunks = 0;
  float scale = 1.f;
  ElemType dtype = ElemType::kBFloat16;
};

}  // namespace fastattn
