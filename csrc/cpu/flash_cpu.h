// CPU implementations of the fwd/paged_fwd/bwd ops (see csrc/ops.cpp for the schemas).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn::cpu {

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k,
                                           int64_t max_seqlen_q, int64_t max_seqlen_k,
                                           double scale, bool causal, int64_t window_left,
                                           int64_t window_right, bool bottom_right,
                                           bool deterministic, double softcap = 0.0,
                                           const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                           double dropout_p = 0.0,
                                           const std::optional<at::Tensor>& rng_state = std::nullopt);

std::tuple<at::Tensor, at::Tensor> paged_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache,
                                                 const at::Tensor& cu_seqlens_q,
                                                 const at::Tensor& seqlens_k,
                                                 const at::Tensor& block_table,
                                                 int64_t max_seqlen_q, double scale, bool causal,
                                                 int64_t window_left, int64_t window_right,
                                                 double softcap = 0.0,
                                                 const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                                 double dropout_p = 0.0,
                                                 const std::optional<at::Tensor>& rng_state = std::nullopt);
std::tuple<at::Tensor, at::Tensor> mixed_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k, const at::Tensor& block_table,
    const at::Tensor& work, int64_t max_seqlen_q, int64_t decode_max_q, int64_t num_splits,
    int64_t warps_m, double scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic, double softcap = 0.0, const std::optional<at::Tensor>& dlse = std::nullopt,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double dropout_p = 0.0,
    const std::optional<at::Tensor>& rng_state = std::nullopt);

// fwd_partial / bwd_partial (partial_cpu.cpp): results in float32 for 16-bit inputs.
std::tuple<at::Tensor, at::Tensor> fwd_partial_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v,
                                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                                   const std::optional<at::Tensor>& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   double scale, bool causal, int64_t window_left,
                                                   int64_t window_right, bool bottom_right);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_partial_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic);

// The same, writing into caller-provided gradients (any strides with a
// contiguous last dim, e.g. slices of a packed dqkv).
void bwd_into_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                  int64_t max_seqlen_k, double scale, bool causal, int64_t window_left,
                  int64_t window_right, bool bottom_right, bool deterministic,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  double softcap = 0.0, const std::optional<at::Tensor>& dlse = std::nullopt,
                  const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                  double dropout_p = 0.0,
                  const std::optional<at::Tensor>& rng_state = std::nullopt);

}  // namespace fastattn::cpu
