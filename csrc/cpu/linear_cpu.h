// CPU implementations of the linear-attention recurrence ops (schemas: csrc/ops.cpp).
//
// One recurrence covers every variant of fastattn.linear (per sequence n and
// value head hv, qk head h = hv / (HV / H), state S of K x V in fp32 / fp64):
//     S' = diag(exp(g_t)) S_{t-1}                       (g: none, (.., HV) or (.., HV, K))
//     S_t = S' + k_t v_t^T                              (plain)
//     S_t = S' + beta_t k_t (v_t - S'^T k_t)^T           (delta rule; beta 1 when absent)
//     o_t = scale S_t^T q_t
// The forward keeps the state at the start of every `chunk` steps of each
// sequence, so that the backward can replay one chunk at a time.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastattn::cpu {

// Checkpoint slots: dense, ceil(T / chunk) per sequence; varlen (batch 1,
// N sequences packed in T steps), chunk c of sequence n at slot
// cu[n] / chunk + n + c, which never reaches the next sequence's first slot
// and stays below ceil(T / chunk) + N. Known without reading cu_seqlens.
inline int64_t linear_checkpoint_slots(int64_t B, int64_t T, int64_t N, bool varlen,
                                       int64_t chunk) {
  const int64_t per = (T + chunk - 1) / chunk;
  return varlen ? per + N : B * per;
}

// -> (o (B, T, HV, V) in v's dtype, final state (N, HV, K, V), checkpoints
//    (slots, HV, K, V); states fp32, fp64 for fp64 inputs)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, double scale, bool delta, int64_t chunk);

// -> (dq, dk, dv, dg (like g, fp32; empty without g), dbeta (like beta, fp32; empty without beta),
//     d initial state (fp32; empty without initial_state))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& checkpoints, double scale,
    bool delta, int64_t chunk);

// linear_recurrent: the recurrence without checkpoints (inference and
// decoding), initial states optionally gathered from a pool through
// state_indices (< 0: padding, a zero state); final states (N, HV, K, V)
// (state_v_first: (N, HV, V, K)) or an empty tensor.
std::tuple<at::Tensor, at::Tensor> linear_recurrent_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& state_indices, const std::optional<at::Tensor>& cu_seqlens,
    double scale, bool delta, bool qk_l2norm, bool state_v_first, bool output_final_state);

// linear_recurrent_update: the same, the final states written back into
// `state` (slot state_indices[n], or n; padding sequences write nothing).
at::Tensor linear_recurrent_update_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& g,
                                       const std::optional<at::Tensor>& beta, at::Tensor& state,
                                       const std::optional<at::Tensor>& state_indices,
                                       const std::optional<at::Tensor>& cu_seqlens, double scale,
                                       bool delta, bool qk_l2norm, bool state_v_first);

// linear_chunk_prepare (csrc/ops.cpp): every chunk's own part of the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_chunk_prepare_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                         const at::Tensor& beta, double scale, bool delta);

// linear_state_scan / linear_state_scan_bwd (csrc/ops.cpp): the scans over
// chunks of the chunked training path, in ATen ops (any device; the CUDA
// backend falls back to them where its kernels do not serve).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_state_scan_cpu(
    const at::Tensor& qt, const at::Tensor& kt, const at::Tensor& u, const std::optional<at::Tensor>& w,
    const at::Tensor& o_intra, const at::Tensor& decay_last, const std::optional<at::Tensor>& initial_state);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_state_scan_bwd_cpu(
    const at::Tensor& qs, const at::Tensor& kt, const std::optional<at::Tensor>& w, const at::Tensor& x,
    const at::Tensor& dout, const at::Tensor& decay_last, const std::optional<at::Tensor>& dfinal);
// linear_chunk_bwd_local (csrc/ops.cpp): the chunk-local gradients of the
// chunked training path.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_bwd_local_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& b,
    const at::Tensor& states, const at::Tensor& dstates, double scale, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& du);

}  // namespace fastattn::cpu
