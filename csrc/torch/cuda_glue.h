// Helpers shared by the CUDA glue files (fwd_cuda.cpp for fwd and paged_fwd,
// bwd_cuda.cpp for bwd, decode_cuda.cpp): CUDA-only argument checks, tensor -> params
// conversion, and the alignment fallback for the cp.async kernels.
//
//   ElemType cuda_elem_type(q)                         fp16/bf16 or a clear error
//   check_cuda_devices(q, {{&k, "k"}, ...})           all on q's CUDA device
//   bool kernel_readable(t)                             16-byte aligned pointer + strides, D % 8 == 0
//   at::Tensor kernel_readable_copy(t, padded_dim)     zero-padded contiguous copy (rare path)
//   KernelInputs kernel_inputs(q, k, v, scale, padded_dim)  scale >= 0 and readable q/k/v
//   int64_t padded_head_dim(d)                          d rounded up to a multiple of 8
//   int64_t checked_padded_head_dim(q, d, dtype, op)    the same, after checking that this
//                                                       build compiled a kernel serving it
//   void fill_fwd_params(p, prob, q, k, v, out, lse, cu_q, cu_k)
//                                                       pointers, strides, sizes, scale, mask
//   void check_launch(cudaError_t, what)                raises a c10::Error naming the launch
//   void check_lengths_fit(seqlens, capacity, ...)      max(seqlens) <= capacity (one host
//                                                       read; skipped under graph capture)
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "torch/attention_problem.h"
#include "cuda/common/compiled_variants.h"
#include "cuda/flash/launch.h"
#include "cuda/common/dropout.h"
#include "cuda/common/params.h"

namespace fastattn {
namespace glue {

inline ElemType cuda_elem_type(const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16,
              "fastattn: the CUDA kernels take float16 or bfloat16 tensors, got ", t,
              " on ", q.device(), "; convert with .half() / .bfloat16() (float32 and float64 "
              "run on the CPU backend)");
  return t == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
}

inline void check_cuda_devices(
    const at::Tensor& q, std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK(q.is_cuda(), "fastattn: expected CUDA tensors, q is on ", q.device());
  for (const auto& [t, name] : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(), "fastattn: all tensors must be on ",
                "one CUDA device; q is on ", q.device(), " but ", name, " is on ", t->device());
  }
}

inline int64_t padded_head_dim(int64_t d) { return (d + 7) / 8 * 8; }

// padded_head_dim(d), or a clear error when a (narrowed) build compiled no
// kernel serving it for q's dtype; `op` names the kernel family in the message
// ("forward", "backward", "decode": all dispatch over the same compiled set).
inline int64_t checked_padded_head_dim(const at::Tensor& q, int64_t d, ElemType dtype,
                                       const char* op) {
  const int64_t dpad = padded_head_dim(d);
  TORCH_CHECK(gpu::compiled_kernel_head_dim(static_cast<int>(dpad), dtype) > 0,
              "fastattn: this build has no CUDA ", op, " kernel for head_dim ", d, " and dtype ",
              q.scalar_type(), " (narrowed build? see FASTATTN_HDIMS / FASTATTN_DTYPES)");
  return dpad;
}

// The kernels copy 16-byte chunks: the data pointer and every stride of a dim
// with more than one element (but the last, contiguous) must be multiples of
// 16 bytes, and the head dim a multiple of 8.
inline bool kernel_readable(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const int64_t elem = t.element_size();
  if (t.size(-1) % 8 != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && (t.stride(i) * elem) % 16 != 0) return false;
  }
  return true;
}

// Zero-padded contiguous copy with last dim padded_dim (>= t.size(-1)). Used
// only when kernel_readable(t) is false: unaligned views or head dims that are
// not a multiple of 8. The zero columns add nothing to q.k and give zero
// output columns, which the glue drops.
inline at::Tensor kernel_readable_copy(const at::Tensor& t, int64_t padded_dim) {
  auto sizes = t.sizes().vec();
  sizes.back() = padded_dim;
  at::Tensor c = at::zeros(sizes, t.options());
  c.narrow(-1, 0, t.size(-1)).copy_(t);
  return c;
}

// q, k, v as the forward/decode kernels take them. The kernels need scale >= 0
// (exp2 with the scale folded in, max over raw scores): softmax(s * q.k) with
// s < 0 is softmax(|s| * (-q).k), and s == 0 is softmax(1 * 0.k); both cost
// one copy of q, which real workloads never hit. cp.async reads 16-byte
// chunks: whatever is not readable as is (head dim not a multiple of 8,
// unaligned pointer or strides) is copied into an aligned buffer whose head
// dim is padded to padded_dim with zeros (then all three are, and the
// output's padding columns are dropped). Ordinary layouts take no copy.
struct KernelInputs {
  at::Tensor q, k, v;
  double scale;  // >= 0
  bool padded;   // head dim padded to padded_dim
};

inline KernelInputs kernel_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  double scale, int64_t padded_dim) {
  at::Tensor qs = q;
  double s = scale;
  if (scale < 0) {
    qs = q.neg();
    s = -scale;
  } else if (scale == 0) {
    qs = at::zeros_like(q);
    s = 1.0;
  }
  const int64_t d = q.size(-1);
  KernelInputs in{kernel_readable(qs) ? qs : kernel_readable_copy(qs, padded_dim),
                  kernel_readable(k) ? k : kernel_readable_copy(k, padded_dim),
                  kernel_readable(v) ? v : kernel_readable_copy(v, padded_dim), s, false};
  in.padded = in.q.size(-1) != d || in.k.size(-1) != d || in.v.size(-1) != d;
  if (in.padded) {
    // Mixed cases (one tensor padded, one not) can only be d % 8 != 0, where all three pad.
    if (in.q.size(-1) != padded_dim) in.q = kernel_readable_copy(qs, padded_dim);
    if (in.k.size(-1) != padded_dim) in.k = kernel_readable_copy(k, padded_dim);
    if (in.v.size(-1) != padded_dim) in.v = kernel_readable_copy(v, padded_dim);
  }
  return in;
}

// Windows at least as wide as every key/query distance are unbounded; this
// keeps the kernels' int arithmetic (i + offset +- window) far from overflow.
inline int clamp_window(int64_t w, int64_t seqlen_q, int64_t seqlen_k) {
  if (w < 0 || w >= seqlen_q + seqlen_k) return -1;
  return static_cast<int>(w);
}

// Fills the common (forward) part of the params. q/k/v/out must already be
// kernel-readable; out has q's layout; lse is the fresh empty_lse() tensor.
// The kernels' softcap factors on raw scores (cuda/common/softcap.h); a zero
// scale makes every score 0, which the cap keeps, so it stays off then.
inline void set_softcap(float& in, float& out, double scale, double softcap) {
  const bool on = softcap > 0 && scale != 0;
  in = on ? static_cast<float>(scale / softcap) : 0.f;
  out = on ? static_cast<float>(softcap / scale) : 0.f;
}

// flash-attn's ALiBi (checked_alibi_slopes' float32 tensor, or undefined: none)
// as the kernels' in-register bias.
inline void set_alibi(BiasParams& bias, const at::Tensor& slopes) {
  if (!slopes.defined()) return;
  bias.slopes = slopes.data_ptr<float>();
  bias.slope_stride = 1;
  bias.slope_batch_stride = slopes.dim() == 2 ? slopes.size(1) : 0;
  bias.alibi_symmetric = true;
}

// rng_state: checked_dropout's result (undefined: no dropout).
inline void set_dropout(DropoutParams& d, double dropout_p, const at::Tensor& rng_state) {
  if (!rng_state.defined()) return;
  d.rng_state = rng_state.data_ptr<int64_t>();
  d.keep_threshold = dropout_threshold(dropout_p);
  d.keep_scale = dropout_keep_scale(d.keep_threshold);
}

inline void fill_fwd_params(FwdParams& p, const AttnProblem& prob, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k) {
  TORCH_CHECK(prob.seqlen_q <= INT32_MAX && prob.seqlen_k <= INT32_MAX,
              "fastattn: sequence lengths must fit in int32");
  TORCH_CHECK(prob.heads_q <= 65535, "fastattn: at most 65535 query heads are supported on CUDA, "
              "got ", prob.heads_q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const bool varlen = prob.varlen;
  // Dense (B, S, H, D); varlen (T, H, D) with no batch stride.
  auto strides = [varlen](const at::Tensor& t, int64_t& bs, int64_t& rs, int64_t& hs) {
    if (varlen) {
      bs = 0;
      rs = t.stride(0);
      hs = t.stride(1);
    } else {
      bs = t.stride(0);
      rs = t.stride(1);
      hs = t.stride(2);
    }
  };
  strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  if (varlen) {
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
  } else {
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
  }
  p.batch = static_cast<int>(prob.batch);
  p.heads_q = static_cast<int>(prob.heads_q);
  p.heads_kv = static_cast<int>(prob.heads_kv);
  p.head_dim = static_cast<int>(q.size(-1));  // the (possibly padded) kernel-visible head dim
  p.seqlen_q = static_cast<int>(prob.seqlen_q);
  p.seqlen_k = static_cast<int>(prob.seqlen_k);
  p.cu_seqlens_q = varlen ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_k->data_ptr<int>() : nullptr;
  p.total_q = varlen ? q.size(0) : 0;
  p.total_k = varlen ? k.size(0) : 0;
  p.scale = static_cast<float>(prob.scale);
  p.scale_log2 = static_cast<float>(prob.scale * 1.4426950408889634);
  set_softcap(p.softcap_in, p.softcap_out, prob.scale, prob.softcap);
  p.mask.window_left = clamp_window(prob.window_left, prob.seqlen_q, prob.seqlen_k);
  p.mask.window_right = clamp_window(prob.window_right, prob.seqlen_q, prob.seqlen_k);
  p.mask.bottom_right = prob.bottom_right;
  p.dtype = q.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The paged kernels take power-of-two page sizes (shifts, not divisions, in
// the address math) and address K and V with one (page, slot) offset per row:
// the pools must share their strides, with page and slot strides below 2^31
// elements. Pools that do not (rare: views with different strides) are
// copied to contiguous ones; a pool whose page itself exceeds 2^31 elements
// is refused.
inline void paged_pools_for_kernel(at::Tensor& k_pool, at::Tensor& v_pool) {
  const int64_t bs = k_pool.size(1);
  // (The Python API raises NotImplementedError before a call gets here.)
  TORCH_CHECK((bs & (bs - 1)) == 0,
              "fastattn: the CUDA paged kernels take power-of-two block sizes "
              "(1, 2, 4, ..., 16, ..., 256, ...), got block_size = ", bs,
              " (the CPU backend takes any block size)");
  auto fits = [](const at::Tensor& t) {
    return t.stride(0) <= INT32_MAX && t.stride(1) <= INT32_MAX;
  };
  if (k_pool.strides() == v_pool.strides() && fits(k_pool)) return;
  k_pool = k_pool.contiguous();
  v_pool = v_pool.contiguous();
  TORCH_CHECK(fits(k_pool), "fastattn: one page of the paged cache (block_size * heads_kv * "
              "head_dim = ", k_pool.stride(0), " elements) must be below 2^31 elements");
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastattn: ", what, " kernel launch failed: ",
              cudaGetErrorString(err));
}

// Keys per sequence must fit in what the cache can address (S_max, or
// block_table's max_blocks * block_size): past it the kernels would clamp the
// length and silently attend to fewer keys. Checking reads max(seqlens) on
// the host (one sync, as flash-attn 2.8 does); under CUDA-graph capture a
// read is impossible, the check is skipped and the kernels' clamping stays
// (documented on the ops).
inline void check_lengths_fit(const at::Tensor& seqlens, int64_t capacity, const char* capacity_name,
                              const char* capacity_what) {
  if (seqlens.numel() == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const int64_t longest = seqlens.max().item<int64_t>();
  TORCH_CHECK(longest <= capacity, "fastattn: a sequence holds ", longest, " keys but ",
              capacity_name, " addresses only ", capacity, " (", capacity_what, "); give ",
              capacity_name, " room for every key, new ones included");
}

}  // namespace glue
}  // namespace fastattn
