// The CUDA backward launch shared by the bwd / bwd_into ops and sparse_bwd:
// padded / staged inputs and outputs, the plan, fp32 workspaces, the launch.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "torch/attention_problem.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace glue {

// Gradients of the (checked) problem into dq, dk, dv; `sparse` (nullptr: dense)
// is the backward's block schedule; `what` names the op in launch errors;
// dlse (nullptr: zero) the lse gradient, laid out like lse (BwdParams::dlse);
// bias the additive score bias (and where its gradient goes).
void run_bwd_into(const AttnProblem& prob, const at::Tensor& dout, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, bool deterministic,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  const BlockSparseParams* sparse, const char* what,
                  const float* dlse = nullptr, const BiasParams* bias = nullptr,
                  const DropoutParams* dropout = nullptr);

}  // namespace glue
}  // namespace fastattn
