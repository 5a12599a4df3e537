// CUDA glue of linear_state_scan / linear_state_scan_bwd (the scans over
// chunks of fastattn.linear's chunked training path; schemas and math:
// csrc/ops.cpp): the scan kernels (linear_chunk_scan.cu and
// linear_chunk_scan_bwd.cu) for float16 / bfloat16 with K in {64, 128} and V a
// multiple of 32;
// other calls run the ATen implementation (csrc/cpu/linear_train_cpu.cpp) on
// the device. No host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/linear_cpu.h"
#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_params.h"
#include "torch/cuda_glue.h"
#include "torch/linear_train_problem.h"

namespace fastattn {
namespace {

bool kernels_serve(const LinearScanProblem& s, const at::Tensor& operand) {
  return (operand.scalar_type() == at::kHalf || operand.scalar_type() == at::kBFloat16) &&
         gpu::linear_scan_supported(static_cast<int>(s.K), static_cast<int>(s.V)) && s.B <= 65535 &&
         s.HV <= 65535 && s.N <= (int64_t{1} << 24);
}

ElemType elem_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_chunk_prepare_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& g_in, const at::Tensor& beta_in, double scale, bool delta) {
  const LinearScanProblem s = check_linear_chunk_prepare_args(q_in, k_in, v_in, g_in, beta_in);
  const bool served = (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16) &&
                      gpu::linear_chunk_supported(static_cast<int>(s.K), static_cast<int>(s.V)) &&
                      s.B <= 65535 && s.HV <= 65535 && s.N * LinearScanProblem::kChunk <= (int64_t{1} << 30);
  if (!served) return cpu::linear_chunk_prepare_cpu(q_in, k_in, v_in, g_in, beta_in, scale, delta);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous(), beta = beta_in.contiguous();
  constexpr int64_t C = LinearChunkParams::kChunk;
  const int64_t rows = s.N * C;  // rows per (batch, value head): the chunks back to back
  const auto fopts = q.options().dtype(at::kFloat);
  auto qt = at::empty(q.sizes(), q.options()), kt = at::empty(k.sizes(), k.options());
  auto w = delta ? at::empty(k.sizes(), k.options()) : at::empty({0}, k.options());
  auto u = delta ? at::empty(v.sizes(), v.options()) : at::empty({0}, v.options());
  auto o_intra = at::empty(v.sizes(), v.options());
  auto decay = at::empty({s.B, s.HV, s.N}, fopts);
  auto m = at::empty({s.B, s.HV, s.N, C, C}, q.options());
  auto b = at::empty(g.sizes(), fopts);
  LinearChunkParams p;
  // The inputs as (B, T = rows, H = HV, .) through strides: the kernel reads per value head.
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_b = s.HV * rows * s.K, p.q_stride_t = s.K, p.q_stride_h = rows * s.K;
  p.k_stride_b = p.q_stride_b, p.k_stride_t = p.q_stride_t, p.k_stride_h = p.q_stride_h;
  p.v_stride_b = s.HV * rows * s.V, p.v_stride_t = s.V, p.v_stride_h = rows * s.V;
  p.g = g.data_ptr<float>();
  p.beta = delta ? beta.data_ptr<float>() : nullptr;
  p.g_stride_b = s.HV * rows, p.g_stride_t = 1, p.g_stride_h = rows;
  p.qt = qt.data_ptr();
  p.kt = kt.data_ptr();
  p.w = delta ? w.data_ptr() : nullptr;
  p.u = delta ? u.data_ptr() : nullptr;
  p.o_intra = o_intra.data_ptr();
  p.decay_last = decay.data_ptr<float>();
  p.m_out = m.data_ptr();
  p.b_out = b.data_ptr<float>();
  p.B = static_cast<int>(s.B), p.T = static_cast<int>(rows), p.H = static_cast<int>(s.HV);
  p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K), p.V = static_cast<int>(s.V);
  p.N = static_cast<int>(s.B);
  p.chunks = static_cast<int>(s.N);
  p.scale = static_cast<float>(scale);
  p.delta = delta;
  p.dtype = elem_of(q);
  glue::check_launch(gpu::run_linear_chunk_local(p, at::cuda::getCurrentCUDAStream()), "linear_chunk_prepare");
  return {qt, kt, w, u, o_intra, decay, m, b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_state_scan_cuda(
    const at::Tensor& qt_in, const at::Tensor& kt_in, const at::Tensor& u_in,
    const std::optional<at::Tensor>& w_in, const at::Tensor& o_intra_in, const at::Tensor& decay_in,
    const std::optional<at::Tensor>& initial_in) {
  const LinearScanProblem s = check_linear_state_scan_args(qt_in, kt_in, u_in, w_in, o_intra_in, decay_in,
                                                           initial_in);
  if (!kernels_serve(s, qt_in)) {
    return cpu::linear_state_scan_cpu(qt_in, kt_in, u_in, w_in, o_intra_in, decay_in, initial_in);
  }
  c10::cuda::CUDAGuard guard(qt_in.device());
  const at::Tensor qt = qt_in.contiguous(), kt = kt_in.contiguous(), u = u_in.contiguous();
  const at::Tensor o_intra = o_intra_in.contiguous(), decay = decay_in.contiguous();
  const std::optional<at::Tensor> w = contiguous(w_in), initial = contiguous(initial_in);
  const bool delta = w.has_value();
  const auto fopts = qt.options().dtype(at::kFloat);
  auto out = at::empty(o_intra.sizes(), o_intra.options());
  auto final_state = at::empty({s.B, s.HV, s.K, s.V}, fopts);
  auto states = at::empty({s.B, s.HV, s.N, s.K, s.V}, fopts);
  auto u_out = delta ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());

  constexpr int64_t C = LinearChunkParams::kChunk;
  const int64_t rows = s.N * C;  // workspace rows per (batch, value head)
  LinearChunkParams p;
  p.qt = qt.data_ptr();
  p.kt = kt.data_ptr();
  p.w = w ? w->data_ptr() : nullptr;
  p.o_intra = o_intra.data_ptr();
  // Without the delta rule the scan reads U = V through v's strides ((B, T, HV, V) addressing of
  // the (B, HV, rows, V) workspace); with it, u.
  p.v = u.data_ptr();
  p.v_stride_b = s.HV * rows * s.V, p.v_stride_h = rows * s.V, p.v_stride_t = s.V;
  if (delta) p.u = u.data_ptr();
  p.decay_last = decay.data_ptr<float>();
  if (initial) {
    p.state_in.ptr = const_cast<float*>(initial->data_ptr<float>());
    p.state_in.stride_slot = initial->stride(0), p.state_in.stride_head = initial->stride(1);
    p.state_in.stride_k = initial->stride(2), p.state_in.stride_v = initial->stride(3);
  }
  p.state_out.ptr = final_state.data_ptr<float>();
  p.state_out.stride_slot = final_state.stride(0), p.state_out.stride_head = final_state.stride(1);
  p.state_out.stride_k = final_state.stride(2), p.state_out.stride_v = final_state.stride(3);
  p.out = out.data_ptr();
  p.out_stride_b = s.HV * rows * s.V, p.out_stride_h = rows * s.V, p.out_stride_t = s.V;
  p.chunk_states = states.data_ptr<float>();
  p.u_out = delta ? u_out.data_ptr() : nullptr;
  p.B = static_cast<int>(s.B), p.T = static_cast<int>(rows), p.H = static_cast<int>(s.HV);
  p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K), p.V = static_cast<int>(s.V);
  p.N = static_cast<int>(s.B);
  p.chunks = static_cast<int>(s.N);
  p.delta = delta;
  p.dtype = elem_of(qt);
  glue::check_launch(gpu::run_linear_state_scan(p, at::cuda::getCurrentCUDAStream()), "linear_state_scan");
  return {out, final_state, states, u_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_state_scan_bwd_cuda(
    const at::Tensor& qs_in, const at::Tensor& kt_in, const std::optional<at::Tensor>& w_in,
    const at::Tensor& x_in, const at::Tensor& dout_in, const at::Tensor& decay_in,
    const std::optional<at::Tensor>& dfinal_in) {
  const LinearScanProblem s = check_linear_state_scan_bwd_args(qs_in, kt_in, w_in, x_in, dout_in, decay_in,
                                                               dfinal_in);
  if (!kernels_serve(s, qs_in)) {
    return cpu::linear_state_scan_bwd_cpu(qs_in, kt_in, w_in, x_in, dout_in, decay_in, dfinal_in);
  }
  c10::cuda::CUDAGuard guard(qs_in.device());
  const at::Tensor qs = qs_in.contiguous(), kt = kt_in.contiguous(), x = x_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(), decay = decay_in.contiguous();
  const std::optional<at::Tensor> w = contiguous(w_in), dfinal = contiguous(dfinal_in);
  const auto fopts = qs.options().dtype(at::kFloat);
  auto du = at::empty({s.B, s.HV, s.N, LinearScanProblem::kChunk, s.V}, fopts);
  auto dstates = at::empty({s.B, s.HV, s.N, s.K, s.V}, fopts);
  auto dinitial = at::empty({s.B, s.HV, s.K, s.V}, fopts);
  LinearScanBwdParams p;
  p.qs = qs.data_ptr();
  p.kt = kt.data_ptr();
  p.w = ptr_or_null(w);
  p.x = x.data_ptr();
  p.dout = dout.data_ptr();
  p.decay_last = decay.data_ptr<float>();
  p.dfinal = dfinal ? dfinal->data_ptr<float>() : nullptr;
  p.du = du.data_ptr<float>();
  p.dstates = dstates.data_ptr<float>();
  p.dinitial = dinitial.data_ptr<float>();
  p.B = static_cast<int>(s.B), p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V), p.chunks = static_cast<int>(s.N);
  p.delta = w.has_value();
  p.dtype = elem_of(qs);
  glue::check_launch(gpu::run_linear_state_scan_bwd(p, at::cuda::getCurrentCUDAStream()),
                     "linear_state_scan_bwd");
  return {du, dstates, dinitial};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_bwd_local_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& dout_in,
    const at::Tensor& b_in, const at::Tensor& states_in, const at::Tensor& dstates_in, double scale,
    const std::optional<at::Tensor>& beta_in, const std::optional<at::Tensor>& u_in,
    const std::optional<at::Tensor>& du_in) {
  const LinearScanProblem s = check_linear_chunk_bwd_local_args(q_in, k_in, v_in, dout_in, b_in, states_in,
                                                                dstates_in, beta_in, u_in, du_in);
  const bool served = (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16) &&
                      gpu::linear_chunk_supported(static_cast<int>(s.K), static_cast<int>(s.V)) &&
                      s.B <= 65535 && s.HV <= 65535 && s.N <= (int64_t{1} << 30);
  if (!served) {
    return cpu::linear_chunk_bwd_local_cpu(q_in, k_in, v_in, dout_in, b_in, states_in, dstates_in, scale,
                                           beta_in, u_in, du_in);
  }
  c10::cuda::CUDAGuard guard(q_in.device());
  const bool delta = beta_in.has_value();
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(), b = b_in.contiguous();
  const at::Tensor states = states_in.contiguous(), dstates = dstates_in.contiguous();
  const std::optional<at::Tensor> beta = contiguous(beta_in), u = contiguous(u_in), du = contiguous(du_in);
  const auto fopts = q.options().dtype(at::kFloat);
  auto dq = at::empty(q.sizes(), fopts);
  auto dk = at::empty(k.sizes(), fopts);
  auto db = at::empty(b.sizes(), fopts);
  auto dv = delta ? at::empty(v.sizes(), fopts) : at::empty({0}, fopts);
  auto dbeta = delta ? at::empty(b.sizes(), fopts) : at::empty({0}, fopts);
  LinearChunkBwdLocalParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.b = b.data_ptr<float>();
  p.states = states.data_ptr<float>();
  p.dstates = dstates.data_ptr<float>();
  if (delta) {
    p.beta = beta->data_ptr<float>();
    p.u = u->data_ptr();
    p.du = du->data_ptr();
    p.dv = dv.data_ptr<float>();
    p.dbeta = dbeta.data_ptr<float>();
  }
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.db = db.data_ptr<float>();
  p.B = static_cast<int>(s.B), p.HV = static_cast<int>(s.HV), p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V), p.chunks = static_cast<int>(s.N);
  p.scale = static_cast<float>(scale);
  p.dtype = elem_of(q);
  glue::check_launch(gpu::run_linear_chunk_bwd_local(p, at::cuda::getCurrentCUDAStream()),
                     "linear_chunk_bwd_local");
  return {dq, dk, db, dv, dbeta};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linear_chunk_prepare", &fastattn::linear_chunk_prepare_cuda);
  m.impl("linear_state_scan", &fastattn::linear_state_scan_cuda);
  m.impl("linear_state_scan_bwd", &fastattn::linear_state_scan_bwd_cuda);
  m.impl("linear_chunk_bwd_local", &fastattn::linear_chunk_bwd_local_cuda);
}
