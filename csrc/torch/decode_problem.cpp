#include "torch/decode_problem.h"

#include <cmath>
#include <utility>

#include "torch/attention_problem.h"
#include "torch/index_checks.h"

namespace fastattn {

bool is_fp8_kv_dtype(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

void check_q_and_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t q_rank, const char* q_name, const char* q_layout,
                        const char* cache_layout, bool allow_fp8_cache) {
  TORCH_CHECK(q.defined() && k_cache.defined() && v_cache.defined(),
              "fastattn: q, k_cache and v_cache must be defined");
  TORCH_CHECK(q.dim() == q_rank, "fastattn: ", q_name, " must be ", q_rank, "-D ", q_layout,
              ", got ", q.dim(), "-D shape ", q.sizes());
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->dim() == 4, "fastattn: ", name, " must be 4-D ", cache_layout, "; got ",
                t->dim(), "-D shape ", t->sizes());
  }
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              "fastattn: q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  if (is_fp8_kv_dtype(k_cache.scalar_type()) || is_fp8_kv_dtype(v_cache.scalar_type())) {
    TORCH_CHECK_NOT_IMPLEMENTED(allow_fp8_cache, "fastattn: FP8 KV caches (", k_cache.scalar_type(),
                                ") are read in the kernel by decode only; this op takes 16-bit "
                                "caches (flash_attn_varlen_func's paged prefill dequantizes FP8 "
                                "pages for it)");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(),
                "fastattn: k_cache and v_cache must share one dtype, got ", k_cache.scalar_type(),
                " and ", v_cache.scalar_type());
    TORCH_CHECK(q.size(-1) % 16 == 0, "fastattn: FP8 KV caches need a head_dim that is a "
                "multiple of 16, got ", q.size(-1));
  } else {
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                "fastattn: q, k_cache and v_cache must share one dtype, got ", q.scalar_type(), ", ",
                k_cache.scalar_type(), ", ", v_cache.scalar_type());
  }
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device(),
              "fastattn: q, k_cache and v_cache must be on one device, got ", q.device(), ", ",
              k_cache.device(), ", ", v_cache.device());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(),
              "fastattn: k_cache and v_cache must have the same shape, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  // Heads and head dim: q's are its last two dims in both layouts.
  const int64_t head_dim = q.size(-1), heads_q = q.size(-2), heads_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim,
              "fastattn: q and k_cache must have the same head_dim, got ", head_dim, " and ",
              k_cache.size(3));
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "fastattn: head_dim must be in [1, ",
              kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK(heads_q >= 1 && heads_kv >= 1, "fastattn: heads must be >= 1, got q heads ",
              heads_q, " and cache heads ", heads_kv);
  TORCH_CHECK(heads_q % heads_kv == 0, "fastattn: the number of query heads (", heads_q,
              ") must be divisible by the number of key/value heads of the cache (", heads_kv,
              ")");
}

DecodeProblem check_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache,
                                const std::optional<at::Tensor>& seqlens_k,
                                const std::optional<at::Tensor>& cache_batch_idx,
                                const std::optional<at::Tensor>& block_table, double scale,
                                bool causal, int64_t window_left, int64_t window_right,
                                int64_t num_splits) {
  check_q_and_caches(q, k_cache, v_cache, 4, "decode q", "(batch, seqlen_q, heads, head_dim)",
                     "(batch_cache, seqlen_cache, heads_kv, head_dim), or (num_blocks, block_size, "
                     "heads_kv, head_dim) with a block_table",
                     /*allow_fp8_cache=*/true);

  DecodeProblem p;
  p.fp8_kv = is_fp8_kv_dtype(k_cache.scalar_type());
  p.batch = q.size(0);
  p.seqlen_q = q.size(1);
  p.heads_q = q.size(2);
  p.head_dim = q.size(3);
  p.cache_rows = k_cache.size(0);
  p.cache_seqlen = k_cache.size(1);
  p.heads_kv = k_cache.size(2);
  TORCH_CHECK(std::isfinite(scale), "fastattn: scale must be finite, got ", scale);
  TORCH_CHECK(num_splits >= 0, "fastattn: num_splits must be >= 0 (0 = heuristic), got ",
              num_splits);

  p.paged = block_table.has_value();
  if (p.paged) {
    const at::Tensor& bt = *block_table;
    // (B, max_blocks), or (B, heads_kv, max_blocks): a table row per KV head.
    check_index_tensor(bt, q, "block_table", at::kInt, bt.dim() == 3 ? 3 : 2, p.batch);
    TORCH_CHECK(bt.dim() == 2 || bt.size(1) == k_cache.size(2), "fastattn: a 3-D block_table "
                "must be (batch, heads_kv, max_blocks) with heads_kv = ", k_cache.size(2),
                ", got shape ", bt.sizes());
    TORCH_CHECK(!cache_batch_idx.has_value(),
                "fastattn: cache_batch_idx cannot be combined with block_table (the block table "
                "already says where each sequence lives)");
    TORCH_CHECK(p.cache_seqlen >= 1, "fastattn: the paged cache's block_size must be >= 1");
    p.max_blocks_per_seq = bt.size(-1);
    p.max_seqlen_k = p.max_blocks_per_seq * p.cache_seqlen;
  } else {
    p.max_seqlen_k = p.cache_seqlen;
  }

  if (cache_batch_idx.has_value()) {
    p.has_cache_batch_idx = true;
    check_index_tensor(*cache_batch_idx, q, "cache_batch_idx", at::kInt, 1, p.batch);
    check_index_values(*cache_batch_idx, "cache_batch_idx", 0, p.cache_rows - 1,
                       "row of k_cache/v_cache");
  } else if (!p.paged) {
    TORCH_CHECK(p.cache_rows >= p.batch, "fastattn: without cache_batch_idx sequence b reads "
                "cache row b, so k_cache needs at least batch = ", p.batch, " rows, got ",
                p.cache_rows);
  }

  if (seqlens_k.has_value()) {
    p.has_seqlens_k = true;
    check_index_tensor(*seqlens_k, q, "seqlens_k", at::kInt, 1, p.batch);
    check_index_values(*seqlens_k, "seqlens_k", 0, p.max_seqlen_k,
                       "keys per sequence, at most the cache length");
  }
  TORCH_CHECK(p.max_seqlen_k <= INT32_MAX, "fastattn: the cache length must fit in int32, got ",
              p.max_seqlen_k);
  if (p.paged) {
    const at::Tensor& bt = *block_table;
    if (bt.dim() == 3) {  // each head's row reads the sequence's keys
      const int64_t h = bt.size(1);
      std::optional<at::Tensor> lens;
      if (seqlens_k.has_value()) lens = seqlens_k->repeat_interleave(h);
      check_block_table_values(bt.reshape({p.batch * h, bt.size(2)}), lens, p.cache_seqlen,
                               p.cache_rows);
    } else {
      check_block_table_values(bt, seqlens_k, p.cache_seqlen, p.cache_rows);
    }
  }

  p.scale = scale;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = causal ? 0 : (window_right < 0 ? -1 : window_right);
  p.num_splits = num_splits;
  return p;
}

std::tuple<at::Tensor, at::Tensor> empty_decode_outputs(const DecodeProblem& p,
                                                        const at::Tensor& q) {
  at::Tensor out = at::empty({p.batch, p.seqlen_q, p.heads_q, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seqlen_q},
                             q.options().dtype(lse_dtype(q.scalar_type())));
  return {out, lse};
}

namespace {

// One part's out (..., S, H, D) / lse (..., H, S) pair -> the problem (parts unset).
MergeProblem merge_shape(const at::Tensor& out, const at::Tensor& lse, const char* out_name,
                         const char* lse_name) {
  TORCH_CHECK(out.defined() && lse.defined(), "fastattn: ", out_name, " and ", lse_name,
              " must be defined");
  TORCH_CHECK(out.dim() >= 3, "fastattn: ", out_name, " must be (..., seqlen, heads, head_dim) "
              "with rank >= 3, got shape ", out.sizes());
  TORCH_CHECK(is_supported_dtype(out.scalar_type()), "fastattn: ", out_name,
              " must be float16, bfloat16, float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(out.scalar_type()), "fastattn: ", lse_name,
              " must be ", lse_dtype(out.scalar_type()), " for ", out.scalar_type(), " outputs, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == out.device(), "fastattn: ", lse_name, " is on ", lse.device(),
              " but ", out_name, " is on ", out.device());
  check_last_dim_contiguous(out, out_name);
  const int64_t r = out.dim();
  MergeProblem p;
  p.seqlen = out.size(r - 3);
  p.heads = out.size(r - 2);
  p.head_dim = out.size(r - 1);
  p.outer = 1;
  p.out_sizes = out.sizes().vec();
  p.lse_sizes.assign(out.sizes().begin(), out.sizes().end() - 3);
  for (int64_t s : p.lse_sizes) p.outer *= s;
  p.lse_sizes.push_back(p.heads);
  p.lse_sizes.push_back(p.seqlen);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(p.lse_sizes), "fastattn: ", lse_name,
              " must have shape (..., heads, seqlen) = ", at::IntArrayRef(p.lse_sizes), " for ",
              out_name, " of shape ", out.sizes(), ", got ", lse.sizes());
  return p;
}

}  // namespace

MergeProblem check_merge_args(const at::Tensor& out_a, const at::Tensor& lse_a,
                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  MergeProblem p = merge_shape(out_a, lse_a, "out_a", "lse_a");
  merge_shape(out_b, lse_b, "out_b", "lse_b");
  TORCH_CHECK(out_a.sizes() == out_b.sizes(), "fastattn: out_a and out_b must have the same "
              "shape, got ", out_a.sizes(), " and ", out_b.sizes());
  TORCH_CHECK(out_a.scalar_type() == out_b.scalar_type(), "fastattn: out_a and out_b must share "
              "one dtype, got ", out_a.scalar_type(), " and ", out_b.scalar_type());
  TORCH_CHECK(out_a.device() == out_b.device(), "fastattn: out_a and out_b must be on one device, "
              "got ", out_a.device(), " and ", out_b.device());
  p.parts = 2;
  return p;
}

MergeProblem check_merge_n_args(const at::Tensor& outs, const at::Tensor& lses) {
  TORCH_CHECK(outs.defined() && lses.defined(), "fastattn: outs and lses must be defined");
  TORCH_CHECK(outs.dim() >= 4, "fastattn: outs must be (N, ..., seqlen, heads, head_dim) with "
              "rank >= 4, got shape ", outs.sizes());
  TORCH_CHECK(outs.size(0) >= 1, "fastattn: merge_states_n needs at least one part, got N = 0");
  TORCH_CHECK(lses.dim() == outs.dim() - 1 && lses.size(0) == outs.size(0),
              "fastattn: lses must be (N, ..., heads, seqlen) with the N = ", outs.size(0),
              " of outs, got shape ", lses.sizes(), " for outs of shape ", outs.sizes());
  MergeProblem p = merge_shape(outs.select(0, 0), lses.select(0, 0), "outs", "lses");
  p.parts = outs.size(0);
  return p;
}

std::tuple<at::Tensor, at::Tensor> empty_merge_outputs(const MergeProblem& p,
                                                       const at::Tensor& like) {
  at::Tensor out = at::empty(p.out_sizes, like.options());
  at::Tensor lse = at::empty(p.lse_sizes, like.options().dtype(lse_dtype(like.scalar_type())));
  return {out, lse};
}

AppendProblem check_append_args(const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                                const at::Tensor& v_cache) {
  TORCH_CHECK(k.defined() && v.defined() && slot_mapping.defined() && k_cache.defined() &&
                  v_cache.defined(),
              "fastattn: append_kv arguments must be defined");
  TORCH_CHECK(k.dim() == 3, "fastattn: append_kv k must be 3-D (tokens, heads_kv, head_dim), got "
              "shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fastattn: append_kv k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->dim() == 4, "fastattn: ", name, " must be 4-D (rows, seqlen_or_block_size, "
                "heads_kv, head_dim), got shape ", t->sizes());
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "fastattn: k_cache and v_cache must have the "
              "same shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "fastattn: append_kv k/v of shape ", k.sizes(), " do not match the cache's "
              "(heads_kv, head_dim) = (", k_cache.size(2), ", ", k_cache.size(3), ")");
  const bool fp8 = is_fp8_kv_dtype(k_cache.scalar_type());
  if (fp8) {
    TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "fastattn: k_cache and v_cache "
                "must share one dtype, got ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
    const auto s = k.scalar_type();
    TORCH_CHECK((s == at::kHalf || s == at::kBFloat16 || s == at::kFloat) && v.scalar_type() == s,
                "fastattn: append_kv into an FP8 cache takes k and v of one dtype, float16, "
                "bfloat16 or float32, got ", s, " and ", v.scalar_type());
    TORCH_CHECK(k.size(2) % 16 == 0, "fastattn: FP8 KV caches need a head_dim that is a "
                "multiple of 16, got ", k.size(2));
  } else {
    TORCH_CHECK(is_supported_dtype(k_cache.scalar_type()),
                "fastattn: the cache must be float16, bfloat16, float32, float64 or an FP8 type "
                "(float8_e4m3fn, float8_e5m2), got ", k_cache.scalar_type());
    TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                    v_cache.scalar_type() == k_cache.scalar_type(),
                "fastattn: append_kv k, v, k_cache and v_cache must share one dtype, got ",
                k.scalar_type(), ", ", v.scalar_type(), ", ", k_cache.scalar_type(), ", ",
                v_cache.scalar_type());
  }
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
              "fastattn: slot_mapping must be 1-D with one slot per token (", k.size(0),
              "), got shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "fastattn: slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  for (auto [t, name] : {std::pair{&v, "v"}, {&slot_mapping, "slot_mapping"},
                         {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->device() == k.device(), "fastattn: append_kv tensors must be on one device; k "
                "is on ", k.device(), " but ", name, " is on ", t->device());
  }
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  AppendProblem p;
  p.num_tokens = k.size(0);
  p.heads_kv = k.size(1);
  p.head_dim = k.size(2);
  p.rows = k_cache.size(0);
  p.row_len = k_cache.size(1);
  p.fp8_cache = fp8;
  return p;
}

KvScale checked_kv_scale(const std::optional<at::Tensor>& scale, const char* name, bool fp8_cache,
                         int64_t rows, const char* rows_name, int64_t heads_kv,
                         const at::Tensor& like) {
  KvScale r;
  if (!scale.has_value() || !scale->defined()) return r;
  const at::Tensor& t = *scale;
  TORCH_CHECK(fp8_cache, "fastattn: ", name, " applies to FP8 KV caches (float8_e4m3fn, "
              "float8_e5m2) only; this cache is not FP8");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastattn: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastattn: ", name, " is on ", t.device(),
              " but the cache is on ", like.device());
  if (t.numel() == 1) {
    r.t = t.reshape({1});
  } else if (t.dim() == 1 && t.size(0) == heads_kv) {
    r.t = t;
    r.head_stride = t.stride(0);
  } else if (t.dim() == 2 && t.size(0) == rows && t.size(1) == heads_kv) {
    r.t = t;
    r.row_stride = t.stride(0);
    r.head_stride = t.stride(1);
  } else {
    TORCH_CHECK(false, "fastattn: ", name, " must have one element (per tensor), shape (heads_kv,) "
                "= (", heads_kv, ",) or (", rows_name, ", heads_kv) = (", rows, ", ", heads_kv,
                "), got shape ", t.sizes());
  }
  if (t.device().is_cpu()) {
    TORCH_CHECK(at::isfinite(t).all().item<bool>() && (t > 0).all().item<bool>(),
                "fastattn: ", name, " must be finite and > 0");
  }
  return r;
}

at::Tensor checked_tree_mask(const std::optional<at::Tensor>& tree_mask, const DecodeProblem& p,
                             const at::Tensor& q) {
  if (!tree_mask.has_value() || !tree_mask->defined()) return at::Tensor();
  const at::Tensor& t = *tree_mask;
  TORCH_CHECK(t.scalar_type() == at::kBool, "fastattn: tree_mask must be bool, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "fastattn: tree_mask is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == p.batch && t.size(1) == p.seqlen_q &&
                  t.size(2) == p.seqlen_q,
              "fastattn: tree_mask must be (batch, seqlen_q, seqlen_q) = (", p.batch, ", ",
              p.seqlen_q, ", ", p.seqlen_q, "), got shape ", t.sizes());
  TORCH_CHECK(p.seqlen_q <= 64, "fastattn: tree_mask takes at most 64 draft tokens per sequence, "
              "got seqlen_q = ", p.seqlen_q);
  return t.contiguous();
}

at::Tensor checked_cache_leftpad(const std::optional<at::Tensor>& cache_leftpad,
                                 const DecodeProblem& p, const at::Tensor& q) {
  if (!cache_leftpad.has_value() || !cache_leftpad->defined()) return at::Tensor();
  TORCH_CHECK_NOT_IMPLEMENTED(!p.paged, "fastattn: cache_leftpad with a paged cache (block_table) "
                              "is not supported; pages already let sequences start anywhere");
  check_index_tensor(*cache_leftpad, q, "cache_leftpad", at::kInt, 1, p.batch);
  check_index_values(*cache_leftpad, "cache_leftpad", 0, p.max_seqlen_k, "cache position");
  return cache_leftpad->contiguous();
}

}  // namespace fastattn
