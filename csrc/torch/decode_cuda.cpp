// CUDA glue of the decode / merge_states / merge_states_n / append_kv ops:
// argument checks (shared with the CPU backend: decode_problem.h), params from
// tensors, launch on the current stream. No host sync and no reads of device
// data: launch shapes depend only on tensor sizes, so a captured CUDA graph
// replays correctly with new seqlens_k / cache_batch_idx / slot_mapping
// contents.
//
// Device index tensors cannot be validated on the host (that would sync), so
// the kernels make bad values harmless instead of raising:
//   seqlens_k[b] outside [0, S_max]      clamped into it (only under CUDA-graph
//                                        capture: otherwise max(seqlens_k) > S_max
//                                        raises, one host read, check_lengths_fit)
//   cache_batch_idx[b] outside [0, B_cache)  sequence b is empty: out 0, lse -inf
//   slot_mapping[n] < 0 or >= rows * S    token n is skipped (nothing written)
//   block_table page id outside [0, num_blocks)  that page's rows read as zeros
// (The CPU backend checks these values and raises.)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/decode/decode_launch.h"
#include "cuda/decode/decode_params.h"
#include "torch/cuda_glue.h"
#include "torch/decode_problem.h"

namespace fastattn {
namespace {

// FASTATTN_DECODE_LOG=1 prints each decode launch plan to stderr (dev aid for
// tuning the split heuristic; scripts/dev_decode_check.py toggles it per call).
bool decode_log_enabled() {
  const char* v = std::getenv("FASTATTN_DECODE_LOG");
  return v != nullptr && v[0] == '1';
}

KvKind fp8_kind(const at::Tensor& cache) {
  return cache.scalar_type() == at::kFloat8_e4m3fn ? KvKind::kE4M3 : KvKind::kE5M2;
}

// An FP8 cache's scale (checked_kv_scale) as the kernels' pointer and strides (untouched
// when absent: nullptr reads as 1).
void set_kv_scale(const KvScale& s, const float*& ptr, int64_t& row_stride, int64_t& head_stride) {
  if (!s.t.defined()) return;
  ptr = s.t.data_ptr<float>();
  row_stride = s.row_stride;
  head_stride = s.head_stride;
}

std::tuple<at::Tensor, at::Tensor> decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const std::optional<at::Tensor>& seqlens_k,
                                               const std::optional<at::Tensor>& cache_batch_idx,
                                               const std::optional<at::Tensor>& block_table,
                                               double scale, bool causal, int64_t window_left,
                                               int64_t window_right, int64_t num_splits,
                                               double softcap,
                                               const std::optional<at::Tensor>& alibi_slopes,
                                               const std::optional<at::Tensor>& cache_leftpad,
                                               const std::optional<at::Tensor>& k_descale,
                                               const std::optional<at::Tensor>& v_descale,
                                               const std::optional<at::Tensor>& tree_mask) {
  DecodeProblem prob = check_decode_args(q, k_cache, v_cache, seqlens_k, cache_batch_idx,
                                         block_table, scale, causal, window_left, window_right,
                                         num_splits);
  const KvScale kd = checked_kv_scale(k_descale, "k_descale", prob.fp8_kv, prob.batch, "batch",
                                      prob.heads_kv, q);
  const KvScale vd = checked_kv_scale(v_descale, "v_descale", prob.fp8_kv, prob.batch, "batch",
                                      prob.heads_kv, q);
  const at::Tensor tree = checked_tree_mask(tree_mask, prob, q);
  prob.softcap = checked_softcap(softcap);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, prob.batch, prob.heads_q, q);
  const at::Tensor leftpad = checked_cache_leftpad(cache_leftpad, prob, q);
  const ElemType dtype = glue::cuda_elem_type(q);
  glue::check_cuda_devices(q, {{&k_cache, "k_cache"},
                               {&v_cache, "v_cache"},
                               {seqlens_k ? &*seqlens_k : nullptr, "seqlens_k"},
                               {cache_batch_idx ? &*cache_batch_idx : nullptr, "cache_batch_idx"},
                               {block_table ? &*block_table : nullptr, "block_table"}});
  c10::cuda::CUDAGuard guard(q.device());

  TORCH_CHECK(prob.heads_kv <= 65535, "fastattn: at most 65535 key/value heads are supported by "
              "the CUDA decode kernel, got ", prob.heads_kv);
  TORCH_CHECK(prob.batch <= INT32_MAX && prob.seqlen_q <= INT32_MAX && prob.heads_q <= INT32_MAX &&
                  prob.cache_rows <= INT32_MAX,
              "fastattn: decode sizes must fit in int32");
  TORCH_CHECK(num_splits <= 1024, "fastattn: num_splits must be <= 1024, got ", num_splits);

  if (seqlens_k.has_value()) {
    if (prob.paged) {
      glue::check_lengths_fit(*seqlens_k, prob.max_seqlen_k, "block_table",
                              "max_blocks * block_size");
    } else {
      glue::check_lengths_fit(*seqlens_k, prob.max_seqlen_k, "k_cache", "its seqlen dim");
    }
  }

  const int64_t d = prob.head_dim;
  const int64_t dpad = glue::checked_padded_head_dim(q, d, dtype, "decode");

  auto [out, lse] = empty_decode_outputs(prob, q);
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  // An unaligned or odd-head-dim cache is copied (correct but slow: allocate
  // caches with head_dim % 8 == 0 and 16-byte aligned strides, as every usual
  // layout is).
  glue::KernelInputs in = glue::kernel_inputs(q, k_cache, v_cache, scale, dpad);
  const at::Tensor& qr = in.q;
  at::Tensor& kr = in.k;
  at::Tensor& vr = in.v;
  const double kscale = in.scale;
  const bool padded = in.padded;
  if (prob.paged) glue::paged_pools_for_kernel(kr, vr);
  at::Tensor out_k = padded ? at::empty({prob.batch, prob.seqlen_q, prob.heads_q, dpad}, q.options())
                            : out;

  // Index tensors: contiguous int32 (a no-op for the usual 1-D tensors).
  at::Tensor sl = seqlens_k ? seqlens_k->contiguous() : at::Tensor();
  at::Tensor cbi = cache_batch_idx ? cache_batch_idx->contiguous() : at::Tensor();
  at::Tensor bt = block_table ? block_table->contiguous() : at::Tensor();

  DecodeParams p;
  p.q = qr.data_ptr();
  p.k = kr.data_ptr();
  p.v = vr.data_ptr();
  p.out = out_k.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = qr.stride(0);
  p.q_row_stride = qr.stride(1);
  p.q_head_stride = qr.stride(2);
  p.k_batch_stride = kr.stride(0);
  p.k_row_stride = kr.stride(1);
  p.k_head_stride = kr.stride(2);
  p.v_batch_stride = vr.stride(0);
  p.v_row_stride = vr.stride(1);
  p.v_head_stride = vr.stride(2);
  p.o_batch_stride = out_k.stride(0);
  p.o_row_stride = out_k.stride(1);
  p.o_head_stride = out_k.stride(2);
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.seqlens_k = sl.defined() ? sl.data_ptr<int>() : nullptr;
  p.cache_batch_idx = cbi.defined() ? cbi.data_ptr<int>() : nullptr;
  p.cache_leftpad = leftpad.defined() ? leftpad.data_ptr<int>() : nullptr;
  if (bt.defined()) {  // paged: batch strides are page strides, cache_batch the page count
    p.block_table = bt.data_ptr<int>();
    p.block_table_batch_stride = bt.stride(0);
    p.block_table_head_stride = bt.dim() == 3 ? bt.stride(1) : 0;
    p.page_size = static_cast<int>(prob.cache_seqlen);
  }
  p.batch = static_cast<int>(prob.batch);
  p.seqlen_q = static_cast<int>(prob.seqlen_q);
  p.heads_q = static_cast<int>(prob.heads_q);
  p.heads_kv = static_cast<int>(prob.heads_kv);
  p.head_dim = static_cast<int>(qr.size(-1));
  p.cache_batch = static_cast<int>(prob.cache_rows);
  p.seqlen_k_max = static_cast<int>(prob.max_seqlen_k);
  p.scale = static_cast<float>(kscale);
  p.scale_log2 = static_cast<float>(kscale * 1.4426950408889634);
  glue::set_softcap(p.softcap_in, p.softcap_out, kscale, prob.softcap);
  if (slopes.defined()) {
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? slopes.size(1) : 0;
  }
  p.mask.window_left = glue::clamp_window(prob.window_left, prob.seqlen_q, prob.max_seqlen_k);
  p.mask.window_right = glue::clamp_window(prob.window_right, prob.seqlen_q, prob.max_seqlen_k);
  p.mask.bottom_right = true;
  p.dtype = dtype;
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor tree_bits;
  if (tree.defined()) {
    // Row i's draft-key bits as one 64-bit word (device ops: no sync).
    const at::Tensor shifts = at::arange(prob.seqlen_q, q.options().dtype(at::kLong));
    tree_bits = at::bitwise_left_shift(tree.to(at::kLong), shifts).sum(-1).contiguous();
    p.tree_mask = reinterpret_cast<const uint64_t*>(tree_bits.data_ptr<int64_t>());
    p.tree_mask_batch_stride = tree_bits.stride(0);
  }
  if (prob.fp8_kv) {
    p.kv_kind = fp8_kind(k_cache);
    set_kv_scale(kd, p.k_descale, p.k_descale_batch_stride, p.k_descale_head_stride);
    set_kv_scale(vd, p.v_descale, p.v_descale_batch_stride, p.v_descale_head_stride);
  }

  const gpu::DecodePlan plan = gpu::plan_decode(p, static_cast<int>(num_splits));
  TORCH_CHECK(plan.kernel_head_dim > 0, "fastattn: no CUDA decode kernel for head_dim ", d);
  TORCH_CHECK(plan.stages > 0, "fastattn: this GPU's shared memory per block is too small for the "
              "decode kernel at head_dim ", d, " (needs ", 2 * (plan.kernel_head_dim + 8) * 64 * 2 * 2,
              " bytes)");
  gpu::apply_decode_plan(p, plan);
  if (decode_log_enabled()) {
    std::fprintf(stderr,
                 "fastattn decode: B=%d Sq=%d Hq=%d Hkv=%d D=%d S_max=%d kv=%d -> kernel_d=%d "
                 "splits=%d m_blocks=%d warps_m=%d stages=%d ctas/SM=%d SMs=%d tma=%d "
                 "cluster_combine=%d\n",
                 p.batch, p.seqlen_q, p.heads_q, p.heads_kv, p.head_dim, p.seqlen_k_max,
                 static_cast<int>(p.kv_kind), plan.kernel_head_dim, plan.num_splits,
                 plan.num_m_blocks, plan.warps_m, plan.stages, plan.ctas_per_sm, p.num_sms,
                 plan.use_tma ? 1 : 0, plan.combine_in_cluster ? 1 : 0);
  }

  at::Tensor workspace;
  if (plan.o_partial_elems > 0) {
    workspace = at::empty({plan.o_partial_elems + plan.lse_partial_elems},
                          q.options().dtype(at::kFloat));
    p.o_partial = workspace.data_ptr<float>();
    p.lse_partial = p.o_partial + plan.o_partial_elems;  // o_partial_elems % 8 == 0: aligned
  }
  glue::check_launch(gpu::run_decode(p, at::cuda::getCurrentCUDAStream()), "decode");

  if (!out_k.is_same(out)) out.copy_(out_k.narrow(-1, 0, d));
  return {out, lse};
}

MergeType merge_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat,
              "fastattn: the CUDA merge takes float16, bfloat16 or float32 outputs, got ", s,
              " (float64 runs on the CPU backend)");
  return s == at::kHalf ? MergeType::kFloat16
                        : (s == at::kBFloat16 ? MergeType::kBFloat16 : MergeType::kFloat32);
}

// Fills one view of MergeParams from out (outer, S, H, D) / lse (outer, H, S) views.
void set_merge_view(MergeParams& m, int v, const at::Tensor& out, const at::Tensor& lse) {
  m.in[v] = out.data_ptr();
  m.in_outer_stride[v] = out.stride(0);
  m.in_seq_stride[v] = out.stride(1);
  m.in_head_stride[v] = out.stride(2);
  m.lse_in[v] = lse.data_ptr<float>();
  m.lse_outer_stride[v] = lse.stride(0);
  m.lse_head_stride[v] = lse.stride(1);
  m.lse_seq_stride[v] = lse.stride(2);
}

void set_merge_sizes(MergeParams& m, const MergeProblem& prob, const at::Tensor& out,
                     const at::Tensor& lse, MergeType type) {
  TORCH_CHECK(prob.seqlen <= INT32_MAX && prob.heads <= INT32_MAX && prob.head_dim <= INT32_MAX &&
                  prob.parts <= INT32_MAX,
              "fastattn: merge sizes must fit in int32");
  m.out = out.data_ptr();
  m.lse_out = lse.data_ptr<float>();
  m.outer = prob.outer;
  m.seqlen = static_cast<int>(prob.seqlen);
  m.heads = static_cast<int>(prob.heads);
  m.head_dim = static_cast<int>(prob.head_dim);
  m.num_parts = static_cast<int>(prob.parts);
  m.in_type = type;
  m.out_type = type;
}

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& out_a,
                                                     const at::Tensor& lse_a,
                                                     const at::Tensor& out_b,
                                                     const at::Tensor& lse_b) {
  const MergeProblem prob = check_merge_args(out_a, lse_a, out_b, lse_b);
  const MergeType type = merge_type(out_a);
  glue::check_cuda_devices(out_a, {{&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}});
  c10::cuda::CUDAGuard guard(out_a.device());
  auto [out, lse] = empty_merge_outputs(prob, out_a);
  if (lse.numel() == 0) return {out, lse};

  const std::vector<int64_t> o4 = {prob.outer, prob.seqlen, prob.heads, prob.head_dim};
  const std::vector<int64_t> l3 = {prob.outer, prob.heads, prob.seqlen};
  // reshape keeps views where the leading dims collapse (always for usual layouts).
  const at::Tensor a = out_a.reshape(o4), b = out_b.reshape(o4);
  const at::Tensor la = lse_a.reshape(l3), lb = lse_b.reshape(l3);
  MergeParams m;
  m.two_views = true;
  set_merge_view(m, 0, a, la);
  set_merge_view(m, 1, b, lb);
  set_merge_sizes(m, prob, out, lse, type);
  glue::check_launch(gpu::run_merge(m, at::cuda::getCurrentCUDAStream()), "merge_states");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_n_cuda(const at::Tensor& outs,
                                                       const at::Tensor& lses) {
  const MergeProblem prob = check_merge_n_args(outs, lses);
  const MergeType type = merge_type(outs);
  glue::check_cuda_devices(outs, {{&lses, "lses"}});
  c10::cuda::CUDAGuard guard(outs.device());
  auto [out, lse] = empty_merge_outputs(prob, outs);
  if (lse.numel() == 0) return {out, lse};

  const at::Tensor a = outs.reshape({prob.parts, prob.outer, prob.seqlen, prob.heads, prob.head_dim});
  const at::Tensor l = lses.reshape({prob.parts, prob.outer, prob.heads, prob.seqlen});
  MergeParams m;
  m.two_views = false;
  set_merge_view(m, 0, a.select(0, 0), l.select(0, 0));
  m.in[0] = a.data_ptr();  // part 0 (select keeps the pointer; stated for clarity)
  m.lse_in[0] = l.data_ptr<float>();
  m.in_part_stride = a.stride(0);
  m.lse_part_stride = l.stride(0);
  set_merge_sizes(m, prob, out, lse, type);
  glue::check_launch(gpu::run_merge(m, at::cuda::getCurrentCUDAStream()), "merge_states_n");
  return {out, lse};
}

void append_kv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot_mapping,
                    at::Tensor& k_cache, at::Tensor& v_cache,
                    const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  const AppendProblem prob = check_append_args(k, v, slot_mapping, k_cache, v_cache);
  const KvScale ks = checked_kv_scale(k_scale, "k_scale", prob.fp8_cache, prob.num_tokens,
                                      "tokens", prob.heads_kv, k_cache);
  const KvScale vs = checked_kv_scale(v_scale, "v_scale", prob.fp8_cache, prob.num_tokens,
                                      "tokens", prob.heads_kv, k_cache);
  glue::check_cuda_devices(k_cache, {{&k, "k"}, {&v, "v"}, {&slot_mapping, "slot_mapping"},
                                     {&v_cache, "v_cache"}});
  if (prob.fp8_cache) {
    for (const at::Tensor* c : {&k_cache, &v_cache}) {
      TORCH_CHECK(reinterpret_cast<uintptr_t>(c->data_ptr()) % 2 == 0 && c->stride(0) % 2 == 0 &&
                      c->stride(1) % 2 == 0 && c->stride(2) % 2 == 0,
                  "fastattn: FP8 caches must have even strides and an even data pointer (codes are "
                  "written in pairs), got strides ", c->strides());
    }
    TORCH_CHECK(k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16,
                "fastattn: the CUDA append into an FP8 cache takes float16 or bfloat16 k / v, got ",
                k.scalar_type(), " (cast them first)");
  }
  c10::cuda::CUDAGuard guard(k_cache.device());
  if (prob.num_tokens == 0 || k.numel() == 0) return;
  TORCH_CHECK(prob.heads_kv <= INT32_MAX && prob.head_dim <= INT32_MAX,
              "fastattn: append_kv sizes must fit in int32");
  const at::Tensor slots = slot_mapping.contiguous();
  AppendKvParams p;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.kc_row_stride = k_cache.stride(0);
  p.kc_pos_stride = k_cache.stride(1);
  p.kc_head_stride = k_cache.stride(2);
  p.vc_row_stride = v_cache.stride(0);
  p.vc_pos_stride = v_cache.stride(1);
  p.vc_head_stride = v_cache.stride(2);
  p.num_tokens = prob.num_tokens;
  p.rows = prob.rows;
  p.row_len = prob.row_len;
  p.heads_kv = static_cast<int>(prob.heads_kv);
  p.head_dim = static_cast<int>(prob.head_dim);
  p.elem_bytes = static_cast<int>(k_cache.element_size());
  if (prob.fp8_cache) {
    p.cache_kind = fp8_kind(k_cache);
    p.src_dtype = k.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
    set_kv_scale(ks, p.k_scale, p.k_scale_token_stride, p.k_scale_head_stride);
    set_kv_scale(vs, p.v_scale, p.v_scale_token_stride, p.v_scale_head_stride);
  }
  glue::check_launch(gpu::run_append_kv(p, at::cuda::getCurrentCUDAStream()), "append_kv");
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("decode", &fastattn::decode_cuda);
  m.impl("merge_states", &fastattn::merge_states_cuda);
  m.impl("merge_states_n", &fastattn::merge_states_n_cuda);
  m.impl("append_kv", &fastattn::append_kv_cuda);
}
