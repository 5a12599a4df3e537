// CUDA glue of the sparse_fwd / sparse_bwd ops: the dense forward and backward
// kernels with a block-sparse schedule (params.sparse). No host sync and no
// reads of device data (CUDA-graph capturable): list values are not checked
// here; the kernels clamp counts and skip out-of-range ids.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cuda/common/params.h"
#include "cuda/flash/launch.h"
#include "torch/bwd_glue.h"
#include "torch/cuda_glue.h"
#include "torch/sparse_problem.h"

namespace fastattn {
namespace {

// Mask blocks must be whole numbers of every kernel's tiles (all divide 128).
constexpr int64_t kKernelBlock = 128;

void check_cuda_sparse(const SparseProblem& sp, const at::Tensor& q) {
  TORCH_CHECK_NOT_IMPLEMENTED((!sp.bias.defined() && !sp.alibi.defined()) || sp.attn.scale != 0.0,
                              "fastattn: a float attn_mask or alibi_slopes with scale=0 is not "
                              "supported by the CUDA kernels (they add bias / scale to the raw scores)");
  if (sp.bias.defined()) glue::check_cuda_devices(q, {{&sp.bias, "attn_mask"}});
  TORCH_CHECK(sp.block_q % kKernelBlock == 0 && sp.block_kv % kKernelBlock == 0,
              "fastattn: the CUDA sparse kernels take BLOCK_SIZE multiples of ", kKernelBlock,
              ", got (", sp.block_q, ", ", sp.block_kv,
              "); fastattn.flex_attention re-blocks other sizes (BlockMask.for_kernels())");
  const SparseLists& l = sp.lists;
  TORCH_CHECK(l.bm * l.hm * l.rows * std::max<int64_t>(l.width, l.full_width) < (int64_t(1) << 31),
              "fastattn: block mask lists too large (>= 2^31 entries)");
  glue::check_cuda_devices(q, {{&l.num, "block mask"},
                               {&l.idx, "block mask"},
                               {&l.full_num, "block mask"},
                               {&l.full_idx, "block mask"},
                               {l.bits_index.defined() ? &l.bits_index : nullptr, "bits_index"},
                               {sp.bits.defined() ? &sp.bits : nullptr, "partial_bits"}});
}

// The kernels read float32 bias: other dtypes are converted before the
// broadcast (a copy of the caller's tensor, not of the expanded one); `keep`
// holds it. A relative table is read from element Sq - 1 with row stride -1
// (params.h).
BiasParams bias_params(const SparseProblem& sp, at::Tensor& keep) {
  BiasParams b;
  if (sp.alibi.defined()) {
    b.slopes = sp.alibi.data_ptr<float>();
    b.slope_stride = sp.alibi.size(0) > 1 ? 1 : 0;
  }
  if (!sp.bias.defined()) return b;
  keep = sp.bias.scalar_type() == at::kFloat
             ? sp.bias
             : sp.bias_raw.to(at::kFloat).expand(sp.bias.sizes());
  b.ptr = keep.data_ptr<float>();
  if (sp.bias_relative) {
    b.ptr += (sp.attn.seqlen_q - 1) * keep.stride(1);
    b.sh = keep.stride(0);
    b.si = -keep.stride(1);
    b.sj = keep.stride(1);
  } else {
    b.sb = keep.stride(0);
    b.sh = keep.stride(1);
    b.si = keep.stride(2);
    b.sj = keep.stride(3);
  }
  return b;
}

// Where the backward writes dL/dbias: a dense (B, Hq, Sq, Sk) tensor, or the
// relative table's (Hq, Sq + Sk - 1) gradient, accumulated in the kernel with
// atomics, or (deterministic) reduced from a dense one afterwards.
at::Tensor bias_grad_target(const SparseProblem& sp, bool deterministic, BiasParams& bp) {
  const AttnProblem& p = sp.attn;
  const auto f32 = sp.bias.options().dtype(at::kFloat);
  if (sp.bias_relative && !deterministic) {
    at::Tensor g = at::zeros({p.heads_q, p.seqlen_q + p.seqlen_k - 1}, f32);
    bp.grad = g.data_ptr<float>() + (p.seqlen_q - 1);
    bp.gh = g.stride(0);
    bp.gi = -1;
    bp.gj = 1;
    bp.grad_accumulate = true;
    return g;
  }
  at::Tensor g = at::zeros({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, f32);
  bp.grad = g.data_ptr<float>();
  bp.gb = g.stride(0);
  bp.gh = g.stride(1);
  bp.gi = g.stride(2);
  bp.gj = 1;
  return g;
}

BlockSparseParams sparse_params(const SparseProblem& sp) {
  const SparseLists& l = sp.lists;
  BlockSparseParams s;
  s.num = l.num.data_ptr<int>();
  s.idx = l.idx.data_ptr<int>();
  s.full_num = l.full_num.data_ptr<int>();
  s.full_idx = l.full_idx.data_ptr<int>();
  if (sp.bits.defined() && sp.bits.numel() > 0) {
    s.bits_index = l.bits_index.data_ptr<int>();
    s.bits = reinterpret_cast<const uint32_t*>(sp.bits.data_ptr<int>());
    s.slots = static_cast<int>(sp.bits.size(0));
  }
  s.bm = static_cast<int>(l.bm);
  s.hm = static_cast<int>(l.hm);
  s.rows = static_cast<int>(l.rows);
  s.cols = static_cast<int>(l.cols);
  s.width = static_cast<int>(l.width);
  s.full_width = static_cast<int>(l.full_width);
  s.block_q = static_cast<int>(sp.block_q);
  s.block_kv = static_cast<int>(sp.block_kv);
  s.words = static_cast<int>(sp.words);
  return s;
}

std::tuple<at::Tensor, at::Tensor> sparse_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const at::Tensor& full_kv_num_blocks,
    const at::Tensor& full_kv_indices, const std::optional<at::Tensor>& kv_bits_index,
    const std::optional<at::Tensor>& partial_bits, int64_t block_q, int64_t block_kv, double scale,
    bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& bias, bool bias_relative,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const SparseProblem sp = check_sparse_args(
      q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_bits_index,
      partial_bits, block_q, block_kv, scale, causal, window_left, window_right, bottom_right, bias,
      bias_relative, alibi_slopes, /*transposed=*/false);
  const at::Tensor rng = checked_dropout(dropout_p, rng_state, q);
  const ElemType dtype = glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k, "k"}, {&v, "v"}});
  check_cuda_sparse(sp, q);
  c10::cuda::CUDAGuard guard(q.device());
  const AttnProblem& prob = sp.attn;
  const int64_t d = prob.head_dim;
  const int64_t dpad = glue::checked_padded_head_dim(q, d, dtype, "forward");

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(prob, q);
  if (out.numel() == 0 || k.size(1) == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const glue::KernelInputs in = glue::kernel_inputs(q, k, v, scale, dpad);
  AttnProblem kp = prob;
  kp.scale = in.scale;
  at::Tensor out_k = in.padded ? at::empty(in.q.sizes(), q.options()) : out;
  if (!glue::kernel_readable(out_k)) out_k = at::empty(in.q.sizes(), q.options());

  FwdParams params;
  glue::fill_fwd_params(params, kp, in.q, in.k, in.v, out_k, lse, std::nullopt, std::nullopt);
  params.sparse = sparse_params(sp);
  at::Tensor bias_f32;
  params.bias = bias_params(sp, bias_f32);
  glue::set_dropout(params.dropout, dropout_p, rng);
  glue::check_launch(gpu::run_fwd(params, at::cuda::getCurrentCUDAStream()), "sparse_fwd");
  if (!out_k.is_same(out)) out.copy_(out_k.narrow(-1, 0, d));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const at::Tensor& full_q_num_blocks,
    const at::Tensor& full_q_indices, const std::optional<at::Tensor>& q_bits_index,
    const std::optional<at::Tensor>& partial_bits, int64_t block_q, int64_t block_kv, double scale,
    bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& bias, bool bias_grad, bool deterministic,
    const std::optional<at::Tensor>& dlse, bool bias_relative,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const SparseProblem sp = check_sparse_args(
      q, k, v, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, q_bits_index,
      partial_bits, block_q, block_kv, scale, causal, window_left, window_right, bottom_right, bias,
      bias_relative, alibi_slopes, /*transposed=*/true);
  const AttnProblem prob = check_bwd_args(dout, q, k, v, out, lse, std::nullopt, std::nullopt, 0, 0,
                                          scale, causal, window_left, window_right, bottom_right);
  TORCH_CHECK(!bias_grad || sp.bias.defined(), "fastattn: bias_grad needs a bias");
  glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k, "k"}, {&v, "v"}});
  check_cuda_sparse(sp, q);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const BlockSparseParams s = sparse_params(sp);
  const at::Tensor dl = checked_dlse(dlse, lse);
  at::Tensor bias_f32;
  BiasParams bp = bias_params(sp, bias_f32);
  at::Tensor dbias = bias_grad ? bias_grad_target(sp, deterministic, bp)
                               : at::empty({0}, q.options().dtype(at::kFloat));
  const at::Tensor rng = checked_dropout(dropout_p, rng_state, q);
  DropoutParams drop;
  glue::set_dropout(drop, dropout_p, rng);
  glue::run_bwd_into(prob, dout, q, k, v, out, lse, std::nullopt, std::nullopt, deterministic, dq,
                     dk, dv, &s, "sparse_bwd", dl.defined() ? dl.data_ptr<float>() : nullptr, &bp,
                     &drop);
  if (bias_grad && sp.bias_relative && !bp.grad_accumulate) dbias = relative_bias_grad(dbias);
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("sparse_fwd", &fastattn::sparse_fwd_cuda);
  m.impl("sparse_bwd", &fastattn::sparse_bwd_cuda);
}
