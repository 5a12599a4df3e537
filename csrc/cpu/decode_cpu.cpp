// CPU implementations of decode (split-KV attention over a contiguous or
// paged KV cache),
// merge_states / merge_states_n and append_kv: the same algorithms as the
// CUDA kernels, on the one online-softmax state and one merge of
// online_softmax_cpu.h. Decode packs the query heads of one KV head (x Sq
// rows) into one row block so each cached key/value row is converted once per
// KV head, splits the keys into chunks, and merges the chunks' (O, lse).
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/decode_cpu.h"
#include "cpu/kv_rows_cpu.h"
#include "cpu/online_softmax_cpu.h"
#include "torch/decode_problem.h"

namespace fastattn::cpu {
namespace {

// Splits of the key range: the requested number, or enough (key-tile sized)
// chunks for every thread to have work when batch x kv heads is small.
int64_t cpu_num_splits(const DecodeProblem& p) {
  const int64_t max_chunks = std::max<int64_t>(1, (p.max_seqlen_k + kBlockK - 1) / kBlockK);
  if (p.num_splits > 0) return std::min(p.num_splits, max_chunks);
  const int64_t work = p.batch * p.heads_kv;
  const int64_t want = (2 * at::get_num_threads() + work - 1) / work;
  return std::clamp<int64_t>(want, 1, std::min<int64_t>(max_chunks, 16));
}

// Contiguous cache (B_cache, S_max, Hkv, D): sequence b reads cache row
// batch_idx[b] (or b), positions [leftpad[b], seqlens_k[b] (or S_max)): its
// key j is position leftpad[b] + j.
template <typename scalar_t>
struct CacheRowsKv {
  RowView<const scalar_t> K, V;
  const int32_t* lens;
  const int32_t* batch_idx;
  int64_t max_keys;
  const int32_t* leftpad;
  CacheRowsKv(const at::Tensor& k, const at::Tensor& v, const int32_t* l, const int32_t* idx,
              int64_t max_len, const int32_t* pad)
      : K(k, false), V(v, false), lens(l), batch_idx(idx), max_keys(max_len), leftpad(pad) {}
  int64_t end(int64_t b) const { return lens ? lens[b] : max_keys; }
  int64_t start(int64_t b) const { return leftpad ? std::min<int64_t>(leftpad[b], end(b)) : 0; }
  int64_t keys(int64_t b) const { return end(b) - start(b); }
  int64_t row(int64_t b) const { return batch_idx ? batch_idx[b] : b; }
  const scalar_t* k(int64_t b, int64_t j, int64_t hk) const { return K.row(row(b), start(b) + j, hk); }
  const scalar_t* v(int64_t b, int64_t j, int64_t hk) const { return V.row(row(b), start(b) + j, hk); }
};

// Decode over any KV row source: CacheRowsKv or PagedKv (kv_rows_cpu.h).
template <typename scalar_t, typename Kv>
void decode_impl(const DecodeProblem& p, const at::Tensor& q, const Kv& kv, const at::Tensor& slopes,
                 const at::Tensor& tree, at::Tensor& out,
                 at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.head_dim, Sq = p.seqlen_q;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t packed = group * Sq;  // rows (head in group, query) per KV head
  const int64_t row_blocks = (packed + kBlockQ - 1) / kBlockQ;
  const int64_t splits = cpu_num_splits(p);
  const RowView<const scalar_t> Q(q, false);
  const RowView<scalar_t> O(out, false);
  auto* lse_ptr = static_cast<acc_t*>(lse.data_ptr());
  const acc_t scale = static_cast<acc_t>(p.scale);
  AttnProblem mask;  // the bottom-right window of visible_keys()
  mask.window_left = p.window_left;
  mask.window_right = p.window_right;
  mask.bottom_right = true;

  // Partial results of every split: (B, Hq, Sq, splits) rows of D, plus lse.
  std::vector<acc_t> part_o, part_lse;
  if (splits > 1) {
    part_o.resize(p.batch * p.heads_q * Sq * splits * D);
    part_lse.resize(p.batch * p.heads_q * Sq * splits);
  }
  auto part_index = [&](int64_t b, int64_t h, int64_t i, int64_t s) {
    return ((b * p.heads_q + h) * Sq + i) * splits + s;
  };

  at::parallel_for(0, p.batch * p.heads_kv * row_blocks * splits, 1, [&](int64_t begin, int64_t end) {
    RowBlockState<acc_t> st(D);
    std::vector<DenseScoreMods<acc_t>> row_mods(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task % splits;
      const int64_t rb = (task / splits) % row_blocks;
      const int64_t hk = (task / (splits * row_blocks)) % p.heads_kv;
      const int64_t b = task / (splits * row_blocks * p.heads_kv);
      const int64_t sk = kv.keys(b);
      // Split s covers whole key tiles [j_begin, j_end) of this sequence.
      const int64_t tiles = (sk + kBlockK - 1) / kBlockK;
      const int64_t j_begin = std::min(sk, (tiles * s / splits) * kBlockK);
      const int64_t j_end = std::min(sk, (tiles * (s + 1) / splits) * kBlockK);
      const int64_t r0 = rb * kBlockQ;
      const int64_t rows = std::min(kBlockQ, packed - r0);
      // Packed row r is query (r % Sq) of head hk * group + r / Sq.
      auto head_of = [&](int64_t r) { return hk * group + (r0 + r) / Sq; };
      auto query_of = [&](int64_t r) { return (r0 + r) % Sq; };
      st.reset(rows, [&](int64_t r) { return Q.row(b, query_of(r), head_of(r)); });
      auto range = [&](int64_t r) {
        KeyRange kr = visible_keys(mask, query_of(r), Sq, sk);
        return KeyRange{std::max(kr.lo, j_begin), std::max(std::max(kr.lo, j_begin), std::min(kr.hi, j_end))};
      };
      auto k_row = [&](int64_t j) { return kv.k(b, j, hk); };
      auto v_row = [&](int64_t j) { return kv.v(b, j, hk); };
      // Score transforms per packed row (its head picks the ALiBi slope), set up once
      // per task rather than per score.
      for (int64_t r = 0; r < rows; ++r) {
        row_mods[r] = {static_cast<acc_t>(p.softcap), DenseScoreMods<acc_t>::slope_of(slopes, b, head_of(r)),
                       static_cast<acc_t>(sk - Sq)};
      }
      // Tree mask: the last Sq keys are the draft tokens; query i sees draft j iff tree[b, i, j].
      const bool* tree_rows = tree.defined() ? tree.data_ptr<bool>() + b * Sq * Sq : nullptr;
      const int64_t draft0 = sk - Sq;
      auto mods = [&](int64_t r, int64_t j, acc_t x) {
        if (tree_rows != nullptr && j >= draft0 && !tree_rows[query_of(r) * Sq + (j - draft0)])
          return -std::numeric_limits<acc_t>::infinity();
        return row_mods[r](query_of(r), j, x);
      };
      const bool plain = p.softcap == 0 && !slopes.defined() && tree_rows == nullptr;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
        if (plain) {
          st.visit(j0, std::min(kBlockK, j_end - j0), k_row, v_row, range, scale);
        } else {
          st.visit(j0, std::min(kBlockK, j_end - j0), k_row, v_row, range, scale, mods);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = head_of(r), i = query_of(r);
        if (splits == 1) {
          st.finish(r, O.row(b, i, h), &lse_ptr[(b * p.heads_q + h) * Sq + i]);
        } else {
          const int64_t idx = part_index(b, h, i, s);
          st.finish(r, &part_o[idx * D], &part_lse[idx]);
        }
      }
    }
  });
  if (splits == 1) return;

  at::parallel_for(0, p.batch * p.heads_q * Sq, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Sq, h = (row / Sq) % p.heads_q, b = row / (Sq * p.heads_q);
      const int64_t base = part_index(b, h, i, 0);
      merge_row<acc_t>(
          splits, D, [&](int64_t s) { return &part_o[(base + s) * D]; },
          [&](int64_t s) { return part_lse[base + s]; }, O.row(b, i, h), &lse_ptr[row], scratch.data());
    }
  });
}

// Merge over N parts given as strided (outer, S, H, D) / (outer, H, S) views.
template <typename scalar_t>
void merge_impl(const MergeProblem& p, const std::vector<at::Tensor>& outs,
                const std::vector<at::Tensor>& lses, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = static_cast<int64_t>(outs.size()), D = p.head_dim;
  auto* dst = static_cast<scalar_t*>(out.data_ptr());
  auto* dst_lse = static_cast<acc_t*>(lse.data_ptr());
  at::parallel_for(0, p.outer * p.seqlen * p.heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % p.heads, s = (row / p.heads) % p.seqlen, o = row / (p.heads * p.seqlen);
      merge_row<acc_t>(
          n, D,
          [&](int64_t i) {
            const auto& t = outs[i];
            return static_cast<const scalar_t*>(t.data_ptr()) + o * t.stride(0) + s * t.stride(1) +
                   h * t.stride(2);
          },
          [&](int64_t i) {
            const auto& t = lses[i];
            return static_cast<const acc_t*>(t.data_ptr())[o * t.stride(0) + h * t.stride(1) +
                                                           s * t.stride(2)];
          },
          dst + row * D, &dst_lse[(o * p.heads + h) * p.seqlen + s], scratch.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> merge_parts(const MergeProblem& p,
                                               const std::vector<at::Tensor>& outs,
                                               const std::vector<at::Tensor>& lses) {
  TORCH_CHECK(outs[0].device().is_cpu(), "fastattn: the CPU kernel got tensors on ", outs[0].device());
  auto [out, lse] = empty_merge_outputs(p, outs[0]);
  std::vector<at::Tensor> o4, l3;
  for (size_t i = 0; i < outs.size(); ++i) {
    o4.push_back(outs[i].reshape({p.outer, p.seqlen, p.heads, p.head_dim}));
    l3.push_back(lses[i].reshape({p.outer, p.heads, p.seqlen}));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastattn_merge_cpu",
                                  [&] { merge_impl<scalar_t>(p, o4, l3, out, lse); });
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
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
  DecodeProblem p = check_decode_args(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table,
                                      scale, causal, window_left, window_right, num_splits);
  const KvScale kd = checked_kv_scale(k_descale, "k_descale", p.fp8_kv, p.batch, "batch",
                                      p.heads_kv, q);
  const KvScale vd = checked_kv_scale(v_descale, "v_descale", p.fp8_kv, p.batch, "batch",
                                      p.heads_kv, q);
  const at::Tensor tree = checked_tree_mask(tree_mask, p, q);
  if (p.fp8_kv) {
    // Reference path: the codes widened to the compute type, K's scale folded
    // into q (q . (c k) = (c q) . k, so softcap and ALiBi see true scores) and
    // V's into the output, as the CUDA kernel folds them.
    const auto wide = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto per_q_head = [&](const KvScale& s) {  // (B | 1, 1, Hq | 1, 1)
      if (!s.t.defined()) return at::ones({1, 1, 1, 1}, q.options().dtype(wide));
      at::Tensor t = s.t.to(wide);
      if (s.row_stride == 0 && s.head_stride == 0) return t.reshape({1, 1, 1, 1});
      t = t.reshape({s.row_stride == 0 ? 1 : p.batch, 1, p.heads_kv, 1});
      return t.repeat_interleave(p.heads_q / p.heads_kv, 2);
    };
    const at::Tensor qw = q.to(wide) * per_q_head(kd);
    auto [o, l] = decode_cpu(qw, k_cache.to(wide), v_cache.to(wide), seqlens_k, cache_batch_idx,
                             block_table, scale, causal, window_left, window_right, num_splits,
                             softcap, alibi_slopes, cache_leftpad, std::nullopt, std::nullopt,
                             tree_mask);
    return {(o * per_q_head(vd)).to(q.scalar_type()), l.to(lse_dtype(q.scalar_type()))};
  }
  p.softcap = checked_softcap(softcap);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, p.batch, p.heads_q, q);
  const at::Tensor leftpad = checked_cache_leftpad(cache_leftpad, p, q);
  TORCH_CHECK(q.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", q.device());
  auto [out, lse] = empty_decode_outputs(p, q);
  const at::Tensor lens_t = seqlens_k ? seqlens_k->contiguous() : at::Tensor();
  const at::Tensor idx_t = cache_batch_idx ? cache_batch_idx->contiguous() : at::Tensor();
  const int32_t* lens = lens_t.defined() ? lens_t.data_ptr<int32_t>() : nullptr;
  const int32_t* idx = idx_t.defined() ? idx_t.data_ptr<int32_t>() : nullptr;
  const at::Tensor table = p.paged ? block_table->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_decode_cpu", [&] {
    if (p.paged) {
      decode_impl<scalar_t>(p, q, PagedKv<scalar_t>(k_cache, v_cache, table, lens, p.max_seqlen_k),
                            slopes, tree, out, lse);
    } else {
      decode_impl<scalar_t>(p, q,
                            CacheRowsKv<scalar_t>(k_cache, v_cache, lens, idx, p.max_seqlen_k,
                                                  leftpad.defined() ? leftpad.data_ptr<int32_t>() : nullptr),
                            slopes, tree, out, lse);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                    const at::Tensor& out_b, const at::Tensor& lse_b) {
  const MergeProblem p = check_merge_args(out_a, lse_a, out_b, lse_b);
  return merge_parts(p, {out_a, out_b}, {lse_a, lse_b});
}

std::tuple<at::Tensor, at::Tensor> merge_states_n_cpu(const at::Tensor& outs, const at::Tensor& lses) {
  const MergeProblem p = check_merge_n_args(outs, lses);
  return merge_parts(p, outs.unbind(0), lses.unbind(0));
}

namespace {

// Copies token n's rows to its slot (row, position); scalar_t only sizes the copy.
template <typename scalar_t>
void copy_rows_to_slots(const AppendProblem& p, const int64_t* slot, const at::Tensor& k,
                        const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache) {
  at::parallel_for(0, p.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (slot[n] < 0) continue;  // padding
      const int64_t row = slot[n] / p.row_len, pos = slot[n] % p.row_len;
      for (auto [src, dst] : {std::pair{&k, &k_cache}, {&v, &v_cache}}) {
        for (int64_t h = 0; h < p.heads_kv; ++h) {
          const auto* s = src->template data_ptr<scalar_t>() + n * src->stride(0) + h * src->stride(1);
          auto* d = dst->template data_ptr<scalar_t>() + row * dst->stride(0) + pos * dst->stride(1) +
                    h * dst->stride(2);
          std::copy(s, s + p.head_dim, d);
        }
      }
    }
  });
}

}  // namespace

void append_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot_mapping,
                   at::Tensor& k_cache, at::Tensor& v_cache,
                   const std::optional<at::Tensor>& k_scale,
                   const std::optional<at::Tensor>& v_scale) {
  const AppendProblem p = check_append_args(k, v, slot_mapping, k_cache, v_cache);
  const KvScale ks = checked_kv_scale(k_scale, "k_scale", p.fp8_cache, p.num_tokens, "tokens",
                                      p.heads_kv, k_cache);
  const KvScale vs = checked_kv_scale(v_scale, "v_scale", p.fp8_cache, p.num_tokens, "tokens",
                                      p.heads_kv, k_cache);
  TORCH_CHECK(k.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", k.device());
  const auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = p.rows * p.row_len;
  for (int64_t n = 0; n < p.num_tokens; ++n) {
    // The CPU can afford to check what the GPU kernel must skip silently.
    TORCH_CHECK(slot[n] < num_slots, "fastattn: slot_mapping[", n, "] = ", slot[n],
                " is outside the cache's ", num_slots, " slots");
  }
  if (p.fp8_cache) {
    // x / scale in float32, saturated to the largest finite code, then the
    // round-to-nearest-even conversion: what the CUDA kernel stores.
    const double max_code = k_cache.scalar_type() == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
    auto quantize = [&](const at::Tensor& x, const KvScale& s) {  // (N, Hkv, D) codes as bytes
      at::Tensor y = x.to(at::kFloat);
      if (s.t.defined()) {
        at::Tensor t = s.t;
        if (s.row_stride == 0 && s.head_stride == 0) t = t.reshape({1, 1, 1});
        else t = t.reshape({s.row_stride == 0 ? 1 : p.num_tokens, p.heads_kv, 1});
        y = y / t;
      }
      return y.clamp(-max_code, max_code).to(k_cache.scalar_type()).view(at::kByte);
    };
    at::Tensor kc = k_cache.view(at::kByte), vc = v_cache.view(at::kByte);
    copy_rows_to_slots<uint8_t>(p, slot, quantize(k, ks), quantize(v, vs), kc, vc);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "fastattn_append_kv_cpu",
                                  [&] { copy_rows_to_slots<scalar_t>(p, slot, k, v, k_cache, v_cache); });
}

}  // namespace fastattn::cpu
