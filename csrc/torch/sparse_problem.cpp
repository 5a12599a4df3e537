#include "torch/sparse_problem.h"

#include <string>

namespace fastattn {
namespace {

struct ListNames {
  const char *num, *idx, *full_num, *full_idx, *bits_index;
};
constexpr ListNames kFwdNames{"kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                              "full_kv_indices", "kv_bits_index"};
constexpr ListNames kBwdNames{"q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
                              "q_bits_index"};

void check_int32_on(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.defined(), "fastattn: ", name, " must be defined");
  TORCH_CHECK(t.scalar_type() == at::kInt, "fastattn: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "fastattn: ", name, " must be on q's device ", q.device(),
              ", got ", t.device());
}

// (bm, hm, rows) counts + (bm, hm, rows, width) ids of one kind of block.
void check_pair(const at::Tensor& num, const at::Tensor& idx, const at::Tensor& q, int64_t batch,
                int64_t heads, int64_t rows, const char* num_name, const char* idx_name) {
  check_int32_on(num, q, num_name);
  check_int32_on(idx, q, idx_name);
  TORCH_CHECK(num.dim() == 3, "fastattn: ", num_name, " must be 3-D (batch, heads, blocks), got ",
              num.sizes());
  TORCH_CHECK(idx.dim() == 4, "fastattn: ", idx_name,
              " must be 4-D (batch, heads, blocks, max_blocks), got ", idx.sizes());
  TORCH_CHECK(num.size(0) == 1 || num.size(0) == batch, "fastattn: ", num_name,
              " has batch dim ", num.size(0), "; the inputs have batch ", batch,
              " (a block mask broadcasts with size 1)");
  TORCH_CHECK(num.size(1) == 1 || num.size(1) == heads, "fastattn: ", num_name, " has head dim ",
              num.size(1), "; q has ", heads, " heads (a block mask broadcasts with size 1)");
  TORCH_CHECK(num.size(2) == rows, "fastattn: ", num_name, " has ", num.size(2),
              " blocks along its rows, but these inputs need ", rows,
              " (was the block mask built for other sequence lengths or block sizes?)");
  TORCH_CHECK(idx.size(0) == num.size(0) && idx.size(1) == num.size(1) && idx.size(2) == rows,
              "fastattn: ", idx_name, " ", idx.sizes(), " does not match ", num_name, " ",
              num.sizes());
}

}  // namespace

SparseProblem check_sparse_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& num, const at::Tensor& idx,
                                const at::Tensor& full_num, const at::Tensor& full_idx,
                                const std::optional<at::Tensor>& bits_index,
                                const std::optional<at::Tensor>& bits, int64_t block_q,
                                int64_t block_kv, double scale, bool causal, int64_t window_left,
                                int64_t window_right, bool bottom_right,
                                const std::optional<at::Tensor>& bias, bool bias_relative,
                                const std::optional<at::Tensor>& alibi_slopes, bool transposed) {
  SparseProblem sp;
  sp.attn = check_fwd_args(q, k, v, std::nullopt, std::nullopt, 0, 0, scale, causal, window_left,
                           window_right, bottom_right);
  const AttnProblem& p = sp.attn;
  TORCH_CHECK(block_q >= 1 && block_kv >= 1 && block_q <= 4096 && block_kv <= 4096,
              "fastattn: BLOCK_SIZE must be in [1, 4096], got (", block_q, ", ", block_kv, ")");
  sp.block_q = block_q;
  sp.block_kv = block_kv;
  sp.words = (block_kv + 31) / 32;
  const int64_t qb = (p.seqlen_q + block_q - 1) / block_q;
  const int64_t kb = (p.seqlen_k + block_kv - 1) / block_kv;
  const ListNames& n = transposed ? kBwdNames : kFwdNames;
  SparseLists& l = sp.lists;
  l.rows = transposed ? kb : qb;
  l.cols = transposed ? qb : kb;
  check_pair(num, idx, q, p.batch, p.heads_q, l.rows, n.num, n.idx);
  check_pair(full_num, full_idx, q, p.batch, p.heads_q, l.rows, n.full_num, n.full_idx);
  TORCH_CHECK(full_num.size(0) == num.size(0) && full_num.size(1) == num.size(1),
              "fastattn: ", n.full_num, " ", full_num.sizes(), " and ", n.num, " ", num.sizes(),
              " must share batch and head dims");
  l.bm = num.size(0);
  l.hm = num.size(1);
  l.num = num.contiguous();
  l.idx = idx.contiguous();
  l.full_num = full_num.contiguous();
  l.full_idx = full_idx.contiguous();
  l.width = idx.size(3);
  l.full_width = full_idx.size(3);

  TORCH_CHECK(bits_index.has_value() == bits.has_value(), "fastattn: pass both ", n.bits_index,
              " and partial_bits, or neither");
  if (bits.has_value()) {
    check_int32_on(*bits_index, q, n.bits_index);
    check_int32_on(*bits, q, "partial_bits");
    TORCH_CHECK(bits_index->sizes() == idx.sizes(), "fastattn: ", n.bits_index,
                " must have the shape of ", n.idx, " ", idx.sizes(), ", got ",
                bits_index->sizes());
    TORCH_CHECK(bits->dim() == 3 && bits->size(1) == block_q && bits->size(2) == sp.words,
                "fastattn: partial_bits must be (num_partial, ", block_q, ", ", sp.words,
                ") for BLOCK_SIZE (", block_q, ", ", block_kv, "), got ", bits->sizes());
    l.bits_index = bits_index->contiguous();
    sp.bits = bits->contiguous();
  }

  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "fastattn: alibi_slopes must be float32, got ",
                a.scalar_type());
    TORCH_CHECK(a.device() == q.device(), "fastattn: alibi_slopes must be on q's device ",
                q.device(), ", got ", a.device());
    TORCH_CHECK(a.dim() == 1 && (a.size(0) == p.heads_q || a.size(0) == 1),
                "fastattn: alibi_slopes must be (", p.heads_q, ") or (1), got ", a.sizes());
    sp.alibi = a.contiguous();
  }
  TORCH_CHECK(!bias_relative || bias.has_value(), "fastattn: bias_relative needs a bias table");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == q.scalar_type() || b.scalar_type() == at::kFloat,
                "fastattn: a float attn_mask must have q's dtype (", q.scalar_type(),
                ") or float32, got ", b.scalar_type());
    TORCH_CHECK(b.device() == q.device(), "fastattn: attn_mask must be on q's device ",
                q.device(), ", got ", b.device());
    if (bias_relative) {
      // A relative-position table: bias(b, h, i, j) = t[h, j - i + Sq - 1].
      const int64_t span = p.seqlen_q + p.seqlen_k - 1;
      TORCH_CHECK(b.dim() == 2 && (b.size(0) == p.heads_q || b.size(0) == 1) && b.size(1) == span,
                  "fastattn: a relative bias table must be (", p.heads_q, "|1, Sq + Sk - 1 = ", span,
                  "), got ", b.sizes());
      sp.bias_relative = true;
      sp.bias_raw = b;
      sp.bias = b.expand({p.heads_q, span});
      return sp;
    }
    TORCH_CHECK(b.dim() == 4, "fastattn: attn_mask must be 4-D (B|1, H|1, Sq, Sk) here, got ",
                b.sizes());
    const int64_t want[4] = {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(b.size(i) == want[i] || b.size(i) == 1, "fastattn: attn_mask of shape ",
                  b.sizes(), " does not broadcast to (", p.batch, ", ", p.heads_q, ", ",
                  p.seqlen_q, ", ", p.seqlen_k, ")");
    }
    sp.bias_raw = b;
    sp.bias = b.expand({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k});
  }
  return sp;
}

at::Tensor relative_bias_grad(const at::Tensor& dense) {
  // g[h, d] = sum over b, i of dense[b, h, i, j] with j - i + Sq - 1 = d. With
  // the rows flipped (i' = Sq - 1 - i) that is d = i' + j: pad each row with Sq
  // zeros and re-read the flat buffer with rows one shorter, which shifts row
  // i' right by i' (a shear), then sum the rows. Deterministic, no atomics.
  const int64_t H = dense.size(1), L = dense.size(2), S = dense.size(3);
  const at::Tensor flipped = dense.sum(0).flip({1});
  const at::Tensor padded = at::constant_pad_nd(flipped, {0, L});  // (H, L, S + L)
  const at::Tensor sheared =
      padded.reshape({H, L * (S + L)}).narrow(1, 0, L * (S + L - 1)).view({H, L, S + L - 1});
  return sheared.sum(1);
}

void check_sparse_list_values(const SparseProblem& sp, bool transposed) {
  const ListNames& n = transposed ? kBwdNames : kFwdNames;
  const SparseLists& l = sp.lists;
  auto check = [&](const at::Tensor& num, const at::Tensor& idx, int64_t width, const char* nn,
                   const char* in) {
    if (num.numel() == 0) return;
    const int64_t lo = num.min().item<int64_t>(), hi = num.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= width, "fastattn: ", nn, " must be in [0, ", width,
                "] (the last dim of ", in, "), got values in [", lo, ", ", hi, "]");
    if (idx.numel() == 0 || hi == 0) return;
    // Only the first num entries of each list are read.
    const at::Tensor pos = at::arange(width, idx.options()).view({1, 1, 1, width});
    const at::Tensor live = pos < num.unsqueeze(-1);
    const at::Tensor bad = live & ((idx < 0) | (idx >= l.cols));
    TORCH_CHECK(!bad.any().item<bool>(), "fastattn: ", in, " holds block ids outside [0, ",
                l.cols, ") in its first ", nn, " entries");
  };
  check(l.num, l.idx, l.width, n.num, n.idx);
  check(l.full_num, l.full_idx, l.full_width, n.full_num, n.full_idx);
  if (sp.bits.defined() && l.bits_index.defined() && l.idx.numel() > 0) {
    const int64_t np = sp.bits.size(0);
    const at::Tensor pos = at::arange(l.width, l.idx.options()).view({1, 1, 1, l.width});
    const at::Tensor live = pos < l.num.unsqueeze(-1);
    const at::Tensor bad = live & ((l.bits_index < -1) | (l.bits_index >= np));
    TORCH_CHECK(!bad.any().item<bool>(), "fastattn: ", n.bits_index,
                " holds slots outside [-1, ", np, ") (partial_bits has ", np, " blocks)");
  }
}

}  // namespace fastattn
