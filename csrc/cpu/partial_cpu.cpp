// fwd_partial / bwd_partial on the CPU: the fwd / bwd kernels in float32 for
// float16 / bfloat16 inputs (float32 and float64 inputs already give full
// precision results), so a part's result is never rounded to 16 bits before
// the caller merges the parts.
#include <ATen/ATen.h>

#include "cpu/flash_cpu.h"

namespace fastattn::cpu {
namespace {

at::Tensor widened(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) ? t.to(at::kFloat) : t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd_partial_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v,
                                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                                   const std::optional<at::Tensor>& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   double scale, bool causal, int64_t window_left,
                                                   int64_t window_right, bool bottom_right) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastattn: fwd_partial q, k and v must share one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  return fwd_cpu(widened(q), widened(k), widened(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, scale, causal, window_left, window_right, bottom_right, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_partial_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == out.scalar_type() && q.scalar_type() == dout.scalar_type(),
              "fastattn: bwd_partial dout, q, k, v and out must share one dtype");
  return bwd_cpu(widened(dout), widened(q), widened(k), widened(v), widened(out), lse,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                 window_left, window_right, bottom_right, deterministic);
}

}  // namespace fastattn::cpu
