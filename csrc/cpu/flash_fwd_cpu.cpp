// FlashAttention-2 forward on the CPU: the same algorithm as the GPU kernel.
// Each task owns one (sequence, head, query tile); key/value tiles stream
// past it while an online softmax keeps, per row, the running max m, the
// running sum l of exp(s - m) and the unnormalized output O. When m grows,
// l and O are rescaled by exp(m_old - m_new); at the end O / l is written
// and lse = m + log(l). No Sq x Sk matrix exists anywhere.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/flash_cpu.h"

namespace fastattn::cpu {
namespace {

template <typename scalar_t>
void fwd_impl(const AttnProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const int32_t* cu_q, const int32_t* cu_k, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const RowView<const scalar_t> Q(q, p.varlen), K(k, p.varlen), V(v, p.varlen);
  const RowView<scalar_t> O(out, p.varlen);
  auto* lse_ptr = static_cast<acc_t*>(lse.data_ptr());
  const int64_t lse_b_stride = p.varlen ? 0 : lse.stride(0);
  const int64_t lse_h_stride = lse.stride(p.varlen ? 0 : 1);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(kBlockQ * D), kt_tile(D * kBlockK), v_tile(kBlockK * D);
    std::vector<acc_t> o_acc(kBlockQ * D), m(kBlockQ), l(kBlockQ), s(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % q_tiles;
      const int64_t h = (task / q_tiles) % p.heads_q;
      const int64_t b = task / (q_tiles * p.heads_q);
      const int64_t hk = h / group;
      const SeqSpan sp = seq_span(p, cu_q, cu_k, b);
      const int64_t i0 = qt * kBlockQ;
      if (i0 >= sp.sq) continue;
      const int64_t rows = std::min(kBlockQ, sp.sq - i0);

      // Keys any row of this tile can see; tiles outside are skipped.
      const int64_t k_lo = visible_keys(p, i0, sp.sq, sp.sk).lo;
      const int64_t k_hi = visible_keys(p, i0 + rows - 1, sp.sq, sp.sk).hi;

      for (int64_t r = 0; r < rows; ++r) {
        load_row(&q_tile[r * D], Q.row(b, sp.q_begin + i0 + r, h), D);
        m[r] = neg_inf;
        l[r] = 0;
      }
      std::fill(o_acc.begin(), o_acc.end(), acc_t(0));

      for (int64_t j0 = (k_lo / kBlockK) * kBlockK; j0 < k_hi; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, sp.sk - j0);
        // K is stored transposed so that the score loop is an axpy over keys.
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t* krow = K.row(b, sp.k_begin + j0 + c, hk);
          for (int64_t x = 0; x < D; ++x) kt_tile[x * kBlockK + c] = static_cast<acc_t>(krow[x]);
          load_row(&v_tile[c * D], V.row(b, sp.k_begin + j0 + c, hk), D);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const KeyRange kr = visible_keys(p, i0 + r, sp.sq, sp.sk);
          const int64_t c_lo = std::max<int64_t>(kr.lo - j0, 0);
          const int64_t c_hi = std::min<int64_t>(kr.hi - j0, cols);
          if (c_lo >= c_hi) continue;
          std::fill(s.begin(), s.begin() + cols, acc_t(0));
          const acc_t* qr = &q_tile[r * D];
          for (int64_t x = 0; x < D; ++x) {
            const acc_t qx = qr[x];
            const acc_t* kx = &kt_tile[x * kBlockK];
            for (int64_t c = c_lo; c < c_hi; ++c) s[c] += qx * kx[c];
          }
          acc_t tile_max = neg_inf;
          for (int64_t c = c_lo; c < c_hi; ++c) {
            s[c] *= scale;
            tile_max = std::max(tile_max, s[c]);
          }
          acc_t* o = &o_acc[r * D];
          const acc_t m_new = std::max(m[r], tile_max);
          if (m_new > m[r] && m[r] != neg_inf) {
            const acc_t alpha = std::exp(m[r] - m_new);
            l[r] *= alpha;
            for (int64_t x = 0; x < D; ++x) o[x] *= alpha;
          }
          m[r] = m_new;
          for (int64_t c = c_lo; c < c_hi; ++c) {
            const acc_t pc = std::exp(s[c] - m_new);
            l[r] += pc;
            const acc_t* vc = &v_tile[c * D];
            for (int64_t x = 0; x < D; ++x) o[x] += pc * vc[x];
          }
        }
      }

      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* dst = O.row(b, sp.q_begin + i0 + r, h);
        const bool empty = l[r] == acc_t(0);
        const acc_t inv_l = empty ? acc_t(0) : acc_t(1) / l[r];
        for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<scalar_t>(o_acc[r * D + x] * inv_l);
        lse_ptr[b * lse_b_stride + h * lse_h_stride + sp.q_begin + i0 + r] =
            empty ? neg_inf : m[r] + std::log(l[r]);
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
