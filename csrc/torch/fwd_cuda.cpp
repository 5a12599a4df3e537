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

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "torch/attention_problem.h"
#include "cuda/flash/launch.h"
#include "cuda/mixed/mixed_launch.h"
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

// The mixed op's plan (csrc/ops.cpp mixed_fwd): its work table and the decode
// role's launch shape.
struct MixedPlanArgs {
  const at::Tensor* work;
  int64_t decode_max_q;
  int64_t num_splits;
  int64_t warps_m;
};

// The decode role of a mixed launch: the paged decode kernel over the tensors
// the forward role reads (fwd: its filled FwdParams), with ragged queries
// (rows of q / out and columns of lse from cu_seqlens_q; batch strides 0).
void fill_mixed_decode_params(DecodeParams& p, const FwdParams& fwd, const at::Tensor& q,
                              const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& cu_seqlens_q, const MixedPlanArgs& plan) {
  p.q = fwd.q;
  p.k = fwd.k;
  p.v = fwd.v;
  p.out = fwd.out;
  p.lse = fwd.lse;
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_batch_stride = fwd.k_batch_stride;
  p.k_row_stride = fwd.k_row_stride;
  p.k_head_stride = fwd.k_head_stride;
  p.v_batch_stride = fwd.v_batch_stride;
  p.v_row_stride = fwd.v_row_stride;
  p.v_head_stride = fwd.v_head_stride;
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.lse_head_stride = lse.stride(0);
  p.seqlens_k = fwd.seqlens_k;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.block_table = fwd.block_table;
  p.block_table_batch_stride = fwd.block_table_batch_stride;
  p.page_size = fwd.page_size;
  p.batch = fwd.batch;
  p.seqlen_q = static_cast<int>(plan.decode_max_q);
  p.heads_q = fwd.heads_q;
  p.heads_kv = fwd.heads_kv;
  p.head_dim = fwd.head_dim;
  p.cache_batch = fwd.num_pages;
  p.seqlen_k_max = fwd.seqlen_k;
  p.scale = fwd.scale;
  p.scale_log2 = fwd.scale_log2;
  p.softcap_in = fwd.softcap_in;
  p.softcap_out = fwd.softcap_out;
  p.mask = fwd.mask;
  p.mask.bottom_right = true;
  p.dtype = fwd.dtype;
  p.num_sms = fwd.num_sms;
  p.num_splits = static_cast<int>(plan.num_splits);
  p.warps_m = static_cast<int>(plan.warps_m);
}

// Chunked prefill over a paged cache: the forward kernel with the paged KV
// loader (mixed == nullptr), or the mixed kernel running the plan's work
// table (prefill tiles of that kernel and CTAs of the paged decode kernel).
// Same rules as fwd_cuda; bad device index values are made harmless by the
// kernels (seqlens_k clamped into [0, max_blocks * block_size], page ids
// outside the pool read as zeros).
std::tuple<at::Tensor, at::Tensor> run_paged_fwd_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k, const at::Tensor& block_table,
    int64_t max_seqlen_q, double scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const MixedPlanArgs* mixed) {
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
  if (mixed == nullptr) {
    glue::check_launch(gpu::run_fwd(params, at::cuda::getCurrentCUDAStream()), "paged_fwd");
  } else {
    MixedParams mp;
    mp.fwd = params;
    mp.work = mixed->work->data_ptr<int>();
    mp.num_work = static_cast<int>(mixed->work->size(0));
    fill_mixed_decode_params(mp.dec, params, in.q, out_k, lse, cu_seqlens_q, *mixed);
    mp.dec.alibi_slopes = params.bias.slopes;
    mp.dec.alibi_batch_stride = params.bias.slope_batch_stride;
    glue::check_launch(gpu::run_mixed(mp, at::cuda::getCurrentCUDAStream()), "mixed_fwd");
  }

  if (!out_k.is_same(out)) out.copy_(out_k.narrow(-1, 0, d));
  return {out, lse};
}

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
  return run_paged_fwd_op(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, max_seqlen_q,
                          scale, causal, window_left, window_right, softcap, alibi_slopes,
                          dropout_p, rng_state, nullptr);
}

std::tuple<at::Tensor, at::Tensor> mixed_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k, const at::Tensor& block_table,
    const at::Tensor& work, int64_t max_seqlen_q, int64_t decode_max_q, int64_t num_splits,
    int64_t warps_m, double scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_mixed_plan_args(q, work, max_seqlen_q, decode_max_q, num_splits, warps_m);
  TORCH_CHECK(work.is_cuda() && work.device() == q.device(),
              "fastattn: mixed_fwd: work must be on q's device (", q.device(), "), got ",
              work.device());
  // Each CTA reads its row as one int4.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(work.data_ptr()) % 16 == 0,
              "fastattn: mixed_fwd: work must be 16-byte aligned (a fresh tensor, not an offset view)");
  const int64_t d = q.size(-1);
  TORCH_CHECK_NOT_IMPLEMENTED(gpu::mixed_supported(static_cast<int>(d), glue::cuda_elem_type(q)),
                              "fastattn: mixed_fwd: no one-launch kernel for head dim ", d,
                              " in this build (head dims <= 128; BatchAttention plans two "
                              "launches for the others)");
  const MixedPlanArgs mixed{&work, decode_max_q, num_splits, warps_m};
  return run_paged_fwd_op(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, max_seqlen_q,
                          scale, causal, window_left, window_right, softcap, alibi_slopes, 0.0,
                          std::nullopt, &mixed);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fastattn::fwd_cuda);
  m.impl("fwd_partial", &fastattn::fwd_partial_cuda);
  m.impl("paged_fwd", &fastattn::paged_fwd_cuda);
  m.impl("mixed_fwd", &fastattn::mixed_fwd_cuda);
}
