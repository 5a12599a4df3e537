// Plain parameters of the linear-attention recurrent kernel (torch-free).
//
// Per sequence n and value head hv (qk head h = hv / (HV / H)), state S of
// K x V in fp32:
//     S' = diag(exp(g_t)) S_{t-1}                      (g: none, per head or per key)
//     S_t = S' + k_t v_t^T                             (plain)
//     S_t = S' + beta_t k_t (v_t - S'^T k_t)^T          (delta; beta 1 when absent)
//     o_t = scale S_t^T q_t
// with q, k optionally l2-normalized first (x / sqrt(|x|^2 + 1e-6)).
//
// States live in strided 4-D tensors (slots, HV, K, V) or, with state_v_first,
// (slots, HV, V, K): element (k, j) of slot s, head hv at
//     s * stride_slot + hv * stride_head + k * stride_k + j * stride_v.
// Slot of sequence n: indices[n] when the side is indexed, else n. An indexed
// slot outside [0, num_slots) marks a padding sequence (a serving engine's
// pad slot, -1): it starts from zeros and writes no state.
#pragma once
#include <cstdint>

namespace fastattn {

enum class LinearElem : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct LinearStateRef {
  float* ptr = nullptr;  // nullptr: zeros (input side) / not written (output side)
  int64_t stride_slot = 0, stride_head = 0, stride_k = 0, stride_v = 0;
  bool indexed = false;  // slot = indices[n] (LinearRecurrentParams::indices)
};

struct LinearRecurrentParams {
  const void* q = nullptr;  // (B, T, H, K), last dim contiguous
  const void* k = nullptr;  // (B, T, H, K)
  const void* v = nullptr;  // (B, T, HV, V)
  void* out = nullptr;      // (B, T, HV, V), v's dtype
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_t = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_t = 0, v_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_t = 0, o_stride_h = 0;
  const float* g = nullptr;     // contiguous (B, T, HV) or (B, T, HV, K) log decays
  bool g_per_key = false;
  const float* beta = nullptr;  // contiguous (B, T, HV); nullptr: 1
  LinearStateRef state_in, state_out;  // may alias (in-place update of a pool)
  const void* indices = nullptr;       // (N,) int32 or int64 slots
  bool indices_int64 = false;
  int64_t num_slots = 0;               // slots of an indexed state tensor
  const int32_t* cu_seqlens = nullptr; // (N + 1) with B == 1: sequence n is [cu[n], cu[n+1])
  int B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, N = 0;
  float scale = 1.f;
  bool delta = false;
  bool qk_l2norm = false;
  LinearElem dtype = LinearElem::kBFloat16;
};

}  // namespace fastattn
