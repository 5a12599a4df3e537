// CUDA glue of the `fwd` and `paged_fwd` ops: argument checks, params from tensors, launch on
// the current stream. No host sync and no reads of device data (CUDA-graph
// capturable); the kernels clamp untrusted cu_seqlens themselves. (Varlen
// rows outside [cu_seqlens_q[0], cu_seqlens_q[-1]) belong to no sequence and
// are left unwritten: valid cu_seqlens cover all rows, which only a CPU
// cu_seqlens lets check_fwd_args verify without a sync.)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "torch/attention_problem.h"
#include "cuda/flash/launch.h"
#include "cuda/common/params.h"
#include "torch/cuda_glue.h"
#include "torch/paged_problem.h"

namespace fastattn {
namespace {

// out_f32: fwd_partial (O in fp32, see csrc/ops.cpp), else fwd.
std::tuple<at::Tensor, at::Tensor> run_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v,
                                              const std::optional<at::Tensor>& cu_seqlens_q,
                                              const std::optional<at::Tensor>& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k,
                                              double scale, bool causal, int64_t window_left,
                                              int64_t window_right, bool bottom_right,
                                              bool out_f32, double softcap,
                                              const std::optional<at::Tensor>& alibi_slopes,
                                              double dropout_p,
                                              const std::optional<at::Tensor>& rng_state) {
  AttnProblem prob = check_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, scale, causal, window_left, window_right,
                                    bottom_right);
  prob.softcap = checked_softcap(softcap);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, prob.batch, prob.heads_q, q);
  const at::Tensor rng = checked_dropout(dropout_p, rng_state, q);
  const ElemType dtype = glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k, "k"},
                               {&v, "v"},
                               {cu_seqlens_q ? &*cu_seqlens_q : nullptr, "cu_seqlens_q"},
                               {cu_seqlens_k ? &*cu_seqlens_k : nullptr, "cu_seqlens_k"}});
  c10::cuda::CUDAGuard guard(q.device());

  const int64_t d = prob.head_dim;
  const int64_t dpad = glue::checked_padded_head_dim(q, d, dtype, "forward");

  // contiguous, q's shape (the fake's contract)
  const auto out_options = out_f32 ? q.options().dtype(at::kFloat) : q.options();
  at::Tensor out = at::empty(q.sizes(), out_options);
  at::Tensor lse = empty_lse(prob, q);
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const glue::KernelInputs in = glue::kernel_inputs(q, k, v, scale, dpad);
  AttnProblem kp = prob;
  kp.scale = in.scale;
  at::Tensor out_k = in.padded ? at::empty(in.q.sizes(), out_options) : out;
  if (!glue::kernel_readable(out_k)) out_k = at::empty(in.q.sizes(), out_options);

  FwdParams params;
  glue::fill_fwd_params(params, kp, in.q, in.k, in.v, out_k, lse, cu_seqlens_q, cu_seqlens_k);
  // fill_fwd_params takes out's strides in elements, the same for both dtypes.
  if (out_f32) params.out_f32 = out_k.data_ptr<float>();
  glue::set_alibi(params.bias, slopes);
  glue::set_dropout(params.dropout, dropout_p, rng);
  glue::check_launch(gpu::run_fwd(params, at::cuda::getCurrentCUDAStream()), "fwd");

  if (!out_k.is_same(out)) out.copy_(out_k.narrow(-1, 0, d));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& cu_seqlens_q,
                                            const std::optional<at::Tensor>& cu_seqlens_k,
                                            int64_t max_seqlen_q, int64_t max_seqlen_k,
                                            double scale, bool causal, int64_t window_left,
                                            int64_t window_right, bool bottom_right,
                                            bool /*deterministic: only used by bwd*/,
                                            double softcap,
                                            const std::optional<at::Tensor>& alibi_slopes,
                                            double dropout_p,
                                            const std::optional<at::Tensor>& rng_state) {
  return run_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                    window_left, window_right, bottom_right, false, softcap, alibi_slopes,
                    dropout_p, rng_state);
}

std::tuple<at::Tensor, at::Tensor> fwd_partial_cuda(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const std::optional<at::Tensor>& cu_seqlens_q,
                                                    const std::optional<at::Tensor>& cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                    double scale, bool causal, int64_t window_left,
                                                    int64_t window_right, bool bottom_right) {
  return run_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                    window_left, window_right, bottom_right, true, 0.0, std::nullopt, 0.0,
                    std::nullopt);
}

// Chunked prefill over a paged cache: the forward kernel with the paged KV
// loader. Same rules as fwd_cuda; bad device index values are made harmless
// by the kernel (seqlens_k clamped into [0, max_blocks * block_size], page
// ids outside the pool read as zeros).
std::tuple<at::Tensor, at::Tensor> paged_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache,
                                                  const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& seqlens_k,
                                                  const at::Tensor& block_table,
                                                  int64_t max_seqlen_q, double scale, bool causal,
                                                  int64_t window_left, int64_t window_right,
                                                  double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes,
                                                  double dropout_p,
                                                  const std::optional<at::Tensor>& rng_state) {
  PagedFwdProblem pp = check_paged_fwd_args(q, k_cache, v_cache, cu_seqlens_q, seqlens_k,
                                            block_table, max_seqlen_q, scale, causal,
                                            window_left, window_right);
  pp.attn.softcap = checked_softcap(softcap);
  const AttnProblem& prob = pp.attn;
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, prob.batch, prob.heads_q, q);
  const at::Tensor rng = checked_dropout(dropout_p, rng_state, q);
  const ElemType dtype = glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k_cache, "k_cache"},
                               {&v_cache, "v_cache"},
                               {&cu_seqlens_q, "cu_seqlens_q"},
                               {&seqlens_k, "seqlens_k"},
                               {&block_table, "block_table"}});
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(pp.num_blocks <= INT32_MAX, "fastattn: at most 2^31 - 1 cache blocks");
  glue::check_lengths_fit(seqlens_k, pp.max_blocks * pp.block_size, "block_table",
                          "max_blocks * block_size");

  const int64_t d = prob.head_dim;
  const int64_t dpad = glue::checked_padded_head_dim(q, d, dtype, "forward");

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(prob, q);
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  glue::KernelInputs in = glue::kernel_inputs(q, k_cache, v_cache, scale, dpad);
  AttnProblem kp = prob;
  kp.scale = in.scale;
  at::Tensor& kr = in.k;
  at::Tensor& vr = in.v;
  glue::paged_pools_for_kernel(kr, vr);
  at::Tensor out_k = in.padded ? at::empty(in.q.sizes(), q.options()) : out;
  if (!glue::kernel_readable(out_k)) out_k = at::empty(in.q.sizes(), q.options());

  // fill_fwd_params sets the common (varlen) fields; the K/V strides are then
  // set to the pools' page / slot / head strides.
  const at::Tensor lens = seqlens_k.contiguous();
  const at::Tensor table = block_table.contiguous();
  FwdParams params;
  glue::fill_fwd_params(params, kp, in.q, kr, vr, out_k, lse, cu_seqlens_q, cu_seqlens_q);
  params.k_batch_stride = kr.stride(0);
  params.k_row_stride = kr.stride(1);
  params.k_head_stride = kr.stride(2);
  params.v_batch_stride = vr.stride(0);
  params.v_row_stride = vr.stride(1);
  params.v_head_stride = vr.stride(2);
  params.heads_kv = static_cast<int>(prob.heads_kv);
  params.cu_seqlens_k = nullptr;
  params.total_k = 0;
  params.block_table = table.data_ptr<int>();
  params.block_table_batch_stride = table.stride(0);
  params.page_size = static_cast<int>(pp.block_size);
  params.num_pages = static_cast<int>(pp.num_blocks);
  params.seqlens_k = lens.data_ptr<int>();
  glue::set_alibi(params.bias, slopes);
  glue::set_dropout(params.dropout, dropout_p, rng);
  glue::check_launch(gpu::run_fwd(params, at::cuda::getCurrentCUDAStream()), "paged_fwd");

  if (!out_k.is_same(out)) out.copy_(out_k.narrow(-1, 0, d));
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fastattn::fwd_cuda);
  m.impl("fwd_partial", &fastattn::fwd_partial_cuda);
  m.impl("paged_fwd", &fastattn::paged_fwd_cuda);
}
