// CPU implementations of the sparse_fwd / sparse_bwd ops (schemas: csrc/ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn::cpu {

std::tuple<at::Tensor, at::Tensor> sparse_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const at::Tensor& full_kv_num_blocks,
    const at::Tensor& full_kv_indices, const std::optional<at::Tensor>& kv_bits_index,
    const std::optional<at::Tensor>& partial_bits, int64_t block_q, int64_t block_kv, double scale,
    bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& bias, bool bias_relative,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const at::Tensor& full_q_num_blocks,
    const at::Tensor& full_q_indices, const std::optional<at::Tensor>& q_bits_index,
    const std::optional<at::Tensor>& partial_bits, int64_t block_q, int64_t block_kv, double scale,
    bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& bias, bool bias_grad, bool deterministic,
    const std::optional<at::Tensor>& dlse, bool bias_relative,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state);

}  // namespace fastattn::cpu
