// The ops of fastattn.linear's chunked training path (the math:
// csrc/ops.cpp): the two scans over chunks (linear_state_scan[_bwd]) and the
// chunk-local gradients (linear_chunk_bwd_local), in ATen ops only, so the
// same code serves any device: the CPU backend, and the CUDA backend for
// dtypes and sizes its kernels do not take. In the scans every chunk is a few
// batched matmuls over (B, HV) and the chunks run in order; the chunk-local
// gradients are batched over all chunks at once.
//
// The products take the state, u (forward), dS and du (backward), the states
// and M o Gamma (chunk-local gradients) rounded to the operands' dtype, as the
// CUDA kernels do (they feed them to the tensor cores from shared memory in
// that dtype), so that both backends compute one function; the states
// themselves are carried in float32 (float64).
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu/linear_cpu.h"
#include "torch/linear_train_problem.h"

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_chunk_prepare_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                         const at::Tensor& beta, double scale, bool delta) {
  const LinearScanProblem s = check_linear_chunk_prepare_args(q, k, v, g, beta);
  const at::ScalarType sd = s.state_dtype, operand = q.scalar_type();
  const at::Tensor Q = q.to(sd), Kc = k.to(sd), Vc = v.to(sd);
  const int64_t C = LinearScanProblem::kChunk;
  const at::Tensor b = g.cumsum(-1), e = b.exp();
  const at::Tensor idx = at::arange(C, g.options().dtype(at::kLong));
  const at::Tensor lower = idx.unsqueeze(-1) >= idx.unsqueeze(0);
  const at::Tensor zero = at::zeros({}, g.options());
  const at::Tensor gam =
      at::where(lower, (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(lower.logical_not(), 0).exp(), zero);
  const at::Tensor m = as_operand(at::matmul(Q, Kc.transpose(-1, -2)) * gam, operand);
  const at::Tensor b_last = b.narrow(-1, C - 1, 1);
  const at::Tensor kt = (b_last - b).exp().unsqueeze(-1) * Kc;
  at::Tensor qt = scale * e.unsqueeze(-1) * Q, U = Vc, w = at::empty({0}, q.options()),
             u = at::empty({0}, q.options());
  if (delta) {
    const at::Tensor strict = idx.unsqueeze(-1) > idx.unsqueeze(0);
    const at::Tensor A = at::where(strict, beta.unsqueeze(-1) * at::matmul(Kc, Kc.transpose(-1, -2)) * gam, zero);
    const at::Tensor eye = at::eye(C, g.options());
    const at::Tensor T = at::linalg_solve_triangular(eye + A, eye.expand_as(A), /*upper=*/false, /*left=*/true,
                                                     /*unitriangular=*/true);
    // T diag(beta) rounded once (the kernel folds beta into T's columns).
    const at::Tensor Tb = as_operand(T * beta.unsqueeze(-2), operand);
    const at::Tensor W = as_operand(at::matmul(Tb, as_operand(e.unsqueeze(-1) * Kc, operand)), operand);
    U = as_operand(at::matmul(Tb, Vc), operand);
    qt = qt - scale * at::matmul(m, W);
    w = W.to(operand);
    u = U.to(operand);
  }
  const at::Tensor o_intra = scale * at::matmul(m, U);
  return {qt.to(operand), kt.to(operand), w, u, o_intra.to(operand), b_last.squeeze(-1).exp(), m.to(operand), b};
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_bwd_local_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& b,
    const at::Tensor& states, const at::Tensor& dstates, double scale, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& du) {
  const LinearScanProblem s = check_linear_chunk_bwd_local_args(q, k, v, dout, b, states, dstates, beta, u, du);
  const at::ScalarType sd = s.state_dtype, operand = q.scalar_type();
  const bool delta = beta.has_value();
  const at::Tensor Q = q.to(sd), Kc = k.to(sd), Vc = v.to(sd), dO = dout.to(sd);
  const at::Tensor U = delta ? u->to(sd) : Vc;  // the updates the state took
  const at::Tensor S0 = as_operand(states, operand), dS1 = as_operand(dstates, operand);
  const int64_t C = LinearScanProblem::kChunk;
  const at::Tensor idx = at::arange(C, b.options().dtype(at::kLong));
  const at::Tensor lower = idx.unsqueeze(-1) >= idx.unsqueeze(0);
  const at::Tensor zero = at::zeros({}, b.options());
  // Gamma_ij = e^{b_i - b_j} on j <= i (exponents <= 0 there), 0 above.
  const at::Tensor diff = b.unsqueeze(-1) - b.unsqueeze(-2);
  const at::Tensor gam = at::where(lower, diff.masked_fill(lower.logical_not(), 0).exp(), zero);
  const at::Tensor qk = at::matmul(Q, Kc.transpose(-1, -2));
  const at::Tensor dm = (scale * at::matmul(dO, U.transpose(-1, -2))).tril();
  const at::Tensor mg = as_operand(dm * gam, operand);
  const at::Tensor e = b.exp(), to_end = (b.narrow(-1, C - 1, 1) - b).exp();
  const at::Tensor do_s0 = at::matmul(dO, S0.transpose(-1, -2));  // (C x K)
  const at::Tensor dkt = at::matmul(U, dS1.transpose(-1, -2));    // (C x K)
  const at::Tensor dq = scale * e.unsqueeze(-1) * do_s0 + at::matmul(mg, Kc);
  at::Tensor dk = to_end.unsqueeze(-1) * dkt + at::matmul(mg.transpose(-1, -2), Q);
  const at::Tensor s_kt = to_end * (Kc * dkt).sum(-1);
  at::Tensor G = mg * qk;  // with Mg as rounded for the products (the kernel takes G's sums from them)
  at::Tensor db = scale * (Q * do_s0).sum(-1) * e - s_kt;
  at::Tensor dv = at::empty({0}, q.options().dtype(sd)), dbeta = at::empty({0}, q.options().dtype(sd));
  if (delta) {
    const at::Tensor bt = *beta, dU = du->to(sd);
    const at::Tensor strict = idx.unsqueeze(-1) > idx.unsqueeze(0);
    const at::Tensor kk = at::matmul(Kc, Kc.transpose(-1, -2));
    const at::Tensor A = at::where(strict, bt.unsqueeze(-1) * kk * gam, zero);
    const at::Tensor eye = at::eye(C, b.options());
    const at::Tensor T = as_operand(at::linalg_solve_triangular(eye + A, eye.expand_as(A), /*upper=*/false,
                                                                /*left=*/true, /*unitriangular=*/true),
                                    operand);
    const at::Tensor dW = as_operand(-at::matmul(dU, S0.transpose(-1, -2)), operand);
    const at::Tensor dT = as_operand(bt.unsqueeze(-2) * (at::matmul(dU, Vc.transpose(-1, -2)) +
                                                         e.unsqueeze(-2) * at::matmul(dW, Kc.transpose(-1, -2))),
                                     operand);
    const at::Tensor dbv = at::matmul(T.transpose(-1, -2), dU), dbek = at::matmul(T.transpose(-1, -2), dW);
    dv = bt.unsqueeze(-1) * dbv;
    const at::Tensor r = e * (Kc * dbek).sum(-1);
    dk = dk + (bt * e).unsqueeze(-1) * dbek;
    const at::Tensor Y = as_operand(at::matmul(dT, T.transpose(-1, -2)), operand);
    const at::Tensor dA = at::where(strict, -at::matmul(T.transpose(-1, -2), Y), zero);
    const at::Tensor X = as_operand(bt.unsqueeze(-1) * dA * gam, operand);
    dk = dk + at::matmul(X + X.transpose(-1, -2), Kc);
    dbeta = (Vc * dbv).sum(-1) + r + (dA * kk * gam).sum(-1);
    db = db + bt * r;
    G = G + X * kk;
  }
  db = db + G.sum(-1) - G.sum(-2);
  db.select(-1, C - 1).add_(s_kt.sum(-1) + (states * dstates).sum({-1, -2}) * e.select(-1, C - 1));
  return {dq, dk, db, dv, dbeta};
}

}  // namespace fastattn::cpu
