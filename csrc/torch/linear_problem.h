// Argument checks of the linear_recurrent / linear_recurrent_update ops,
// shared by the CPU and CUDA backends (schemas: csrc/ops.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fastattn {

struct LinearRecurrentProblem {
  int64_t B, T, H, HV, K, V, N;
  bool varlen, g_per_key;
  at::ScalarType state_dtype;  // fp32 (fp64 for fp64 inputs)
};

// state: initial state / pool, (slots, HV, K, V) or with state_v_first
// (slots, HV, V, K); slots N, or any number with state_indices.
inline LinearRecurrentProblem check_linear_recurrent_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& state,
    const std::optional<at::Tensor>& state_indices, const std::optional<at::Tensor>& cu_seqlens,
    bool state_v_first) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "fastattn.linear: q, k (B, T, H, K) and v (B, T, HV, V) expected, got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(2) > 0 && v.size(2) % q.size(2) == 0,
              "fastattn.linear: value heads (", v.size(2), ") must be a multiple of q/k heads (",
              q.size(2), ")");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn.linear: q, k, v must share a dtype");
  LinearRecurrentProblem s;
  s.B = q.size(0);
  s.T = q.size(1);
  s.H = q.size(2);
  s.K = q.size(3);
  s.HV = v.size(2);
  s.V = v.size(3);
  s.varlen = cu_seqlens.has_value();
  s.N = s.varlen ? cu_seqlens->numel() - 1 : s.B;
  s.state_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.g_per_key = g.has_value() && g->dim() == 4;
  const char* acc_name = s.state_dtype == at::kDouble ? "float64" : "float32";
  if (cu_seqlens) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 &&
                    cu_seqlens->numel() >= 2 && s.B == 1,
                "fastattn.linear: cu_seqlens must be int32 (N + 1) with batch 1");
  }
  if (g) {
    const bool per_head = g->dim() == 3 && g->sizes() == at::IntArrayRef({s.B, s.T, s.HV});
    const bool per_key = g->dim() == 4 && g->sizes() == at::IntArrayRef({s.B, s.T, s.HV, s.K});
    TORCH_CHECK((per_head || per_key) && g->scalar_type() == s.state_dtype && g->is_contiguous(),
                "fastattn.linear: g must be contiguous ", acc_name, " (B, T, HV) or (B, T, HV, K), got ",
                g->sizes(), " ", g->scalar_type());
  }
  if (beta) {
    TORCH_CHECK(beta->sizes() == at::IntArrayRef({s.B, s.T, s.HV}) &&
                    beta->scalar_type() == s.state_dtype && beta->is_contiguous(),
                "fastattn.linear: beta must be contiguous ", acc_name, " (B, T, HV), got ",
                beta->sizes(), " ", beta->scalar_type());
  }
  if (state_indices) {
    TORCH_CHECK(state.has_value(), "fastattn.linear: state_indices need the state pool");
    TORCH_CHECK(state_indices->dim() == 1 && state_indices->numel() == s.N &&
                    (state_indices->scalar_type() == at::kInt ||
                     state_indices->scalar_type() == at::kLong),
                "fastattn.linear: state_indices must be (", s.N, ",) int32/int64, got ",
                state_indices->sizes(), " ", state_indices->scalar_type());
  }
  if (state) {
    const int64_t a = state_v_first ? s.V : s.K, b = state_v_first ? s.K : s.V;
    TORCH_CHECK(state->dim() == 4 && state->size(1) == s.HV && state->size(2) == a &&
                    state->size(3) == b && (state_indices || state->size(0) == s.N),
                "fastattn.linear: the state must be (", state_indices ? std::string("slots") : std::to_string(s.N),
                ", ", s.HV, ", ", a, ", ", b, ")", state_v_first ? " (state_v_first)" : "", ", got ",
                state->sizes());
    TORCH_CHECK(state->scalar_type() == s.state_dtype, "fastattn.linear: the state must be ",
                acc_name, ", got ", state->scalar_type());
  }
  return s;
}

}  // namespace fastattn
