// The two scans over chunks of fastattn.linear's chunked training path
// (linear_state_scan / linear_state_scan_bwd; the math: csrc/ops.cpp), in
// ATen ops only, so the same code serves any device: the CPU backend, and the
// CUDA backend for dtypes and sizes its kernels do not take. Every chunk is a
// few batched matmuls over (B, HV); the chunks run in order.
//
// The products take the state, u (forward), dS and du (backward) rounded to
// the operands' dtype, as the CUDA kernels do (they feed them to the tensor
// cores from shared memory in that dtype), so that both backends compute one
// function; the states themselves are carried in float32 (float64).
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu/linear_cpu.h"
#include "torch/linear_scan_problem.h"

namespace fastattn::cpu {
namespace {

// x rounded to `operand` and back to x's dtype (a no-op when they agree).
at::Tensor as_operand(const at::Tensor& x, at::ScalarType operand) {
  return x.scalar_type() == operand ? x : x.to(operand).to(x.scalar_type());
}

at::Tensor chunk_of(const at::Tensor& t, int64_t c) { return t.select(2, c); }

at::Tensor decay(const at::Tensor& decay_last, int64_t c) {
  return decay_last.select(2, c).unsqueeze(-1).unsqueeze(-1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_state_scan_cpu(
    const at::Tensor& qt, const at::Tensor& kt, const at::Tensor& u, const std::optional<at::Tensor>& w,
    const at::Tensor& o_intra, const at::Tensor& decay_last, const std::optional<at::Tensor>& initial_state) {
  const LinearScanProblem s = check_linear_state_scan_args(qt, kt, u, w, o_intra, decay_last, initial_state);
  const at::ScalarType sd = s.state_dtype, operand = qt.scalar_type();
  const auto state_opts = qt.options().dtype(sd);
  const at::Tensor Qt = qt.to(sd), Kt = kt.to(sd), U = u.to(sd), Oi = o_intra.to(sd);
  const at::Tensor W = w ? w->to(sd) : at::Tensor();
  at::Tensor S = initial_state ? initial_state->clone() : at::zeros({s.B, s.HV, s.K, s.V}, state_opts);
  auto out = at::empty(o_intra.sizes(), o_intra.options());
  auto states = at::empty({s.B, s.HV, s.N, s.K, s.V}, state_opts);
  auto u_out = w ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  for (int64_t c = 0; c < s.N; ++c) {
    chunk_of(states, c).copy_(S);
    const at::Tensor S_operand = as_operand(S, operand);
    at::Tensor uc = chunk_of(U, c);
    if (w) {
      uc = as_operand(uc - at::matmul(chunk_of(W, c), S_operand), operand);
      chunk_of(u_out, c).copy_(uc);
    }
    chunk_of(out, c).copy_(chunk_of(Oi, c) + at::matmul(chunk_of(Qt, c), S_operand));
    S = decay(decay_last, c) * S + at::matmul(chunk_of(Kt, c).transpose(-1, -2), uc);
  }
  return {out, S, states, u_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_state_scan_bwd_cpu(
    const at::Tensor& qs, const at::Tensor& kt, const std::optional<at::Tensor>& w, const at::Tensor& x,
    const at::Tensor& dout, const at::Tensor& decay_last, const std::optional<at::Tensor>& dfinal) {
  const LinearScanProblem s = check_linear_state_scan_bwd_args(qs, kt, w, x, dout, decay_last, dfinal);
  const at::ScalarType sd = s.state_dtype, operand = qs.scalar_type();
  const auto state_opts = qs.options().dtype(sd);
  const at::Tensor Qs = qs.to(sd), Kt = kt.to(sd), X = x.to(sd), dO = dout.to(sd);
  const at::Tensor W = w ? w->to(sd) : at::Tensor();
  at::Tensor dS = dfinal ? dfinal->clone() : at::zeros({s.B, s.HV, s.K, s.V}, state_opts);
  auto du = at::empty({s.B, s.HV, s.N, LinearScanProblem::kChunk, s.V}, state_opts);
  auto dstates = at::empty({s.B, s.HV, s.N, s.K, s.V}, state_opts);
  for (int64_t c = s.N - 1; c >= 0; --c) {
    chunk_of(dstates, c).copy_(dS);
    const at::Tensor duc = chunk_of(X, c) + at::matmul(chunk_of(Kt, c), as_operand(dS, operand));
    chunk_of(du, c).copy_(duc);
    at::Tensor next = decay(decay_last, c) * dS + at::matmul(chunk_of(Qs, c).transpose(-1, -2), chunk_of(dO, c));
    if (w) next = next - at::matmul(chunk_of(W, c).transpose(-1, -2), as_operand(duc, operand));
    dS = next;
  }
  return {du, dstates, dS};
}

}  // namespace fastattn::cpu
