// CPU implementations of decode, merge_states(_n) and append_kv (schemas: csrc/ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn::cpu {

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache,
                                              const std::optional<at::Tensor>& seqlens_k,
                                              const std::optional<at::Tensor>& cache_batch_idx,
                                              const std::optional<at::Tensor>& block_table,
                                              double scale, bool causal, int64_t window_left,
                                              int64_t window_right, int64_t num_splits,
                                              double softcap = 0.0,
                                              const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                              const std::optional<at::Tensor>& cache_leftpad = std::nullopt,
                                              const std::optional<at::Tensor>& k_descale = std::nullopt,
                                              const std::optional<at::Tensor>& v_descale = std::nullopt,
                                              const std::optional<at::Tensor>& tree_mask = std::nullopt);

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                    const at::Tensor& out_b, const at::Tensor& lse_b);

std::tuple<at::Tensor, at::Tensor> merge_states_n_cpu(const at::Tensor& outs, const at::Tensor& lses);

void append_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot_mapping,
                   at::Tensor& k_cache, at::Tensor& v_cache,
                   const std::optional<at::Tensor>& k_scale = std::nullopt,
                   const std::optional<at::Tensor>& v_scale = std::nullopt);

}  // namespace fastattn::cpu
