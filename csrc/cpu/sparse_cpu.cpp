// Block-sparse attention on the CPU (the sparse_fwd / sparse_bwd ops): the
// dense CPU algorithm (online softmax forward, P recomputed from the LSE in
// the backward) where the key blocks a query block visits come from a block
// mask's lists instead of the causal / window range, and each score passes
// through the mask's per-pair rule: the window, the partial block's bits, an
// additive bias. Same results as the CUDA kernels, also for float32/float64.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/dropout_cpu.h"
#include "cpu/online_softmax_cpu.h"
#include "cpu/sparse_cpu.h"
#include "torch/sparse_problem.h"

namespace fastattn::cpu {
namespace {

// The blocks one (batch, head, row block) visits: partial ones (with their
// bit slots, -1 = every pair) and full ones.
struct ListRow {
  const int32_t* part = nullptr;
  const int32_t* slot = nullptr;
  int64_t n_part = 0;
  const int32_t* full = nullptr;
  int64_t n_full = 0;
};

ListRow list_row(const SparseLists& l, int64_t b, int64_t h, int64_t r) {
  const int64_t lb = l.bm > 1 ? b : 0, lh = l.hm > 1 ? h : 0;
  const int64_t row = (lb * l.hm + lh) * l.rows + r;
  ListRow out;
  out.n_part = std::min<int64_t>(std::max(l.num.data_ptr<int32_t>()[row], 0), l.width);
  out.part = l.idx.data_ptr<int32_t>() + row * l.width;
  out.slot = l.bits_index.defined() ? l.bits_index.data_ptr<int32_t>() + row * l.width : nullptr;
  out.n_full = std::min<int64_t>(std::max(l.full_num.data_ptr<int32_t>()[row], 0), l.full_width);
  out.full = l.full_idx.data_ptr<int32_t>() + row * l.full_width;
  return out;
}

// Pair (r, c) of a partial block (block-relative) is visible iff its bit is set.
struct BlockBits {
  const int32_t* words = nullptr;  // nullptr: every pair
  int64_t per_row = 0;
  bool visible(int64_t r, int64_t c) const {
    if (words == nullptr) return true;
    return (static_cast<uint32_t>(words[r * per_row + (c >> 5)]) >> (c & 31)) & 1u;
  }
};

BlockBits block_bits(const SparseProblem& sp, const int32_t* slots, int64_t j) {
  BlockBits bb;
  if (slots == nullptr || !sp.bits.defined() || slots[j] < 0) return bb;
  bb.per_row = sp.words;
  bb.words = sp.bits.data_ptr<int32_t>() + int64_t(slots[j]) * sp.block_q * sp.words;
  return bb;
}

// Element (b, h, i, j) of the additive bias, in the accumulation type: the
// expanded attn_mask, or a relative table read at [h, j - i + Sq - 1] (the
// same strided read with a row stride of -1 from element Sq - 1).
template <typename acc_t>
struct BiasView {
  const char* data = nullptr;
  at::ScalarType type = at::kFloat;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  explicit BiasView(const SparseProblem& sp) {
    if (sp.alibi.defined()) {
      slopes = sp.alibi.data_ptr<float>();
      slope_stride = sp.alibi.size(0) > 1 ? 1 : 0;
    }
    const at::Tensor& t = sp.bias;
    if (!t.defined()) return;
    data = static_cast<const char*>(t.data_ptr());
    type = t.scalar_type();
    if (sp.bias_relative) {
      s1 = t.stride(0), s2 = -t.stride(1), s3 = t.stride(1);
      data += (sp.attn.seqlen_q - 1) * t.stride(1) * t.element_size();
    } else {
      s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2), s3 = t.stride(3);
    }
  }
  bool on() const { return data != nullptr || slopes != nullptr; }
  acc_t at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    acc_t add = slopes != nullptr ? static_cast<acc_t>(slopes[h * slope_stride]) * acc_t(j - i) : acc_t(0);
    if (data == nullptr) return add;
    const int64_t o = b * s0 + h * s1 + i * s2 + j * s3;
    switch (type) {
      case at::kHalf: return add + static_cast<acc_t>(reinterpret_cast<const at::Half*>(data)[o]);
      case at::kBFloat16: return add + static_cast<acc_t>(reinterpret_cast<const at::BFloat16*>(data)[o]);
      case at::kDouble: return add + static_cast<acc_t>(reinterpret_cast<const double*>(data)[o]);
      default: return add + static_cast<acc_t>(reinterpret_cast<const float*>(data)[o]);
    }
  }
  const float* slopes = nullptr;  // ALiBi: + slopes[h] * (j - i)
  int64_t slope_stride = 0;
};

template <typename scalar_t>
void sparse_fwd_impl(const SparseProblem& sp, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const CpuDropout& drop, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const AttnProblem& p = sp.attn;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t qb_count = sp.lists.rows;
  const int64_t sub_tiles = (sp.block_q + kBlockQ - 1) / kBlockQ;
  const RowView<const scalar_t> Q(q, false), K(k, false), V(v, false);
  const RowView<scalar_t> O(out, false);
  auto* lse_ptr = static_cast<acc_t*>(lse.data_ptr());
  const acc_t scale = static_cast<acc_t>(p.scale);
  const BiasView<acc_t> bias(sp);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, p.batch * p.heads_q * qb_count * sub_tiles, 1, [&](int64_t begin, int64_t end) {
    RowBlockState<acc_t> st(p.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % sub_tiles;
      const int64_t qb = (task / sub_tiles) % qb_count;
      const int64_t h = (task / (sub_tiles * qb_count)) % p.heads_q;
      const int64_t b = task / (sub_tiles * qb_count * p.heads_q);
      const int64_t blk0 = qb * sp.block_q;
      const int64_t i0 = blk0 + t * kBlockQ;
      const int64_t i1 = std::min({i0 + kBlockQ, blk0 + sp.block_q, p.seqlen_q});
      if (i0 >= i1) continue;
      const int64_t hk = h / group;
      st.reset(i1 - i0, [&](int64_t r) { return Q.row(b, i0 + r, h); });
      auto range = [&](int64_t r) { return visible_keys(p, i0 + r, p.seqlen_q, p.seqlen_k); };
      auto k_row = [&](int64_t j) { return K.row(b, j, hk); };
      auto v_row = [&](int64_t j) { return V.row(b, j, hk); };
      const ListRow lr = list_row(sp.lists, b, h, qb);
      const DropoutStream stream = drop.stream(b * p.heads_q + h);
      auto visit_block = [&](int64_t kb, const BlockBits& bits, bool full) {
        if (kb < 0 || kb >= sp.lists.cols) return;
        const int64_t c0 = kb * sp.block_kv;
        const int64_t c1 = std::min(c0 + sp.block_kv, p.seqlen_k);
        auto mod = [&](int64_t r, int64_t j, acc_t s) -> acc_t {
          if (!full && !bits.visible(i0 + r - blk0, j - c0)) return kNegInf;
          return bias.on() ? s + bias.at(b, h, i0 + r, j) : s;
        };
        for (int64_t j0 = c0; j0 < c1; j0 += kBlockK) {
          if (drop.on) {
            st.visit(j0, std::min(kBlockK, c1 - j0), k_row, v_row, range, scale, mod,
                     [&](int64_t r, int64_t j) { return drop.weight<acc_t>(stream, i0 + r, j); });
          } else {
            st.visit(j0, std::min(kBlockK, c1 - j0), k_row, v_row, range, scale, mod);
          }
        }
      };
      for (int64_t j = 0; j < lr.n_part; ++j) visit_block(lr.part[j], block_bits(sp, lr.slot, j), false);
      for (int64_t j = 0; j < lr.n_full; ++j) visit_block(lr.full[j], BlockBits{}, true);
      for (int64_t r = 0; r < i1 - i0; ++r) {
        st.finish(r, O.row(b, i0 + r, h), &lse_ptr[(b * p.heads_q + h) * p.seqlen_q + i0 + r]);
      }
    }
  });
}

template <typename scalar_t>
void sparse_bwd_impl(const SparseProblem& sp, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& dlse, const CpuDropout& drop,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  using acc_t = acc_type_t<scalar_t>;
  const AttnProblem& p = sp.attn;
  const int64_t D = p.head_dim;
  const int64_t group = p.heads_q / p.heads_kv;
  const RowView<const scalar_t> Q(q, false), K(k, false), V(v, false);
  const RowView<const scalar_t> O(out, false), dO(dout, false);
  const RowView<scalar_t> dQ(dq, false), dK(dk, false), dV(dv, false);
  const auto* lse_ptr = static_cast<const acc_t*>(lse.data_ptr());
  const acc_t scale = static_cast<acc_t>(p.scale);
  const BiasView<acc_t> bias(sp);
  acc_t* dbias_ptr = dbias.defined() && dbias.numel() > 0 ? dbias.data_ptr<acc_t>() : nullptr;
  const int64_t sq = p.seqlen_q, sk = p.seqlen_k;
  const acc_t* dlse_ptr = dlse.defined() ? dlse.data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(D * sp.block_kv), vt(D * sp.block_kv);
    std::vector<acc_t> dk_acc(sp.block_kv * D), dv_acc(sp.block_kv * D);
    std::vector<acc_t> q_row(D), do_row(D), s(sp.block_kv), dp(sp.block_kv);
    std::vector<acc_t> dq_acc, delta;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % p.heads_kv;
      const int64_t b = task / p.heads_kv;
      dq_acc.assign(group * sq * D, acc_t(0));
      delta.assign(group * sq, acc_t(0));
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < sq; ++i) {
          const scalar_t* o = O.row(b, i, hk * group + g);
          const scalar_t* go = dO.row(b, i, hk * group + g);
          acc_t acc = 0;
          for (int64_t x = 0; x < D; ++x) acc += static_cast<acc_t>(o[x]) * static_cast<acc_t>(go[x]);
          // d lse_i / d s_ij = P_ij: an lse gradient enters as D - dlse.
          if (dlse_ptr != nullptr) acc -= dlse_ptr[(b * p.heads_q + hk * group + g) * sq + i];
          delta[g * sq + i] = acc;
        }
      }
      for (int64_t kb = 0; kb < sp.lists.rows; ++kb) {
        const int64_t c0 = kb * sp.block_kv;
        const int64_t cols = std::min(sp.block_kv, sk - c0);
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t* krow = K.row(b, c0 + c, hk);
          const scalar_t* vrow = V.row(b, c0 + c, hk);
          for (int64_t x = 0; x < D; ++x) {
            kt[x * sp.block_kv + c] = static_cast<acc_t>(krow[x]);
            vt[x * sp.block_kv + c] = static_cast<acc_t>(vrow[x]);
          }
        }
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const ListRow lr = list_row(sp.lists, b, h, kb);
          const DropoutStream stream = drop.stream(b * p.heads_q + h);
          auto visit_qblock = [&](int64_t qb, const BlockBits& bits, bool full) {
            if (qb < 0 || qb >= sp.lists.cols) return;
            const int64_t r0 = qb * sp.block_q;
            const int64_t r1 = std::min(r0 + sp.block_q, sq);
            for (int64_t i = r0; i < r1; ++i) {
              const KeyRange kr = visible_keys(p, i, sq, sk);
              const int64_t c_lo = std::max<int64_t>(kr.lo - c0, 0);
              const int64_t c_hi = std::min<int64_t>(kr.hi - c0, cols);
              if (c_lo >= c_hi) continue;
              const acc_t row_lse = lse_ptr[(b * p.heads_q + h) * sq + i];
              if (std::isinf(row_lse) && row_lse < 0) continue;  // the row saw no key
              load_row(q_row.data(), Q.row(b, i, h), D);
              load_row(do_row.data(), dO.row(b, i, h), D);
              std::fill(s.begin(), s.begin() + cols, acc_t(0));
              std::fill(dp.begin(), dp.begin() + cols, acc_t(0));
              for (int64_t x = 0; x < D; ++x) {
                const acc_t qx = q_row[x], gx = do_row[x];
                const acc_t* kx = &kt[x * sp.block_kv];
                const acc_t* vx = &vt[x * sp.block_kv];
                for (int64_t c = c_lo; c < c_hi; ++c) {
                  s[c] += qx * kx[c];
                  dp[c] += gx * vx[c];
                }
              }
              const acc_t row_delta = delta[g * sq + i];
              acc_t* dq_row = &dq_acc[(g * sq + i) * D];
              for (int64_t c = c_lo; c < c_hi; ++c) {
                if (!full && !bits.visible(i - r0, c)) continue;
                acc_t score = s[c] * scale;
                if (bias.on()) score += bias.at(b, h, i, c0 + c);
                const acc_t pc = std::exp(score - row_lse);
                // Dropout (as in flash_bwd_cpu.cpp): dV takes P * z, dP becomes dP * z.
                const acc_t z = drop.on ? drop.weight<acc_t>(stream, i, c0 + c) : acc_t(1);
                const acc_t ds_raw = pc * (dp[c] * z - row_delta);
                if (dbias_ptr != nullptr) {
                  dbias_ptr[((b * p.heads_q + h) * sq + i) * sk + c0 + c] = ds_raw;
                }
                const acc_t ds = ds_raw * scale;
                const acc_t pz = pc * z;
                acc_t* dv_c = &dv_acc[c * D];
                acc_t* dk_c = &dk_acc[c * D];
                for (int64_t x = 0; x < D; ++x) {
                  dv_c[x] += pz * do_row[x];
                  dk_c[x] += ds * q_row[x];
                  dq_row[x] += ds * kt[x * sp.block_kv + c];
                }
              }
            }
          };
          for (int64_t j = 0; j < lr.n_part; ++j) {
            // The backward's lists are transposed: block (qb, kb)'s bits are
            // still indexed [query row][key column].
            visit_qblock(lr.part[j], block_bits(sp, lr.slot, j), false);
          }
          for (int64_t j = 0; j < lr.n_full; ++j) visit_qblock(lr.full[j], BlockBits{}, true);
        }
        for (int64_t c = 0; c < cols; ++c) {
          scalar_t* dk_dst = dK.row(b, c0 + c, hk);
          scalar_t* dv_dst = dV.row(b, c0 + c, hk);
          for (int64_t x = 0; x < D; ++x) {
            dk_dst[x] = static_cast<scalar_t>(dk_acc[c * D + x]);
            dv_dst[x] = static_cast<scalar_t>(dv_acc[c * D + x]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < sq; ++i) {
          scalar_t* dst = dQ.row(b, i, hk * group + g);
          const acc_t* src = &dq_acc[(g * sq + i) * D];
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<scalar_t>(src[x]);
        }
      }
    }
  });
}

void check_on_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "fastattn: the CPU kernel got tensors on ", q.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_fwd_cpu(
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
  check_on_cpu(q);
  check_sparse_list_values(sp, false);
  const CpuDropout drop = CpuDropout::make(dropout_p, checked_dropout(dropout_p, rng_state, q));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = empty_lse(sp.attn, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_sparse_fwd_cpu", [&] {
    sparse_fwd_impl<scalar_t>(sp, q, k, v, drop, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const at::Tensor& full_q_num_blocks,
    const at::Tensor& full_q_indices, const std::optional<at::Tensor>& q_bits_index,
    const std::optional<at::Tensor>& partial_bits, int64_t block_q, int64_t block_kv, double scale,
    bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& bias, bool bias_grad, bool /*deterministic: always*/,
    const std::optional<at::Tensor>& dlse, bool bias_relative,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const SparseProblem sp = check_sparse_args(
      q, k, v, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, q_bits_index,
      partial_bits, block_q, block_kv, scale, causal, window_left, window_right, bottom_right, bias,
      bias_relative, alibi_slopes, /*transposed=*/true);
  check_bwd_args(dout, q, k, v, out, lse, std::nullopt, std::nullopt, 0, 0, scale, causal,
                 window_left, window_right, bottom_right);
  check_on_cpu(q);
  check_sparse_list_values(sp, true);
  TORCH_CHECK(!bias_grad || sp.bias.defined(), "fastattn: bias_grad needs a bias");
  const AttnProblem& p = sp.attn;
  const at::Tensor dl = checked_dlse(dlse, lse);
  const CpuDropout drop = CpuDropout::make(dropout_p, checked_dropout(dropout_p, rng_state, q));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const auto dbias_opts = q.options().dtype(lse_dtype(q.scalar_type()));
  at::Tensor dbias = bias_grad ? at::zeros({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, dbias_opts)
                               : at::empty({0}, dbias_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastattn_sparse_bwd_cpu", [&] {
    sparse_bwd_impl<scalar_t>(sp, dout, q, k, v, out, lse, dl, drop, dq, dk, dv, dbias);
  });
  if (bias_grad && sp.bias_relative) dbias = relative_bias_grad(dbias);
  return {dq, dk, dv, dbias};
}

}  // namespace fastattn::cpu
