// FlashAttention-2 forward on the CPU: the same algorithm as the GPU kernel.
// Each task owns one (sequence, head, query tile); key/value tiles stream
// past it through the online softmax of online_softmax_cpu.h, and O / l and
// lse = m + log(l) are written once. No Sq x Sk matrix exists anywhere.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/flash_cpu.h"
#include "cpu/online_softmax_cpu.h"

namespace fastattn::cpu {
namespace {

template <typename scalar_t>
void fwd_impl(const AttnProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const int32_t* cu_q, const int32_t* cu_k, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const RowView<const scalar_t> Q(q, p.varlen), K(k, p.varlen), V(v, p.varlen);
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
      const SeqSpan sp = seq_span(p, cu_q, cu_k, b);
      const int64_t i0 = qt * kBlockQ;
      if (i0 >= sp.sq) continue;
      const int64_t rows = std::min(kBlockQ, sp.sq - i0);
      st.reset(rows, [&](int64_t r) { return Q.row(b, sp.q_begin + i0 + r, h); });
      auto range = [&](int64_t r) { return visible_keys(p, i0 + r, sp.sq, sp.sk); };
      auto k_row = [&](int64_t j) { return K.row(b, sp.k_begin + j, hk); };
      auto v_row = [&](int64_t j) { return V.row(b, sp.k_begin + j, hk); };
      // Keys any row of this tile can see; tiles outside are skipped.
      const int64_t k_lo = range(0).lo, k_hi = range(rows - 1).hi;
      for (int64_t j0 = (k_lo / kBlockK) * kBlockK; j0 < k_hi; j0 += kBlockK) {
        st.visit(j0, std::min(kBlockK, sp.sk - j0), k_row, v_row, range, scale);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = sp.q_begin + i0 + r;
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
                                           bool /*deterministic: used by autograd only*/) {
  const AttnProblem p = check_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, scale, causal, window_left, window_right,
                                       bottom_right);
  TORCH_CHECK(q.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(p, q);
  const int32_t* cu_q = p.varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  const int32_t* cu_k = p.varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_fwd_cpu",
                                  [&] { fwd_impl<scalar_t>(p, q, k, v, cu_q, cu_k, out, lse); });
  return {out, lse};
}

}  // namespace fastattn::cpu
