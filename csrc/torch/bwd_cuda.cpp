// CUDA glue of the `bwd` op: argument checks, params and fp32 workspaces from
// tensors, launch on the current stream. No host sync and no reads of device
// data (CUDA-graph capturable); the kernels clamp untrusted cu_seqlens.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "torch/attention_problem.h"
#include "cuda/flash/launch.h"
#include "cuda/common/params.h"
#include "torch/cuda_glue.h"
#include "torch/bwd_glue.h"

namespace fastattn {
namespace {

// (batch, row, head) strides of a (B, S, H, D) tensor, or (0, row, head) of a
// varlen (T, H, D) one.
void layout_strides(const at::Tensor& t, bool varlen, int64_t& bs, int64_t& rs, int64_t& hs) {
  if (varlen) {
    bs = 0;
    rs = t.stride(0);
    hs = t.stride(1);
  } else {
    bs = t.stride(0);
    rs = t.stride(1);
    hs = t.stride(2);
  }
}

// Writes the gradients into dq, dk, dv (q's, k's, v's shapes and dtype, any
// strides with a contiguous last dim: e.g. slices of one packed dqkv buffer,
// which is how flash_attn_qkvpacked_func avoids a copy of the gradients).
void bwd_into_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const std::optional<at::Tensor>& cu_seqlens_q,
                   const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                   int64_t max_seqlen_k, double scale, bool causal, int64_t window_left,
                   int64_t window_right, bool bottom_right, bool deterministic,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                   double softcap, const std::optional<at::Tensor>& dlse,
                   const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                   const std::optional<at::Tensor>& rng_state) {
  AttnProblem prob =
      check_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, causal, window_left, window_right, bottom_right);
  prob.softcap = checked_softcap(softcap);
  check_grad_outputs(q, k, v, dq, dk, dv);
  const at::Tensor dl = checked_dlse(dlse, lse);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, prob.batch, prob.heads_q, q);
  const at::Tensor rng = checked_dropout(dropout_p, rng_state, q);
  BiasParams alibi;
  glue::set_alibi(alibi, slopes);
  DropoutParams drop;
  glue::set_dropout(drop, dropout_p, rng);
  glue::run_bwd_into(prob, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, deterministic, dq,
                     dk, dv, nullptr, "bwd", dl.defined() ? dl.data_ptr<float>() : nullptr,
                     slopes.defined() ? &alibi : nullptr, &drop);
}

}  // namespace

namespace glue {

void run_bwd_into(const AttnProblem& prob, const at::Tensor& dout, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, bool deterministic,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  const BlockSparseParams* sparse, const char* what, const float* dlse,
                  const BiasParams* bias, const DropoutParams* dropout) {
  const ElemType dtype = glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k, "k"},
                               {&v, "v"},
                               {&dout, "dout"},
                               {&out, "out"},
                               {&lse, "lse"},
                               {cu_seqlens_q ? &*cu_seqlens_q : nullptr, "cu_seqlens_q"},
                               {cu_seqlens_k ? &*cu_seqlens_k : nullptr, "cu_seqlens_k"},
                               {&dq, "dq"},
                               {&dk, "dk"},
                               {&dv, "dv"}});
  c10::cuda::CUDAGuard guard(q.device());

  const int64_t d = prob.head_dim;
  const int64_t dpad = glue::checked_padded_head_dim(q, d, dtype, "backward");

  // Varlen: k/v rows outside every sequence get zero gradients.
  if (prob.varlen) {
    dk.zero_();
    dv.zero_();
  }
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }

  // cp.async reads 16-byte chunks: unaligned views and head dims that are not
  // a multiple of 8 go through zero-padded copies (rare path).
  std::vector<at::Tensor> in = {q, k, v, out, dout};
  bool padded = false;
  for (auto& t : in) {
    if (!glue::kernel_readable(t)) t = glue::kernel_readable_copy(t, dpad);
    padded = padded || t.size(-1) != d;
  }
  if (padded) {
    const std::vector<at::Tensor> orig = {q, k, v, out, dout};
    for (size_t i = 0; i < in.size(); ++i) {
      if (in[i].size(-1) != dpad) in[i] = glue::kernel_readable_copy(orig[i], dpad);
    }
  }
  const at::Tensor &qr = in[0], &kr = in[1], &vr = in[2], &outr = in[3], &doutr = in[4];
  // Gradients the kernels cannot store to directly (padded head dim, or
  // strides that are not 16-byte multiples) go through temporaries.
  const bool staged = padded || !glue::kernel_readable(dq) || !glue::kernel_readable(dk) ||
                      !glue::kernel_readable(dv);
  at::Tensor dq_k = staged ? at::empty(qr.sizes(), dq.options()) : dq;
  at::Tensor dk_k = staged ? at::zeros(kr.sizes(), dk.options()) : dk;
  at::Tensor dv_k = staged ? at::zeros(vr.sizes(), dv.options()) : dv;

  BwdParams p;
  glue::fill_fwd_params(p, prob, qr, kr, vr, outr, lse, cu_seqlens_q, cu_seqlens_k);
  p.dout = doutr.data_ptr();
  layout_strides(doutr, prob.varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.dq = dq_k.data_ptr();
  p.dk = dk_k.data_ptr();
  p.dv = dv_k.data_ptr();
  layout_strides(dq_k, prob.varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  layout_strides(dk_k, prob.varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  layout_strides(dv_k, prob.varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.deterministic = deterministic;
  // bwd_partial: fp32 gradients of 16-bit inputs (checked by its caller).
  p.grads_f32 = dq.scalar_type() == at::kFloat && q.scalar_type() != at::kFloat;
  if (sparse != nullptr) p.sparse = *sparse;
  p.dlse = dlse;
  if (bias != nullptr) p.bias = *bias;
  if (dropout != nullptr) p.dropout = *dropout;

  const gpu::BwdPlan plan = gpu::plan_bwd(p);
  TORCH_CHECK(plan.kernel_head_dim > 0, "fastattn: no CUDA backward kernel for head_dim ", d);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(plan.smem_bytes) <= prop->sharedMemPerBlockOptin,
              "fastattn: the CUDA backward for head_dim ", d, " needs ", plan.smem_bytes,
              " bytes of shared memory per block, but ", prop->name, " allows ",
              prop->sharedMemPerBlockOptin, " (sm80/sm90-class GPUs have enough)");
  p.smem_optin = static_cast<int>(prop->sharedMemPerBlockOptin);
  p.heads_per_cta = plan.heads_per_cta;
  p.dq_splits = plan.dq_splits;
  p.dkv_copies = plan.dkv_copies;

  const auto f32 = q.options().dtype(at::kFloat);
  // D = rowsum(dO * O) and lse * log2(e), each laid out like lse (contiguous).
  at::Tensor dsum = at::empty({2 * lse.numel()}, f32);
  at::Tensor dq_accum = at::empty({plan.dq_accum_elems}, f32);  // zeroed by the preprocess kernel
  at::Tensor dk_accum, dv_accum;
  if (plan.dkv_accum_elems > 0) {
    dk_accum = at::zeros({plan.dkv_accum_elems}, f32);
    dv_accum = at::zeros({plan.dkv_accum_elems}, f32);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
  }
  p.dsoftmax_sum = dsum.data_ptr<float>();
  p.lse_log2 = p.dsoftmax_sum + lse.numel();
  p.dq_accum = dq_accum.data_ptr<float>();

  glue::check_launch(gpu::run_bwd(p, at::cuda::getCurrentCUDAStream()), what);

  if (staged) {
    dq.copy_(dq_k.narrow(-1, 0, d));
    dk.copy_(dk_k.narrow(-1, 0, d));
    dv.copy_(dv_k.narrow(-1, 0, d));
  }
}

}  // namespace glue

namespace {

// Fresh contiguous gradients with the shapes of q, k, v (the fake kernels' contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic, double softcap, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  bwd_into_cuda(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, causal, window_left, window_right, bottom_right, deterministic, dq, dk, dv,
                softcap, dlse, alibi_slopes, dropout_p, rng_state);
  return {dq, dk, dv};
}

// bwd_partial: the gradients in fp32 (see csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_partial_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic) {
  const AttnProblem prob =
      check_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, causal, window_left, window_right, bottom_right);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), f32);
  at::Tensor dk = at::empty(k.sizes(), f32);
  at::Tensor dv = at::empty(v.sizes(), f32);
  glue::run_bwd_into(prob, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, deterministic, dq,
                     dk, dv, nullptr, "bwd_partial");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("bwd", &fastattn::bwd_cuda);
  m.impl("bwd_into", &fastattn::bwd_into_cuda);
  m.impl("bwd_partial", &fastattn::bwd_partial_cuda);
}
