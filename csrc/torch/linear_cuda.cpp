// CUDA glue of linear_recurrent / linear_recurrent_update: checks, params
// from tensors, launch on the current stream. cu_seqlens is not validated on
// the host (that would sync): the kernels clamp its values into [0, T]. linear_recurrent runs the
// recurrence kernel (linear_recurrent.cu), or for long dense sequences the
// chunked kernels (linear_chunk_*.cu). No host sync and no reads of
// device data (CUDA-graph capturable): a state_indices slot outside the pool
// makes its sequence padding (zero state, nothing written) instead of raising.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_params.h"
#include "cuda/linear/linear_launch.h"
#include "cuda/linear/linear_params.h"
#include "torch/cuda_glue.h"
#include "torch/linear_problem.h"

namespace fastattn {
namespace {

LinearElem linear_elem(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kHalf: return LinearElem::kFloat16;
    case at::kBFloat16: return LinearElem::kBFloat16;
    case at::kFloat: return LinearElem::kFloat32;
    default:
      TORCH_CHECK(false, "fastattn.linear: the CUDA recurrence takes float16, bfloat16 or float32, got ",
                  q.scalar_type());
  }
  return LinearElem::kFloat32;
}

LinearStateRef state_ref(const at::Tensor& t, bool state_v_first, bool indexed) {
  LinearStateRef r;
  r.ptr = t.data_ptr<float>();
  r.stride_slot = t.stride(0);
  r.stride_head = t.stride(1);
  r.stride_k = state_v_first ? t.stride(3) : t.stride(2);
  r.stride_v = state_v_first ? t.stride(2) : t.stride(3);
  r.indexed = indexed;
  return r;
}

// Params for everything but the states.
LinearRecurrentParams make_params(const LinearRecurrentProblem& s, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const std::optional<at::Tensor>& g,
                                  const std::optional<at::Tensor>& beta,
                                  const std::optional<at::Tensor>& state,
                                  const std::optional<at::Tensor>& state_indices,
                                  const std::optional<at::Tensor>& cu_seqlens, double scale,
                                  bool delta, bool qk_l2norm) {
  glue::check_cuda_devices(q, {{&k, "k"},
                               {&v, "v"},
                               {g ? &*g : nullptr, "g"},
                               {beta ? &*beta : nullptr, "beta"},
                               {state ? &*state : nullptr, "state"},
                               {state_indices ? &*state_indices : nullptr, "state_indices"},
                               {cu_seqlens ? &*cu_seqlens : nullptr, "cu_seqlens"}});
  TORCH_CHECK(s.K <= gpu::kLinearRecurrentMaxK, "fastattn.linear: the CUDA recurrence takes key dims up "
              "to ", gpu::kLinearRecurrentMaxK, ", got ", s.K);
  TORCH_CHECK(s.HV <= 65535, "fastattn.linear: at most 65535 value heads, got ", s.HV);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(t->numel() == 0 || t->stride(3) == 1, "fastattn.linear: ", name,
                " must have a contiguous last dim, got strides ", t->strides());
  }
  LinearRecurrentParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_t = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_t = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_t = v.stride(1), p.v_stride_h = v.stride(2);
  p.o_stride_b = out.stride(0), p.o_stride_t = out.stride(1), p.o_stride_h = out.stride(2);
  p.g = g ? g->data_ptr<float>() : nullptr;
  p.g_per_key = s.g_per_key;
  p.beta = beta ? beta->data_ptr<float>() : nullptr;
  if (state_indices) {
    p.indices = state_indices->data_ptr();
    p.indices_int64 = state_indices->scalar_type() == at::kLong;
    p.num_slots = state->size(0);
  }
  p.cu_seqlens = cu_seqlens ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.B = static_cast<int>(s.B), p.T = static_cast<int>(s.T), p.H = static_cast<int>(s.H);
  p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K), p.V = static_cast<int>(s.V);
  p.N = static_cast<int>(s.N);
  p.scale = static_cast<float>(scale);
  p.delta = delta;
  p.qk_l2norm = qk_l2norm;
  p.dtype = linear_elem(q);
  return p;
}

// Calls with more than one chunk of tokens go through the chunked kernels
// (linear_chunk_params.h) when they serve them: K and V in {64, 128},
// fp16/bf16, a decay per (token, head) or none, and for varlen batches an
// average of at least 8 tokens per sequence (decode batches, one to a few
// tokens per sequence, stay on the recurrence kernel, which needs no workspace).
// Instantiations that have not run on a GPU yet, K != V and per-key decays
// (GLA, no delta rule), serve only with FASTATTN_LINEAR_CUDA_TRAIN=1 (the
// switch of the linear kernels awaiting their first GPU run;
// python/fastattn/linear/chunked.py).
bool unverified_kernels_enabled() {
  const char* v = std::getenv("FASTATTN_LINEAR_CUDA_TRAIN");
  return v != nullptr && v[0] == '1';
}

bool chunked_serves(const LinearRecurrentProblem& s, const at::Tensor& q, bool delta) {
  constexpr int64_t kChunk = LinearChunkParams::kChunk;
  const bool verified = s.K == s.V && !s.g_per_key;
  return s.T > kChunk && (!s.varlen || s.T >= 8 * s.N) && !(s.g_per_key && delta) &&
         (verified || unverified_kernels_enabled()) &&
         (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
         gpu::linear_chunk_supported(static_cast<int>(s.K), static_cast<int>(s.V)) && s.B <= 65535 &&
         s.N <= 65535;
}

// The cp.async tiles read 16-byte pieces: base and row strides aligned.
at::Tensor chunk_readable(const at::Tensor& t) {
  const int64_t e = t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || (t.stride(d) * e) % 16 == 0);
  return ok ? t : t.contiguous();
}

at::Tensor l2_normalized(const at::Tensor& x) {  // x / sqrt(|x|^2 + 1e-6) in fp32
  const at::Tensor xf = x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).sum(-1, true) + 1e-6)).to(x.scalar_type());
}

// The chunked kernels for the call described by rp (states, indices, gates,
// sizes, out); q, k, v: the original tensors (normalized / copied here as the
// tiles need).
void run_chunked(const LinearRecurrentParams& rp, const LinearRecurrentProblem& s, const at::Tensor& q_in,
                 const at::Tensor& k_in, const at::Tensor& v_in,
                 const std::optional<at::Tensor>& cu_seqlens) {
  const at::Tensor q = chunk_readable(rp.qk_l2norm ? l2_normalized(q_in) : q_in);
  const at::Tensor k = chunk_readable(rp.qk_l2norm ? l2_normalized(k_in) : k_in);
  const at::Tensor v = chunk_readable(v_in);
  constexpr int64_t kChunk = LinearChunkParams::kChunk;
  LinearChunkParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_t = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_t = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_t = v.stride(1), p.v_stride_h = v.stride(2);
  p.g = rp.g;
  p.g_per_key = rp.g_per_key;
  if (p.g_per_key) {  // g (B, T, HV, K) contiguous (checked with the problem)
    p.g_stride_h = rp.K, p.g_stride_t = static_cast<int64_t>(rp.HV) * rp.K,
    p.g_stride_b = static_cast<int64_t>(rp.T) * rp.HV * rp.K;
  }
  p.beta = rp.beta;
  p.state_in = rp.state_in;
  p.state_out = rp.state_out;
  p.indices = rp.indices;
  p.indices_int64 = rp.indices_int64;
  p.num_slots = rp.num_slots;
  p.out = rp.out;
  p.out_stride_b = rp.o_stride_b, p.out_stride_t = rp.o_stride_t, p.out_stride_h = rp.o_stride_h;
  p.B = rp.B, p.T = rp.T, p.H = rp.H, p.HV = rp.HV, p.K = rp.K, p.V = rp.V, p.N = rp.N;
  p.scale = rp.scale;
  p.delta = rp.delta;
  p.dtype = q.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
  at::Tensor offsets;
  if (cu_seqlens) {
    // Sequence n owns chunks [offsets[n], offsets[n + 1]); sum ceil(len / 64) <= T / 64 + N.
    const at::Tensor lens = (cu_seqlens->slice(0, 1) - cu_seqlens->slice(0, 0, -1)).clamp_min(0);
    offsets = at::zeros({s.N + 1}, cu_seqlens->options());
    offsets.slice(0, 1).copy_(at::floor_divide(lens + (kChunk - 1), kChunk).cumsum(0));
    p.cu_seqlens = rp.cu_seqlens;
    p.chunk_offsets = offsets.data_ptr<int32_t>();
    p.chunks = static_cast<int>(s.T / kChunk + s.N);
  } else {
    p.chunks = static_cast<int>((s.T + kChunk - 1) / kChunk);
  }
  if (unverified_kernels_enabled()) {  // the wide scan slice: not yet run on a GPU
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    p.scan_cols = gpu::linear_scan_cols_for(p, prop->multiProcessorCount,
                                            static_cast<int>(prop->sharedMemPerMultiprocessor));
  }
  auto work = at::empty({gpu::linear_chunk_workspace_elems(p)}, q.options());
  auto work_f = at::empty({gpu::linear_chunk_workspace_floats(p)}, q.options().dtype(at::kFloat));
  const int64_t rows = static_cast<int64_t>(p.B) * p.HV * p.chunks * kChunk;
  char* next = static_cast<char*>(work.data_ptr());
  auto take = [&](int64_t elems) {
    void* ptr = next;
    next += elems * work.element_size();
    return ptr;
  };
  p.qt = take(rows * p.K);
  p.kt = take(rows * p.K);
  p.o_intra = take(rows * p.V);
  if (p.delta) {
    p.w = take(rows * p.K);
    p.u = take(rows * p.V);
  }
  p.decay_last = work_f.data_ptr<float>();
  glue::check_launch(gpu::run_linear_chunk_fwd(p, at::cuda::getCurrentCUDAStream()),
                     "linear chunked forward");
}

// One call of either op: states read from state_in (indexed by state_indices
// when given), written to state_out (indexed when out_indexed).
at::Tensor run_linear(const LinearRecurrentProblem& s, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const std::optional<at::Tensor>& g,
                      const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& state_in,
                      const at::Tensor* state_out, bool out_indexed,
                      const std::optional<at::Tensor>& state_indices,
                      const std::optional<at::Tensor>& cu_seqlens, double scale, bool delta,
                      bool qk_l2norm, bool state_v_first, const char* what) {
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(v.sizes(), v.options());
  LinearRecurrentParams p = make_params(s, q, k, v, out, g, beta, state_in, state_indices, cu_seqlens,
                                        scale, delta, qk_l2norm);
  if (state_in) p.state_in = state_ref(*state_in, state_v_first, state_indices.has_value());
  if (state_out != nullptr) p.state_out = state_ref(*state_out, state_v_first, out_indexed);
  if (chunked_serves(s, q, delta)) {
    run_chunked(p, s, q, k, v, cu_seqlens);
  } else {
    glue::check_launch(gpu::run_linear_recurrent(p, at::cuda::getCurrentCUDAStream()), what);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_recurrent_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& state_indices, const std::optional<at::Tensor>& cu_seqlens,
    double scale, bool delta, bool qk_l2norm, bool state_v_first, bool output_final_state) {
  const LinearRecurrentProblem s = check_linear_recurrent_args(q, k, v, g, beta, initial_state,
                                                               state_indices, cu_seqlens, state_v_first);
  auto final_state = output_final_state
                         ? at::empty(state_v_first ? at::IntArrayRef({s.N, s.HV, s.V, s.K})
                                                   : at::IntArrayRef({s.N, s.HV, s.K, s.V}),
                                     q.options().dtype(at::kFloat))
                         : at::empty({0}, q.options().dtype(at::kFloat));
  auto out = run_linear(s, q, k, v, g, beta, initial_state, output_final_state ? &final_state : nullptr,
                        false, state_indices, cu_seqlens, scale, delta, qk_l2norm, state_v_first,
                        "linear_recurrent");
  return {out, final_state};
}

at::Tensor linear_recurrent_update_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& g,
                                        const std::optional<at::Tensor>& beta, at::Tensor& state,
                                        const std::optional<at::Tensor>& state_indices,
                                        const std::optional<at::Tensor>& cu_seqlens, double scale,
                                        bool delta, bool qk_l2norm, bool state_v_first) {
  const LinearRecurrentProblem s = check_linear_recurrent_args(q, k, v, g, beta, state, state_indices,
                                                               cu_seqlens, state_v_first);
  return run_linear(s, q, k, v, g, beta, state, &state, state_indices.has_value(), state_indices,
                    cu_seqlens, scale, delta, qk_l2norm, state_v_first, "linear_recurrent_update");
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linear_recurrent", &fastattn::linear_recurrent_cuda);
  m.impl("linear_recurrent_update", &fastattn::linear_recurrent_update_cuda);
}
