#include "torch/attention_problem.h"

#include <cmath>

#include "torch/index_checks.h"

namespace fastattn {

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

AttnProblem check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           const std::optional<at::Tensor>& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                           bool causal, int64_t window_left, int64_t window_right,
                           bool bottom_right) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), "fastattn: q, k and v must be defined");
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "fastattn: pass both cu_seqlens_q and cu_seqlens_k, or neither");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(t->dim() == rank, "fastattn: ", name, " must be ", rank, "-D ", layout, ", got ",
                t->dim(), "-D shape ", t->sizes());
  }
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              "fastattn: q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn: q, k and v must share one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "fastattn: q, k and v must be on one device, got ", q.device(), ", ", k.device(),
              ", ", v.device());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  AttnProblem p;
  p.varlen = varlen;
  p.head_dim = q.size(-1);
  p.heads_q = q.size(-2);
  p.heads_kv = k.size(-2);
  TORCH_CHECK(k.sizes() == v.sizes(), "fastattn: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(-1) == p.head_dim, "fastattn: q and k must have the same head_dim, got ",
              p.head_dim, " and ", k.size(-1));
  TORCH_CHECK(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim, "fastattn: head_dim must be in [1, ",
              kMaxHeadDim, "], got ", p.head_dim);
  TORCH_CHECK(p.heads_q >= 1 && p.heads_kv >= 1, "fastattn: heads must be >= 1");
  TORCH_CHECK(p.heads_q % p.heads_kv == 0, "fastattn: the number of query heads (", p.heads_q,
              ") must be divisible by the number of key/value heads (", p.heads_kv, ")");
  TORCH_CHECK(std::isfinite(scale), "fastattn: scale must be finite, got ", scale);

  if (varlen) {
    const auto& cq = *cu_seqlens_q;
    const auto& ck = *cu_seqlens_k;
    check_cu_seqlens(cq, q, "cu_seqlens_q");
    check_cu_seqlens(ck, q, "cu_seqlens_k");
    TORCH_CHECK(cq.size(0) == ck.size(0), "fastattn: cu_seqlens_q and cu_seqlens_k must have the "
                "same length (batch + 1), got ", cq.size(0), " and ", ck.size(0));
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0,
                "fastattn: max_seqlen_q and max_seqlen_k must be >= 0");
    check_cu_seqlens_values(cq, "cu_seqlens_q", q.size(0), max_seqlen_q);
    check_cu_seqlens_values(ck, "cu_seqlens_k", k.size(0), max_seqlen_k);
    p.batch = cq.size(0) - 1;
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
    p.total_q = q.size(0);
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), "fastattn: q and k must have the same batch size, got ",
                q.size(0), " and ", k.size(0));
    p.batch = q.size(0);
    p.seqlen_q = q.size(1);
    p.seqlen_k = k.size(1);
    p.total_q = p.batch * p.seqlen_q;
  }

  p.scale = scale;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = causal ? 0 : (window_right < 0 ? -1 : window_right);
  p.bottom_right = bottom_right;
  return p;
}

AttnProblem check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           const std::optional<at::Tensor>& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                           bool causal, int64_t window_left, int64_t window_right,
                           bool bottom_right) {
  AttnProblem p = check_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, causal, window_left, window_right, bottom_right);
  TORCH_CHECK(dout.defined() && out.defined() && lse.defined(),
              "fastattn: dout, out and lse must be defined");
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&out, "out"}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "fastattn: ", name, " must have q's shape ", q.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fastattn: ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "fastattn: ", name, " must be on q's device");
    check_last_dim_contiguous(*t, name);
  }
  std::vector<int64_t> lse_shape = p.varlen ? std::vector<int64_t>{p.heads_q, p.total_q}
                                            : std::vector<int64_t>{p.batch, p.heads_q, p.seqlen_q};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "fastattn: lse must have shape ",
              at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()), "fastattn: lse must be ",
              lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "fastattn: lse must be on q's device");
  TORCH_CHECK(lse.is_contiguous(), "fastattn: lse must be contiguous");
  return p;
}

at::Tensor empty_lse(const AttnProblem& p, const at::Tensor& q) {
  auto opts = q.options().dtype(lse_dtype(q.scalar_type()));
  if (p.varlen) return at::empty({p.heads_q, p.total_q}, opts);
  return at::empty({p.batch, p.heads_q, p.seqlen_q}, opts);
}

void check_grad_outputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const std::pair<const at::Tensor*, const at::Tensor*> pairs[] = {{&q, &dq}, {&k, &dk}, {&v, &dv}};
  const char* names[] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& x = *pairs[i].first;
    const at::Tensor& g = *pairs[i].second;
    TORCH_CHECK(g.sizes() == x.sizes(), "fastattn: bwd_into: ", names[i], " must have shape ",
                x.sizes(), ", got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == x.scalar_type(), "fastattn: bwd_into: ", names[i],
                " must have dtype ", x.scalar_type(), ", got ", g.scalar_type());
    TORCH_CHECK(g.device() == x.device(), "fastattn: bwd_into: ", names[i], " must be on ",
                x.device(), ", got ", g.device());
    check_last_dim_contiguous(g, names[i]);
  }
}

double checked_softcap(double softcap) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fastattn: softcap must be a finite number >= 0 (0 turns it off), got ", softcap);
  return softcap;
}

at::Tensor checked_dropout(double dropout_p, const std::optional<at::Tensor>& rng_state,
                           const at::Tensor& q) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0,
              "fastattn: dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p == 0.0) return at::Tensor();
  TORCH_CHECK(rng_state.has_value() && rng_state->defined(),
              "fastattn: dropout_p > 0 needs rng_state (the (seed, offset) tensor of "
              "fastattn::dropout_seed)");
  const at::Tensor& t = *rng_state;
  TORCH_CHECK(t.dim() == 1 && t.numel() == 2 && t.scalar_type() == at::kLong,
              "fastattn: rng_state must be an int64 tensor of shape (2,) (seed, offset), got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "fastattn: rng_state must be on q's device ", q.device(),
              ", got ", t.device());
  return t.contiguous();
}

void check_dropout_mask_args(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                             int64_t seqlen_q, int64_t seqlen_k, double dropout_p) {
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong,
              "fastattn: rng_state must be an int64 tensor of shape (2,) (seed, offset), got ",
              rng_state.scalar_type(), " ", rng_state.sizes());
  TORCH_CHECK(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "fastattn: dropout_mask sizes must be >= 0, got (", batch, ", ", heads, ", ",
              seqlen_q, ", ", seqlen_k, ")");
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0,
              "fastattn: dropout_p must be in [0, 1], got ", dropout_p);
}

at::Tensor checked_dlse(const std::optional<at::Tensor>& dlse, const at::Tensor& lse) {
  if (!dlse.has_value() || !dlse->defined()) return at::Tensor();
  TORCH_CHECK(dlse->sizes() == lse.sizes(), "fastattn: dlse must have lse's shape ", lse.sizes(),
              ", got ", dlse->sizes());
  TORCH_CHECK(dlse->device() == lse.device(), "fastattn: dlse must be on lse's device");
  return dlse->to(lse.scalar_type()).contiguous();
}

at::Tensor checked_alibi_slopes(const std::optional<at::Tensor>& slopes, int64_t batch,
                                int64_t heads_q, const at::Tensor& q) {
  if (!slopes.has_value() || !slopes->defined()) return at::Tensor();
  const at::Tensor& t = *slopes;
  const bool per_head = t.dim() == 1 && t.size(0) == heads_q;
  const bool per_seq = t.dim() == 2 && t.size(0) == batch && t.size(1) == heads_q;
  TORCH_CHECK(per_head || per_seq, "fastattn: alibi_slopes must have shape (", heads_q, ",) or (",
              batch, ", ", heads_q, "), got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), "fastattn: alibi_slopes must be a float tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "fastattn: alibi_slopes must be on ", q.device(), ", got ",
              t.device());
  return t.to(at::kFloat).contiguous();
}

}  // namespace fastattn
