// Argument checks of the ops of fastattn.linear's chunked training path
// (linear_state_scan / linear_state_scan_bwd: the two scans over chunks;
// linear_chunk_bwd_local: the chunk-local gradients), shared by the CPU and
// CUDA backends (schemas and the math: csrc/ops.cpp).
//
// Chunk layout: (B, HV, N, 64, .) contiguous, every chunk of every
// (batch, value head) padded to 64 rows; states (B, HV, K, V); per-chunk
// decays (B, HV, N). States and decays are float32, float64 for float64
// inputs.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace fastattn {

struct LinearScanProblem {
  static constexpr int64_t kChunk = 64;
  int64_t B, HV, N, K, V;
  at::ScalarType state_dtype;
};

namespace linear_scan_detail {

using Named = std::pair<const at::Tensor*, const char*>;

inline void check_rows(const char* op, const at::Tensor& t, const char* name, const LinearScanProblem& s,
                       int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 5 && t.size(0) == s.B && t.size(1) == s.HV && t.size(2) == s.N &&
                  t.size(3) == LinearScanProblem::kChunk && t.size(4) == cols,
              "fastattn.", op, ": ", name, " must have shape (", s.B, ", ", s.HV, ", ", s.N, ", ",
              LinearScanProblem::kChunk, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastattn.", op, ": ", name, " must be ", dtype, " like the other "
              "chunk operands, got ", t.scalar_type());
}

inline void check_state(const char* op, const at::Tensor& t, const char* name, const LinearScanProblem& s) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.HV && t.size(2) == s.K && t.size(3) == s.V,
              "fastattn.", op, ": ", name, " must have shape (", s.B, ", ", s.HV, ", ", s.K, ", ", s.V,
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == s.state_dtype, "fastattn.", op, ": ", name, " must be ", s.state_dtype,
              ", got ", t.scalar_type());
}

// rows_k: an operand of K columns (its sizes fix B, HV, N, K); rows_v: one of V columns;
// `all`: the tensors that must share rows_k's device (nullptr entries skipped).
inline LinearScanProblem chunk_sizes(const char* op, const at::Tensor& rows_k, const char* k_name,
                                     const at::Tensor& rows_v, const char* v_name, std::initializer_list<Named> all) {
  TORCH_CHECK(rows_k.dim() == 5 && rows_v.dim() == 5, "fastattn.", op, ": ", k_name, " and ", v_name,
              " must be (B, HV, chunks, 64, .), got ", rows_k.sizes(), " and ", rows_v.sizes());
  TORCH_CHECK(at::isFloatingType(rows_k.scalar_type()), "fastattn.", op, ": ", k_name,
              " must be a floating dtype, got ", rows_k.scalar_type());
  LinearScanProblem s;
  s.B = rows_k.size(0), s.HV = rows_k.size(1), s.N = rows_k.size(2), s.K = rows_k.size(4);
  s.V = rows_v.size(4);
  s.state_dtype = rows_k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : all) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == rows_k.device(), "fastattn.", op, ": ", name, " is on ", t->device(),
                  ", ", k_name, " on ", rows_k.device());
    }
  }
  return s;
}

// One value per token of the chunk layout, (B, HV, N, 64) in the state dtype (b, g, beta).
inline void check_per_token(const char* op, const at::Tensor& t, const char* name, const LinearScanProblem& s) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.HV && t.size(2) == s.N &&
                  t.size(3) == LinearScanProblem::kChunk,
              "fastattn.", op, ": ", name, " must have shape (", s.B, ", ", s.HV, ", ", s.N, ", ",
              LinearScanProblem::kChunk, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == s.state_dtype, "fastattn.", op, ": ", name, " must be ", s.state_dtype,
              ", got ", t.scalar_type());
}

// The scans' operands: chunk_sizes plus decay_last (B, HV, N) in the state dtype.
inline LinearScanProblem check_common(const char* op, const at::Tensor& rows_k, const char* k_name,
                                      const at::Tensor& rows_v, const char* v_name,
                                      const at::Tensor& decay_last, std::initializer_list<Named> all) {
  const LinearScanProblem s = chunk_sizes(op, rows_k, k_name, rows_v, v_name, all);
  TORCH_CHECK(decay_last.dim() == 3 && decay_last.size(0) == s.B && decay_last.size(1) == s.HV &&
                  decay_last.size(2) == s.N,
              "fastattn.", op, ": decay_last must have shape (", s.B, ", ", s.HV, ", ", s.N, "), got ",
              decay_last.sizes());
  TORCH_CHECK(decay_last.scalar_type() == s.state_dtype, "fastattn.", op, ": decay_last must be ",
              s.state_dtype, ", got ", decay_last.scalar_type());
  return s;
}

}  // namespace linear_scan_detail

// linear_state_scan: qt, kt, w (B, HV, N, 64, K); u, o_intra (B, HV, N, 64, V).
inline LinearScanProblem check_linear_state_scan_args(const at::Tensor& qt, const at::Tensor& kt,
                                                      const at::Tensor& u, const std::optional<at::Tensor>& w,
                                                      const at::Tensor& o_intra, const at::Tensor& decay_last,
                                                      const std::optional<at::Tensor>& initial_state) {
  using namespace linear_scan_detail;
  constexpr const char* op = "linear_state_scan";
  const LinearScanProblem s =
      check_common(op, qt, "qt", u, "u", decay_last,
                   {{&kt, "kt"}, {&u, "u"}, {w ? &*w : nullptr, "w"}, {&o_intra, "o_intra"},
                    {&decay_last, "decay_last"}, {initial_state ? &*initial_state : nullptr, "initial_state"}});
  TORCH_CHECK(u.sizes() == o_intra.sizes(), "fastattn.", op, ": u and o_intra must have one shape, got ",
              u.sizes(), " and ", o_intra.sizes());
  const at::ScalarType dt = qt.scalar_type();
  check_rows(op, qt, "qt", s, s.K, dt);
  check_rows(op, kt, "kt", s, s.K, dt);
  if (w) check_rows(op, *w, "w", s, s.K, dt);
  check_rows(op, u, "u", s, s.V, dt);
  check_rows(op, o_intra, "o_intra", s, s.V, dt);
  if (initial_state) check_state(op, *initial_state, "initial_state", s);
  return s;
}

// linear_state_scan_bwd: qs, kt, w (B, HV, N, 64, K); x, dout (B, HV, N, 64, V).
inline LinearScanProblem check_linear_state_scan_bwd_args(const at::Tensor& qs, const at::Tensor& kt,
                                                          const std::optional<at::Tensor>& w,
                                                          const at::Tensor& x, const at::Tensor& dout,
                                                          const at::Tensor& decay_last,
                                                          const std::optional<at::Tensor>& dfinal) {
  using namespace linear_scan_detail;
  constexpr const char* op = "linear_state_scan_bwd";
  const LinearScanProblem s =
      check_common(op, qs, "qs", dout, "dout", decay_last,
                   {{&kt, "kt"}, {w ? &*w : nullptr, "w"}, {&x, "x"}, {&dout, "dout"},
                    {&decay_last, "decay_last"}, {dfinal ? &*dfinal : nullptr, "dfinal"}});
  TORCH_CHECK(x.sizes() == dout.sizes(), "fastattn.", op, ": x and dout must have one shape, got ", x.sizes(),
              " and ", dout.sizes());
  const at::ScalarType dt = qs.scalar_type();
  check_rows(op, qs, "qs", s, s.K, dt);
  check_rows(op, kt, "kt", s, s.K, dt);
  if (w) check_rows(op, *w, "w", s, s.K, dt);
  check_rows(op, x, "x", s, s.V, dt);
  check_rows(op, dout, "dout", s, s.V, dt);
  if (dfinal) check_state(op, *dfinal, "dfinal", s);
  return s;
}

// linear_chunk_bwd_local: q, k (B, HV, N, 64, K); v, dout (B, HV, N, 64, V); b (B, HV, N, 64)
// and the chunk states and their gradients (B, HV, N, K, V) in the state dtype.
inline LinearScanProblem check_linear_chunk_bwd_local_args(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& dout,
                                                           const at::Tensor& b, const at::Tensor& states,
                                                           const at::Tensor& dstates,
                                                           const std::optional<at::Tensor>& beta,
                                                           const std::optional<at::Tensor>& u,
                                                           const std::optional<at::Tensor>& du) {
  using namespace linear_scan_detail;
  constexpr const char* op = "linear_chunk_bwd_local";
  const LinearScanProblem s =
      chunk_sizes(op, q, "q", v, "v",
                  {{&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&b, "b"}, {&states, "chunk_states"},
                   {&dstates, "chunk_dstates"}, {beta ? &*beta : nullptr, "beta"}, {u ? &*u : nullptr, "u"},
                   {du ? &*du : nullptr, "du"}});
  const at::ScalarType dt = q.scalar_type();
  check_rows(op, q, "q", s, s.K, dt);
  check_rows(op, k, "k", s, s.K, dt);
  check_rows(op, v, "v", s, s.V, dt);
  check_rows(op, dout, "dout", s, s.V, dt);
  check_per_token(op, b, "b", s);
  for (const auto& [t, name] : {Named{&states, "chunk_states"}, Named{&dstates, "chunk_dstates"}}) {
    TORCH_CHECK(t->dim() == 5 && t->size(0) == s.B && t->size(1) == s.HV && t->size(2) == s.N &&
                    t->size(3) == s.K && t->size(4) == s.V,
                "fastattn.", op, ": ", name, " must have shape (", s.B, ", ", s.HV, ", ", s.N, ", ", s.K, ", ",
                s.V, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == s.state_dtype, "fastattn.", op, ": ", name, " must be ", s.state_dtype,
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(beta.has_value() == u.has_value() && u.has_value() == du.has_value(), "fastattn.", op,
              ": the delta rule needs beta, u and du together");
  if (beta) {
    TORCH_CHECK(beta->sizes() == b.sizes() && beta->scalar_type() == s.state_dtype, "fastattn.", op,
                ": beta must be ", s.state_dtype, " of b's shape ", b.sizes(), ", got ", beta->scalar_type(), " ",
                beta->sizes());
    check_rows(op, *u, "u", s, s.V, dt);
    check_rows(op, *du, "du", s, s.V, dt);
  }
  return s;
}

// linear_chunk_prepare: q, k (B, HV, N, 64, K); v (B, HV, N, 64, V); g, beta (B, HV, N, 64).
inline LinearScanProblem check_linear_chunk_prepare_args(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& g,
                                                         const at::Tensor& beta) {
  using namespace linear_scan_detail;
  constexpr const char* op = "linear_chunk_prepare";
  const LinearScanProblem s =
      chunk_sizes(op, q, "q", v, "v", {{&k, "k"}, {&v, "v"}, {&g, "g"}, {&beta, "beta"}});
  const at::ScalarType dt = q.scalar_type();
  check_rows(op, q, "q", s, s.K, dt);
  check_rows(op, k, "k", s, s.K, dt);
  check_rows(op, v, "v", s, s.V, dt);
  check_per_token(op, g, "g", s);
  check_per_token(op, beta, "beta", s);
  return s;
}

}  // namespace fastattn
