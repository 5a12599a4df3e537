// FlashAttention-2 backward on the CPU. Probabilities are recomputed from the
// forward's logsumexp, P = exp(scale * q k^T - lse) (with a softcap, of the
// capped scores; dS then carries the cap's slope), so nothing of size
// Sq x Sk is stored. With D_i = rowsum(dO_i * O_i):
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),
//   dQ += scale * dS K,  dK += scale * dS^T Q.
// A task owns one (sequence, kv head): it walks the key/value tiles, keeps
// dK/dV of the tile in accumulators, and visits every query head of the GQA
// group and every query tile that can see the keys. Because one task owns
// all query heads of its group, dQ accumulates without atomics and the
// group reduction of dK/dV needs no repeated K/V and no extra pass.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/dropout_cpu.h"
#include "cpu/flash_cpu.h"

namespace fastattn::cpu {
namespace {

template <typename scalar_t>
void bwd_impl(const AttnProblem& p, const at::Tensor& dout, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& dlse, const at::Tensor& slopes,
              const CpuDropout& drop, const int32_t* cu_q,
              const int32_t* cu_k, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t group = p.heads_q / p.heads_kv;
  const RowView<const scalar_t> Q(q, p.varlen), K(k, p.varlen), V(v, p.varlen);
  const RowView<const scalar_t> O(out, p.varlen), dO(dout, p.varlen);
  const RowView<scalar_t> dQ(dq, p.varlen), dK(dk, p.varlen), dV(dv, p.varlen);
  const auto* lse_ptr = static_cast<const acc_t*>(lse.data_ptr());
  const acc_t* dlse_ptr = dlse.defined() ? dlse.data_ptr<acc_t>() : nullptr;
  const int64_t dlse_b_stride = !dlse.defined() || p.varlen ? 0 : dlse.stride(0);
  const int64_t dlse_h_stride = dlse.defined() ? dlse.stride(p.varlen ? 0 : 1) : 0;
  const int64_t lse_b_stride = p.varlen ? 0 : lse.stride(0);
  const int64_t lse_h_stride = lse.stride(p.varlen ? 0 : 1);
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(D * kBlockK), vt(D * kBlockK), dk_acc(kBlockK * D), dv_acc(kBlockK * D);
    std::vector<acc_t> q_row(D), do_row(D), s(kBlockK), dp(kBlockK);
    std::vector<acc_t> dq_acc, delta;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % p.heads_kv;
      const int64_t b = task / p.heads_kv;
      const SeqSpan sp = seq_span(p, cu_q, cu_k, b);
      const int64_t group_rows = group * sp.sq;
      dq_acc.assign(group_rows * D, acc_t(0));
      delta.assign(group_rows, acc_t(0));

      // D_i = rowsum(dO_i * O_i) once per row of the group.
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < sp.sq; ++i) {
          const scalar_t* o = O.row(b, sp.q_begin + i, hk * group + g);
          const scalar_t* go = dO.row(b, sp.q_begin + i, hk * group + g);
          acc_t acc = 0;
          for (int64_t x = 0; x < D; ++x) acc += static_cast<acc_t>(o[x]) * static_cast<acc_t>(go[x]);
          // d lse_i / d s_ij = P_ij: an lse gradient enters as D - dlse.
          if (dlse_ptr != nullptr) {
            acc -= dlse_ptr[b * dlse_b_stride + (hk * group + g) * dlse_h_stride + sp.q_begin + i];
          }
          delta[g * sp.sq + i] = acc;
        }
      }

      for (int64_t j0 = 0; j0 < sp.sk; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, sp.sk - j0);
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t* krow = K.row(b, sp.k_begin + j0 + c, hk);
          const scalar_t* vrow = V.row(b, sp.k_begin + j0 + c, hk);
          for (int64_t x = 0; x < D; ++x) {
            kt[x * kBlockK + c] = static_cast<acc_t>(krow[x]);
            vt[x * kBlockK + c] = static_cast<acc_t>(vrow[x]);
          }
        }
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));

        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const DenseScoreMods<acc_t> mods{static_cast<acc_t>(p.softcap),
                                           DenseScoreMods<acc_t>::slope_of(slopes, b, h),
                                           static_cast<acc_t>(sp.sk - sp.sq)};
          const DropoutStream stream = drop.stream(b * p.heads_q + h);
          for (int64_t i = 0; i < sp.sq; ++i) {
            const KeyRange kr = visible_keys(p, i, sp.sq, sp.sk);
            const int64_t c_lo = std::max<int64_t>(kr.lo - j0, 0);
            const int64_t c_hi = std::min<int64_t>(kr.hi - j0, cols);
            if (c_lo >= c_hi) continue;
            const acc_t row_lse = lse_ptr[b * lse_b_stride + h * lse_h_stride + sp.q_begin + i];
            load_row(q_row.data(), Q.row(b, sp.q_begin + i, h), D);
            load_row(do_row.data(), dO.row(b, sp.q_begin + i, h), D);
            std::fill(s.begin(), s.begin() + cols, acc_t(0));
            std::fill(dp.begin(), dp.begin() + cols, acc_t(0));
            for (int64_t x = 0; x < D; ++x) {
              const acc_t qx = q_row[x], gx = do_row[x];
              const acc_t* kx = &kt[x * kBlockK];
              const acc_t* vx = &vt[x * kBlockK];
              for (int64_t c = c_lo; c < c_hi; ++c) {
                s[c] += qx * kx[c];
                dp[c] += gx * vx[c];
              }
            }
            const acc_t row_delta = delta[g * sp.sq + i];
            acc_t* dq_row = &dq_acc[(g * sp.sq + i) * D];
            for (int64_t c = c_lo; c < c_hi; ++c) {
              // The cap's slope in x carries dS back to the uncapped score.
              acc_t dcap;
              const acc_t pc = std::exp(mods(i, j0 + c, s[c] * scale, &dcap) - row_lse);
              // Dropout: out saw P * z (z = 0 or 1 / keep), so dV takes P * z and
              // dP becomes dP * z; D = rowsum(dO * out) already holds the dropped out.
              const acc_t z = drop.on ? drop.weight<acc_t>(stream, i, j0 + c) : acc_t(1);
              const acc_t ds = pc * (dp[c] * z - row_delta) * dcap * scale;
              const acc_t pz = pc * z;
              acc_t* dv_c = &dv_acc[c * D];
              acc_t* dk_c = &dk_acc[c * D];
              for (int64_t x = 0; x < D; ++x) {
                dv_c[x] += pz * do_row[x];
                dk_c[x] += ds * q_row[x];
                dq_row[x] += ds * kt[x * kBlockK + c];
              }
            }
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          scalar_t* dk_dst = dK.row(b, sp.k_begin + j0 + c, hk);
          scalar_t* dv_dst = dV.row(b, sp.k_begin + j0 + c, hk);
          for (int64_t x = 0; x < D; ++x) {
            dk_dst[x] = static_cast<scalar_t>(dk_acc[c * D + x]);
            dv_dst[x] = static_cast<scalar_t>(dv_acc[c * D + x]);
          }
        }
      }

      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < sp.sq; ++i) {
          scalar_t* dst = dQ.row(b, sp.q_begin + i, hk * group + g);
          const acc_t* src = &dq_acc[(g * sp.sq + i) * D];
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<scalar_t>(src[x]);
        }
      }
    }
  });
}

}  // namespace

void bwd_into_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                  int64_t max_seqlen_k, double scale, bool causal, int64_t window_left,
                  int64_t window_right, bool bottom_right, bool deterministic,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  double softcap, const std::optional<at::Tensor>& dlse,
                  const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                  const std::optional<at::Tensor>& rng_state) {
  // The CPU backward is deterministic whatever the flag: each dQ row is owned
  // by one task and summed in a fixed order.
  (void)deterministic;
  AttnProblem p = check_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, scale, causal, window_left,
                                 window_right, bottom_right);
  p.softcap = checked_softcap(softcap);
  check_grad_outputs(q, k, v, dq, dk, dv);
  TORCH_CHECK(q.device().is_cpu() && dq.device().is_cpu() && dk.device().is_cpu() &&
                  dv.device().is_cpu(),
              "fastattn: the CPU kernel got tensors on ", q.device());
  // Varlen: k/v rows outside every sequence get zero gradients.
  if (p.varlen) {
    dk.zero_();
    dv.zero_();
  }
  const int32_t* cu_q = p.varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  const int32_t* cu_k = p.varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  at::Tensor dq_w = dq, dk_w = dk, dv_w = dv;
  const at::Tensor dl = checked_dlse(dlse, lse);
  const at::Tensor slopes = checked_alibi_slopes(alibi_slopes, p.batch, p.heads_q, q);
  const CpuDropout drop = CpuDropout::make(dropout_p, checked_dropout(dropout_p, rng_state, q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_bwd_cpu", [&] {
    bwd_impl<scalar_t>(p, dout, q, k, v, out, lse, dl, slopes, drop, cu_q, cu_k, dq_w, dk_w, dv_w);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
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
  bwd_into_cpu(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               scale, causal, window_left, window_right, bottom_right, deterministic, dq, dk, dv,
               softcap, dlse, alibi_slopes, dropout_p, rng_state);
  return {dq, dk, dv};
}

}  // namespace fastattn::cpu
