// CPU backend of linear_recurrent / linear_recurrent_update (schemas:
// csrc/ops.cpp): gathers the initial states (from a pool through
// state_indices, or as given), runs the recurrence of linear_fwd_cpu with a
// single checkpoint per sequence, and returns or scatters the final states.
// Unlike the CUDA kernel, which makes them padding, slots >= the pool's size
// raise here (the CPU can read the indices without a device sync).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/linear_cpu.h"
#include "torch/linear_problem.h"

namespace fastattn::cpu {
namespace {

// Slots of the N sequences as int64, -1 and below meaning padding; raises for
// slots past the pool.
at::Tensor checked_slots(const at::Tensor& indices, int64_t pool_slots) {
  at::Tensor slots = indices.to(at::kLong).contiguous();
  if (slots.numel() > 0) {
    const int64_t top = slots.max().item<int64_t>();
    TORCH_CHECK(top < pool_slots, "fastattn.linear: state_indices name slot ", top,
                " of a state pool with ", pool_slots, " slots");
  }
  return slots;
}

// The initial states of the N sequences from st ((slots, HV, K, V) view):
// st[slots[n]] (padding slots: zeros), or st itself without slots.
at::Tensor gather_states(const at::Tensor& st, const at::Tensor& slots) {
  if (!slots.defined()) return st.contiguous();
  const at::Tensor pad = slots.lt(0).view({-1, 1, 1, 1});
  return at::where(pad, at::zeros({}, st.options()), st.index_select(0, slots.clamp_min(0)))
      .contiguous();
}

at::Tensor l2norm(const at::Tensor& x) {
  return x * at::rsqrt(x.pow(2).sum(-1, /*keepdim=*/true) + 1e-6);
}

// The recurrence from initial states h0 ((N, HV, K, V), or none: zeros).
// -> (out in v's dtype, final states (N, HV, K, V))
std::tuple<at::Tensor, at::Tensor> run_recurrence(
    const LinearRecurrentProblem& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& cu_seqlens, double scale,
    bool delta, bool qk_l2norm) {
  at::Tensor qq = q, kk = k, vv = v;
  if (qk_l2norm) {  // normalized in the state precision, as the CUDA kernel does
    qq = l2norm(q.to(s.state_dtype));
    kk = l2norm(k.to(s.state_dtype));
    vv = v.to(s.state_dtype);
  }
  auto [out, final_state, checkpoints] =
      linear_fwd_cpu(qq.contiguous(), kk.contiguous(), vv.contiguous(), g, beta, h0, cu_seqlens, scale,
                     delta, std::max<int64_t>(s.T, 1));
  return {out.to(v.scalar_type()), final_state};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_recurrent_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& state_indices, const std::optional<at::Tensor>& cu_seqlens,
    double scale, bool delta, bool qk_l2norm, bool state_v_first, bool output_final_state) {
  const LinearRecurrentProblem s = check_linear_recurrent_args(q, k, v, g, beta, initial_state,
                                                               state_indices, cu_seqlens, state_v_first);
  std::optional<at::Tensor> h0;
  if (initial_state) {
    const at::Tensor st = state_v_first ? initial_state->transpose(-1, -2) : *initial_state;
    h0 = gather_states(st, state_indices ? checked_slots(*state_indices, st.size(0)) : at::Tensor());
  }
  auto [out, final_state] =
      run_recurrence(s, q, k, v, g, beta, h0, cu_seqlens, scale, delta, qk_l2norm);
  if (!output_final_state) return {out, at::empty({0}, q.options().dtype(s.state_dtype))};
  if (state_v_first) final_state = final_state.transpose(-1, -2).contiguous();
  return {out, final_state};
}

at::Tensor linear_recurrent_update_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& g,
                                       const std::optional<at::Tensor>& beta, at::Tensor& state,
                                       const std::optional<at::Tensor>& state_indices,
                                       const std::optional<at::Tensor>& cu_seqlens, double scale,
                                       bool delta, bool qk_l2norm, bool state_v_first) {
  const LinearRecurrentProblem s = check_linear_recurrent_args(q, k, v, g, beta, state, state_indices,
                                                               cu_seqlens, state_v_first);
  at::Tensor st = state_v_first ? state.transpose(-1, -2) : state;
  const at::Tensor slots = state_indices ? checked_slots(*state_indices, st.size(0)) : at::Tensor();
  auto [out, final_state] = run_recurrence(s, q, k, v, g, beta, gather_states(st, slots), cu_seqlens,
                                           scale, delta, qk_l2norm);
  if (state_indices) {
    const at::Tensor keep = slots.ge(0).nonzero().view({-1});
    st.index_copy_(0, slots.index_select(0, keep), final_state.index_select(0, keep));
  } else {
    st.copy_(final_state);
  }
  return out;
}

}  // namespace fastattn::cpu
