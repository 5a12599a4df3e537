// FlashAttention-2 forward on the CPU: the same algorithm as the GPU kernel,
// over contiguous K/V (the fwd op) or a paged cache (the paged_fwd op).
// Each task owns one (sequence, head, query tile); key/value tiles stream
// past it through the online softmax of online_softmax_cpu.h, and O / l and
// lse = m + log(l) are written once. No Sq x Sk matrix exists anywhere.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/dropout_cpu.h"
#include "cpu/flash_cpu.h"
#include "cpu/kv_rows_cpu.h"
#include "cpu/online_softmax_cpu.h"
#include "torch/paged_problem.h"

namespace fastattn::cpu {
namespace {

// The forward over any KV row source (kv_rows_cpu.h). q / out / lse rows are
// dense (B, Sq, ...) or varlen by cu_q.
template <typename scalar_t, typename Kv>
void fwd_impl(const AttnProblem& p, const at::Tensor& q, const Kv& kv, const int32_t* cu_q,
              const at::Tensor& slopes, const CpuDropout& drop, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const RowView<const scalar_t> Q(q, p.varlen);
  const RowView<scalar_t> O(out, p.varlen);
  auto* lse_ptr = static_cast<acc_t*>(lse.data_ptr());
  const int64_t lse_b_stride = p.varlen ? 0 : lse.stride(0);
  const int64_t lse_h_stride = lse.stride(p.varlen ? 0 : 1);
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    RowBlockState<acc_t> st(p.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % q_tiles;
      const int64_t h = (task / q_tiles) % p.heads_q;
      const int64_t b = task / (q_tiles * p.heads_q);
      const int64_t hk = h / group;
      const int64_t q_begin = cu_q ? cu_q[b] : 0;
      const int64_t sq = cu_q ? cu_q[b + 1] - cu_q[b] : p.seqlen_q;
      const int64_t sk = kv.keys(b);
      const int64_t i0 = qt * kBlockQ;
      if (i0 >= sq) continue;
      const int64_t rows = std::min(kBlockQ, sq - i0);
      st.reset(rows, [&](int64_t r) { return Q.row(b, q_begin + i0 + r, h); });
      auto range = [&](int64_t r) { return visible_keys(p, i0 + r, sq, sk); };
      auto k_row = [&](int64_t j) { return kv.k(b, j, hk); };
      auto v_row = [&](int64_t j) { return kv.v(b, j, hk); };
      // Keys any row of this tile can see; tiles outside are skipped.
      const int64_t k_lo = range(0).lo, k_hi = range(rows - 1).hi;
      DenseScoreMods<acc_t> mods{static_cast<acc_t>(p.softcap),
                                 DenseScoreMods<acc_t>::slope_of(slopes, b, h),
                                 static_cast<acc_t>(sk - sq)};
      const bool plain = mods.softcap == 0 && mods.slope == 0;
      const DropoutStream stream = drop.stream(b * p.heads_q + h);
      for (int64_t j0 = (k_lo / kBlockK) * kBlockK; j0 < k_hi; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, sk - j0);
        if (drop.on) {
          st.visit(j0, cols, k_row, v_row, range, scale,
                   [&](int64_t r, int64_t j, acc_t x) { return mods(i0 + r, j, x); },
                   [&](int64_t r, int64_t j) { return drop.weight<acc_t>(stream, i0 + r, j); });
        } else if (plain) {
          st.visit(j0, cols, k_row, v_row, range, scale);
        } else {
          st.visit(j0, cols, k_row, v_row, range, scale,
                   [&](int64_t r, int64_t j, acc_t x) { return mods(i0 + r, j, x); });
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = q_begin + i0 + r;
        st.finish(r, O.row(b, row, h), &lse_ptr[b * lse_b_stride + h * lse_h_stride + row]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k,
                                           int64_t max_seqlen_q, int64_t max_seqlen_k,
                                           double scale, bool causal, int64_t window_left,
                                           int64_t window_right, bool bottom_right,
                                           bool /*deterministic: used by autograd only*/,
                                           double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes,
                                           double dropout_p,
                                           const std::optional<at::Tensor>& rng_state) {
  AttnProblem p = check_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, causal, window_left, window_right, bottom_right);
  p.softcap = checked_softcap(softcap);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, p.batch, p.heads_q, q);
  const CpuDropout drop = CpuDropout::make(dropout_p, checked_dropout(dropout_p, rng_state, q));
  TORCH_CHECK(q.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(p, q);
  const int32_t* cu_q = p.varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  const int32_t* cu_k = p.varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_fwd_cpu", [&] {
    fwd_impl<scalar_t>(p, q, ContiguousKv<scalar_t>(k, v, cu_k, p.seqlen_k), cu_q, slopes, drop, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> paged_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
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
                                            block_table, max_seqlen_q, scale, causal, window_left,
                                            window_right);
  pp.attn.softcap = checked_softcap(softcap);
  TORCH_CHECK(q.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", q.device());
  const AttnProblem& p = pp.attn;
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, p.batch, p.heads_q, q);
  const CpuDropout drop = CpuDropout::make(dropout_p, checked_dropout(dropout_p, rng_state, q));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(p, q);
  const at::Tensor lens = seqlens_k.contiguous();
  const at::Tensor table = block_table.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_paged_fwd_cpu", [&] {
    const PagedKv<scalar_t> kv(k_cache, v_cache, table, lens.data_ptr<int32_t>(), p.seqlen_k);
    fwd_impl<scalar_t>(p, q, kv, cu_seqlens_q.data_ptr<int32_t>(), slopes, drop, out, lse);
  });
  return {out, lse};
}

// The work table only schedules GPU CTAs; every row's value is the paged
// forward's, which the CPU computes directly.
std::tuple<at::Tensor, at::Tensor> mixed_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k, const at::Tensor& block_table,
    const at::Tensor& work, int64_t max_seqlen_q, int64_t decode_max_q, int64_t num_splits,
    int64_t warps_m, double scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_mixed_plan_args(q, work, max_seqlen_q, decode_max_q, num_splits, warps_m);
  return paged_fwd_cpu(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, max_seqlen_q,
                       scale, causal, window_left, window_right, softcap, alibi_slopes, 0.0,
                       std::nullopt);
}

}  // namespace fastattn::cpu
