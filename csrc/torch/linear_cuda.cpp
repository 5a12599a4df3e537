// CUDA glue of linear_recurrent / linear_recurrent_update: checks, params
// from tensors, launch on the current stream. linear_recurrent runs the
// recurrence kernel (linear_recurrent.cu), or for long dense sequences the
// chunked kernels (linear_chunk_*.cu). No host sync and no reads of
// device data (CUDA-graph capturable): a state_indices slot outside the pool
// makes its sequence padding (zero state, nothing written) instead of raising.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
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

// Sequences longer than one chunk go through the chunked kernels
// (linear_chunk_params.h) when they serve the call: dense batches (no
// cu_seqlens, no state pool), K == V in {64, 128}, fp16/bf16, a decay per
// (token, head) or none.
constexpr int64_t kChunkedMinT = LinearChunkParams::kChunk + 1;

bool chunked_serves(const LinearRecurrentProblem& s, const at::Tensor& q,
                    const std::optional<at::Tensor>& state_indices,
                    const std::optional<at::Tensor>& cu_seqlens) {
  return s.T >= kChunkedMinT && !cu_seqlens && !state_indices && !s.g_per_key &&
         (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
         gpu::linear_chunk_supported(static_cast<int>(s.K), static_cast<int>(s.V)) && s.B <= 65535;
}

// The cp.async tiles read 16-byte pieces: base and row strides aligned.
at::Tensor chunk_readable(const at::Tensor& t) {
  const int64_t e = t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.stride(d) * e) % 16 == 0;
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> linear_chunked_cuda(
    const LinearRecurrentProblem& s, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& initial_state, double scale, bool delta, bool qk_l2norm,
    bool state_v_first, bool output_final_state) {
  at::Tensor q = q_in, k = k_in;
  if (qk_l2norm) {  // x / sqrt(|x|^2 + 1e-6) in fp32, rounded to the input dtype for the tiles
    auto l2 = [](const at::Tensor& x) {
      const at::Tensor xf = x.to(at::kFloat);
      return (xf * at::rsqrt(xf.pow(2).sum(-1, true) + 1e-6)).to(x.scalar_type());
    };
    q = l2(q);
    k = l2(k);
  }
  q = chunk_readable(q);
  k = chunk_readable(k);
  const at::Tensor v = chunk_readable(v_in);
  LinearChunkParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_t = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_t = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_t = v.stride(1), p.v_stride_h = v.stride(2);
  p.g = g ? g->data_ptr<float>() : nullptr;
  p.beta = beta ? beta->data_ptr<float>() : nullptr;
  p.B = static_cast<int>(s.B), p.T = static_cast<int>(s.T), p.H = static_cast<int>(s.H);
  p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K), p.V = static_cast<int>(s.V);
  p.chunks = static_cast<int>((s.T + LinearChunkParams::kChunk - 1) / LinearChunkParams::kChunk);
  p.scale = static_cast<float>(scale);
  p.delta = delta;
  p.dtype = q.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;

  auto work = at::empty({gpu::linear_chunk_workspace_elems(p)}, q.options());
  auto work_f = at::empty({gpu::linear_chunk_workspace_floats(p)}, q.options().dtype(at::kFloat));
  const int64_t rows = static_cast<int64_t>(p.B) * p.HV * p.chunks * LinearChunkParams::kChunk;
  char* base = static_cast<char*>(work.data_ptr());
  const int64_t eb = work.element_size();
  int64_t at_elem = 0;
  auto take = [&](int64_t elems) {
    void* ptr = base + at_elem * eb;
    at_elem += elems;
    return ptr;
  };
  p.qt = take(rows * p.K);
  p.kt = take(rows * p.K);
  p.o_intra = take(rows * p.V);
  if (delta) {
    p.w = take(rows * p.K);
    p.u = take(rows * p.V);
  }
  p.decay_last = work_f.data_ptr<float>();

  at::Tensor h0;
  if (initial_state) {
    h0 = (state_v_first ? initial_state->transpose(-1, -2) : *initial_state).contiguous();
    p.initial_state = h0.data_ptr<float>();
  }
  auto final_state = at::empty(output_final_state ? at::IntArrayRef({s.N, s.HV, s.K, s.V})
                                                  : at::IntArrayRef({0}),
                               q.options().dtype(at::kFloat));
  if (output_final_state) p.final_state = final_state.data_ptr<float>();
  auto out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = out.data_ptr();
  glue::check_launch(gpu::run_linear_chunk_fwd(p, at::cuda::getCurrentCUDAStream()),
                     "linear chunked forward");
  if (output_final_state && state_v_first) final_state = final_state.transpose(-1, -2).contiguous();
  return {out, final_state};
}

std::tuple<at::Tensor, at::Tensor> linear_recurrent_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& state_indices, const std::optional<at::Tensor>& cu_seqlens,
    double scale, bool delta, bool qk_l2norm, bool state_v_first, bool output_final_state) {
  const LinearRecurrentProblem s = check_linear_recurrent_args(q, k, v, g, beta, initial_state,
                                                               state_indices, cu_seqlens, state_v_first);
  c10::cuda::CUDAGuard guard(q.device());
  if (chunked_serves(s, q, state_indices, cu_seqlens)) {
    glue::check_cuda_devices(q, {{&k, "k"},
                                 {&v, "v"},
                                 {g ? &*g : nullptr, "g"},
                                 {beta ? &*beta : nullptr, "beta"},
                                 {initial_state ? &*initial_state : nullptr, "initial_state"}});
    return linear_chunked_cuda(s, q, k, v, g, beta, initial_state, scale, delta, qk_l2norm,
                               state_v_first, output_final_state);
  }
  auto out = at::empty(v.sizes(), v.options());
  auto final_state = output_final_state
                         ? at::empty(state_v_first ? at::IntArrayRef({s.N, s.HV, s.V, s.K})
                                                   : at::IntArrayRef({s.N, s.HV, s.K, s.V}),
                                     q.options().dtype(at::kFloat))
                         : at::empty({0}, q.options().dtype(at::kFloat));
  LinearRecurrentParams p = make_params(s, q, k, v, out, g, beta, initial_state, state_indices,
                                        cu_seqlens, scale, delta, qk_l2norm);
  if (initial_state) p.state_in = state_ref(*initial_state, state_v_first, state_indices.has_value());
  if (output_final_state) p.state_out = state_ref(final_state, state_v_first, false);
  glue::check_launch(gpu::run_linear_recurrent(p, at::cuda::getCurrentCUDAStream()),
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
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(v.sizes(), v.options());
  LinearRecurrentParams p = make_params(s, q, k, v, out, g, beta, state, state_indices, cu_seqlens,
                                        scale, delta, qk_l2norm);
  const bool indexed = state_indices.has_value();
  p.state_in = state_ref(state, state_v_first, indexed);
  p.state_out = p.state_in;
  glue::check_launch(gpu::run_linear_recurrent(p, at::cuda::getCurrentCUDAStream()),
                     "linear_recurrent_update");
  return out;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linear_recurrent", &fastattn::linear_recurrent_cuda);
  m.impl("linear_recurrent_update", &fastattn::linear_recurrent_update_cuda);
}
