// Validation of the fwd/bwd op arguments and the normalized problem they
// describe. Shared by the CPU and CUDA implementations so that both reject
// bad input with the same messages.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace fastattn {

struct AttnProblem {
  int64_t batch = 0;      // number of sequences
  int64_t seqlen_q = 0;   // dense: Sq; varlen: max_seqlen_q
  int64_t seqlen_k = 0;   // dense: Sk; varlen: max_seqlen_k
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t head_dim = 0;
  bool varlen = false;
  int64_t total_q = 0;    // varlen: rows of q; dense: batch * seqlen_q
  double scale = 1.0;
  // Normalized window (see csrc/cuda/common/params.h MaskParams): causal folds into
  // window_right == 0; negative means unbounded.
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool bottom_right = false;
  // > 0: scaled scores x become softcap * tanh(x / softcap) before the mask.
  double softcap = 0.0;
};

// softcap must be finite and >= 0 (0 = off); returns it.
double checked_softcap(double softcap);

// flash-attn's alibi_slopes (fwd, bwd, bwd_into, decode, paged_fwd): (heads_q,)
// or (batch, heads_q) floats on q's device, returned as contiguous float32
// (undefined when absent). The score of query i, key j of a sequence with
// lengths (sq, sk) gains -slope * |i + sk - sq - j|.
at::Tensor checked_alibi_slopes(const std::optional<at::Tensor>& slopes, int64_t batch,
                                int64_t heads_q, const at::Tensor& q);

// An lse gradient (bwd, bwd_into, sparse_bwd): lse's shape, device and dtype,
// contiguous (undefined when absent).
at::Tensor checked_dlse(const std::optional<at::Tensor>& dlse, const at::Tensor& lse);

// Attention dropout (fwd, bwd, bwd_into): dropout_p in [0, 1]; with
// dropout_p > 0, rng_state must be dropout_seed's (seed, offset) int64 (2,)
// tensor on q's device (returned; undefined when dropout_p == 0).
at::Tensor checked_dropout(double dropout_p, const std::optional<at::Tensor>& rng_state,
                           const at::Tensor& q);

// dropout_mask's arguments: rng_state an int64 (2,) tensor, sizes >= 0, dropout_p in [0, 1].
void check_dropout_mask_args(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                             int64_t seqlen_q, int64_t seqlen_k, double dropout_p);

// Largest head dim any backend accepts.
constexpr int64_t kMaxHeadDim = 256;

// Input dtypes some backend takes (the CUDA kernels narrow this to fp16/bf16).
inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// Every kernel reads rows of head_dim contiguous elements; other strides are free.
inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "fastattn: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides(),
              "; call .contiguous() on it first");
}

// Checks q/k/v (+ optional cu_seqlens) and returns the problem they describe.
// Dense layout: (B, S, H, D); varlen: (total, H, D) with int32 cu_seqlens of
// length B + 1. The last dim must be contiguous; other strides are free.
AttnProblem check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           const std::optional<at::Tensor>& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                           bool causal, int64_t window_left, int64_t window_right,
                           bool bottom_right);

// Additionally checks dout/out/lse against the problem.
AttnProblem check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           const std::optional<at::Tensor>& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                           bool causal, int64_t window_left, int64_t window_right,
                           bool bottom_right);

// Caller-provided gradients (bwd_into): dq/dk/dv have q's/k's/v's shapes,
// dtype and device, a contiguous last dim, and do not overlap the inputs.
void check_grad_outputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

// dtype of the logsumexp output: float32, except float64 inputs keep float64
// so that gradcheck-grade CPU runs are exact.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

// Fresh (contiguous) lse tensor: (B, Hq, Sq) dense, (Hq, total_q) varlen.
at::Tensor empty_lse(const AttnProblem& p, const at::Tensor& q);

}  // namespace fastattn
