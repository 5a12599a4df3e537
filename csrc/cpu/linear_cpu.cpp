// CPU linear-attention recurrence, forward and backward (linear_cpu.h has the
// recurrence). One work item per (sequence, value head) runs the steps in
// order; the backward replays the forward one chunk at a time from the
// checkpointed states and walks that chunk's steps backwards:
//     dS     += scale q_t do_t^T,            dq_t = scale S_t do_t
//     plain:  dk_t = dS v_t, dv_t = dS^T k_t, dS' = dS
//     delta:  u = v_t - S'^T k_t, du = beta dS^T k_t, dbeta = k_t^T dS u,
//             dk_t = beta dS u - S' du, dv_t = du, dS' = dS - k_t du^T
//     decay:  dg_i = sum_j dS'_ij S'_ij (summed over i for a scalar g),
//             dS_{t-1} = diag(exp(g_t)) dS'
// dq / dk are formed per value head and summed over each qk head's group.
#include "cpu/linear_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_common.h"

namespace fastattn::cpu {
namespace {

struct LinearShape {
  int64_t B, T, H, HV, K, V, N, group;
  bool varlen, g_per_key;
};

// Steps [begin, end) of T and the batch row of sequence n.
struct Span {
  int64_t b, begin, end;
};

Span span_of(const LinearShape& s, const int32_t* cu, int64_t n) {
  if (!s.varlen) return {n, 0, s.T};
  return {0, cu[n], cu[n + 1]};
}

// Checkpoint slot of chunk c of sequence n (linear_checkpoint_slots in linear_cpu.h).
int64_t ckpt_slot(const LinearShape& s, const int32_t* cu, int64_t n, int64_t c, int64_t chunk) {
  if (!s.varlen) return n * ((s.T + chunk - 1) / chunk) + c;
  return cu[n] / chunk + n + c;
}

LinearShape shape_of(const at::Tensor& q, const at::Tensor& v, const std::optional<at::Tensor>& g,
                     const std::optional<at::Tensor>& cu_seqlens) {
  LinearShape s;
  s.B = q.size(0);
  s.T = q.size(1);
  s.H = q.size(2);
  s.K = q.size(3);
  s.HV = v.size(2);
  s.V = v.size(3);
  s.varlen = cu_seqlens.has_value();
  s.N = s.varlen ? cu_seqlens->numel() - 1 : s.B;
  s.group = s.HV / s.H;
  s.g_per_key = g.has_value() && g->dim() == 4;
  return s;
}

// Decay factors of step t for value head hv: one per key row (K of them), or
// one for all rows (d[0]); 1 without g.
template <typename acc_t>
void decay_of(const LinearShape& s, const acc_t* g, int64_t b, int64_t t, int64_t hv, acc_t* d) {
  if (g == nullptr) {
    for (int64_t i = 0; i < s.K; ++i) d[i] = acc_t(1);
    return;
  }
  if (s.g_per_key) {
    const acc_t* gr = g + ((b * s.T + t) * s.HV + hv) * s.K;
    for (int64_t i = 0; i < s.K; ++i) d[i] = std::exp(gr[i]);
  } else {
    const acc_t e = std::exp(g[(b * s.T + t) * s.HV + hv]);
    for (int64_t i = 0; i < s.K; ++i) d[i] = e;
  }
}

// One step of the recurrence on S (K x V, row i = key channel): S <- S_t;
// u receives v_t - S'^T k_t (delta).
template <typename acc_t>
void step(const LinearShape& s, acc_t* S, const acc_t* d, const acc_t* k, const acc_t* v,
          acc_t beta, bool delta, acc_t* u) {
  const int64_t K = s.K, V = s.V;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < V; ++j) S[i * V + j] *= d[i];
  if (delta) {
    for (int64_t j = 0; j < V; ++j) u[j] = v[j];
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) u[j] -= S[i * V + j] * k[i];
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) S[i * V + j] += beta * k[i] * u[j];
  } else {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < V; ++j) S[i * V + j] += k[i] * v[j];
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& beta,
                  const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& cu,
                  int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "fastattn.linear: q, k (B, T, H, K) and v (B, T, HV, V) expected");
  TORCH_CHECK(v.size(2) % q.size(2) == 0, "fastattn.linear: value heads must be a multiple of q/k heads");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "fastattn.linear: the CPU kernels take contiguous q, k, v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn.linear: q, k, v must share a dtype");
  TORCH_CHECK(chunk > 0, "fastattn.linear: chunk must be positive");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check_aux = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t) return;
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous(), "fastattn.linear: ", name,
                " must be contiguous ", acc == at::kDouble ? "float64" : "float32");
  };
  check_aux(g, "g");
  check_aux(beta, "beta");
  check_aux(h0, "initial_state");
  if (cu) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 2 && q.size(0) == 1,
                "fastattn.linear: cu_seqlens must be int32 (N + 1) with batch 1");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, double scale, bool delta, int64_t chunk) {
  check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk);
  const LinearShape s = shape_of(q, v, g, cu_seqlens);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cu = cu_seqlens ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* cu_ptr = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  if (s.varlen) {
    bool ok = cu_ptr[0] == 0 && cu_ptr[s.N] == s.T;
    for (int64_t n = 0; n < s.N; ++n) ok = ok && cu_ptr[n] <= cu_ptr[n + 1];
    TORCH_CHECK(ok, "fastattn.linear: cu_seqlens must be non-decreasing from 0 to T = ", s.T);
  }
  auto out = at::empty(v.sizes(), v.options());
  auto final_state = at::empty({s.N, s.HV, s.K, s.V}, q.options().dtype(acc_dtype));
  // Zeroed: varlen leaves slots between sequences unused.
  auto ckpt = at::zeros({linear_checkpoint_slots(s.B, s.T, s.N, s.varlen, chunk), s.HV, s.K, s.V},
                        q.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_fwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* gp = g ? g->data_ptr<acc_t>() : nullptr;
    const acc_t* bp = beta ? beta->data_ptr<acc_t>() : nullptr;
    const acc_t* h0 = initial_state ? initial_state->data_ptr<acc_t>() : nullptr;
    acc_t* fp = final_state.data_ptr<acc_t>();
    acc_t* cp = ckpt.data_ptr<acc_t>();
    const int64_t KV = s.K * s.V;
    at::parallel_for(0, s.N * s.HV, 1, [&](int64_t w0, int64_t w1) {
      std::vector<acc_t> S(KV), d(s.K), qr(s.K), kr(s.K), vr(s.V), u(s.V);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t n = w / s.HV, hv = w % s.HV, h = hv / s.group;
        const Span sp = span_of(s, cu_ptr, n);
        for (int64_t x = 0; x < KV; ++x) S[x] = h0 ? h0[w * KV + x] : acc_t(0);
        for (int64_t t = sp.begin; t < sp.end; ++t) {
          const int64_t l = t - sp.begin;
          if (l % chunk == 0) {
            std::copy(S.begin(), S.end(),
                      cp + (ckpt_slot(s, cu_ptr, n, l / chunk, chunk) * s.HV + hv) * KV);
          }
          load_row(qr.data(), qp + ((sp.b * s.T + t) * s.H + h) * s.K, s.K);
          load_row(kr.data(), kp + ((sp.b * s.T + t) * s.H + h) * s.K, s.K);
          load_row(vr.data(), vp + ((sp.b * s.T + t) * s.HV + hv) * s.V, s.V);
          decay_of(s, gp, sp.b, t, hv, d.data());
          const acc_t b_t = bp ? bp[(sp.b * s.T + t) * s.HV + hv] : acc_t(1);
          step(s, S.data(), d.data(), kr.data(), vr.data(), b_t, delta, u.data());
          scalar_t* o_row = op + ((sp.b * s.T + t) * s.HV + hv) * s.V;
          for (int64_t j = 0; j < s.V; ++j) {
            acc_t acc = 0;
            for (int64_t i = 0; i < s.K; ++i) acc += S[i * s.V + j] * qr[i];
            o_row[j] = static_cast<scalar_t>(acc * acc_t(scale));
          }
        }
        std::copy(S.begin(), S.end(), fp + w * KV);
      }
    });
  });
  return {out, final_state, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& checkpoints, double scale,
    bool delta, int64_t chunk) {
  check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk);
  TORCH_CHECK(dout.sizes() == v.sizes() && dout.scalar_type() == v.scalar_type(),
              "fastattn.linear: dout must match v");
  const LinearShape s = shape_of(q, v, g, cu_seqlens);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = q.options().dtype(acc_dtype);
  const at::Tensor cu = cu_seqlens ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* cu_ptr = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  const at::Tensor dO = dout.contiguous();
  const at::Tensor dF = dfinal ? dfinal->to(acc_dtype).contiguous() : at::Tensor();
  TORCH_CHECK(!dF.defined() || dF.sizes() == at::IntArrayRef({s.N, s.HV, s.K, s.V}),
              "fastattn.linear: final-state gradient has the wrong shape");
  TORCH_CHECK(checkpoints.dim() == 4 &&
                  checkpoints.size(0) == linear_checkpoint_slots(s.B, s.T, s.N, s.varlen, chunk) &&
                  checkpoints.size(1) == s.HV && checkpoints.scalar_type() == acc_dtype &&
                  checkpoints.is_contiguous(),
              "fastattn.linear: checkpoints do not come from linear_fwd with these inputs");
  // dq / dk per value head, summed over each group at the end.
  auto dq_v = at::zeros({s.B, s.T, s.HV, s.K}, acc_opts);
  auto dk_v = at::zeros({s.B, s.T, s.HV, s.K}, acc_opts);
  auto dv = at::zeros(v.sizes(), acc_opts);
  // Inputs that were None get empty (0-element) gradients.
  auto dg = g ? at::zeros(g->sizes(), acc_opts) : at::empty({0}, acc_opts);
  auto dbeta = beta ? at::zeros(beta->sizes(), acc_opts) : at::empty({0}, acc_opts);
  auto dh0 = initial_state ? at::empty(initial_state->sizes(), acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_bwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* dop = dO.data_ptr<scalar_t>();
    const acc_t* gp = g ? g->data_ptr<acc_t>() : nullptr;
    const acc_t* bp = beta ? beta->data_ptr<acc_t>() : nullptr;
    const acc_t* cp = checkpoints.data_ptr<acc_t>();
    const acc_t* dfp = dF.defined() ? dF.data_ptr<acc_t>() : nullptr;
    acc_t* dqp = dq_v.data_ptr<acc_t>();
    acc_t* dkp = dk_v.data_ptr<acc_t>();
    acc_t* dvp = dv.data_ptr<acc_t>();
    acc_t* dgp = g ? dg.data_ptr<acc_t>() : nullptr;
    acc_t* dbp = beta ? dbeta.data_ptr<acc_t>() : nullptr;
    acc_t* dh0p = initial_state ? dh0.data_ptr<acc_t>() : nullptr;
    const int64_t KV = s.K * s.V;
    const acc_t sc = acc_t(scale);
    at::parallel_for(0, s.N * s.HV, 1, [&](int64_t w0, int64_t w1) {
      // states[l]: S after step l of the chunk being replayed.
      std::vector<acc_t> states(chunk * KV), dS(KV), Sp(KV), d(s.K), qr(s.K), kr(s.K), vr(s.V),
          u(s.V), du(s.V), dor(s.V);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t n = w / s.HV, hv = w % s.HV, h = hv / s.group;
        const Span sp = span_of(s, cu_ptr, n);
        const int64_t len = sp.end - sp.begin;
        for (int64_t x = 0; x < KV; ++x) dS[x] = dfp ? dfp[w * KV + x] : acc_t(0);
        for (int64_t c = (len + chunk - 1) / chunk - 1; c >= 0; --c) {
          const int64_t ts = sp.begin + c * chunk;
          const int64_t te = std::min(ts + chunk, sp.end);
          const acc_t* S0 = cp + (ckpt_slot(s, cu_ptr, n, c, chunk) * s.HV + hv) * KV;
          // Replay the chunk.
          for (int64_t t = ts; t < te; ++t) {
            acc_t* St = states.data() + (t - ts) * KV;
            std::copy(t == ts ? S0 : St - KV, (t == ts ? S0 : St - KV) + KV, St);
            load_row(kr.data(), kp + ((sp.b * s.T + t) * s.H + h) * s.K, s.K);
            load_row(vr.data(), vp + ((sp.b * s.T + t) * s.HV + hv) * s.V, s.V);
            decay_of(s, gp, sp.b, t, hv, d.data());
            const acc_t b_t = bp ? bp[(sp.b * s.T + t) * s.HV + hv] : acc_t(1);
            step(s, St, d.data(), kr.data(), vr.data(), b_t, delta, u.data());
          }
          for (int64_t t = te - 1; t >= ts; --t) {
            const int64_t row = sp.b * s.T + t;
            const acc_t* St = states.data() + (t - ts) * KV;
            const acc_t* Sprev = t == ts ? S0 : St - KV;
            load_row(qr.data(), qp + (row * s.H + h) * s.K, s.K);
            load_row(kr.data(), kp + (row * s.H + h) * s.K, s.K);
            load_row(vr.data(), vp + (row * s.HV + hv) * s.V, s.V);
            load_row(dor.data(), dop + (row * s.HV + hv) * s.V, s.V);
            decay_of(s, gp, sp.b, t, hv, d.data());
            const acc_t b_t = bp ? bp[row * s.HV + hv] : acc_t(1);
            acc_t* dq_row = dqp + (row * s.HV + hv) * s.K;
            acc_t* dk_row = dkp + (row * s.HV + hv) * s.K;
            acc_t* dv_row = dvp + (row * s.HV + hv) * s.V;
            // Output: o_t = scale S_t^T q_t.
            for (int64_t i = 0; i < s.K; ++i) {
              acc_t acc = 0;
              for (int64_t j = 0; j < s.V; ++j) {
                acc += St[i * s.V + j] * dor[j];
                dS[i * s.V + j] += sc * qr[i] * dor[j];
              }
              dq_row[i] = sc * acc;
            }
            for (int64_t i = 0; i < s.K; ++i)
              for (int64_t j = 0; j < s.V; ++j) Sp[i * s.V + j] = d[i] * Sprev[i * s.V + j];
            if (delta) {
              for (int64_t j = 0; j < s.V; ++j) {
                acc_t uj = vr[j], duj = 0;
                for (int64_t i = 0; i < s.K; ++i) {
                  uj -= Sp[i * s.V + j] * kr[i];
                  duj += dS[i * s.V + j] * kr[i];
                }
                u[j] = uj;
                du[j] = b_t * duj;
              }
              acc_t db = 0;
              for (int64_t i = 0; i < s.K; ++i) {
                acc_t a = 0, b2 = 0;
                for (int64_t j = 0; j < s.V; ++j) {
                  a += dS[i * s.V + j] * u[j];
                  b2 += Sp[i * s.V + j] * du[j];
                }
                db += kr[i] * a;
                dk_row[i] = b_t * a - b2;
              }
              if (dbp) dbp[row * s.HV + hv] = db;
              for (int64_t j = 0; j < s.V; ++j) dv_row[j] = du[j];
              for (int64_t i = 0; i < s.K; ++i)
                for (int64_t j = 0; j < s.V; ++j) dS[i * s.V + j] -= kr[i] * du[j];
            } else {
              for (int64_t i = 0; i < s.K; ++i) {
                acc_t a = 0;
                for (int64_t j = 0; j < s.V; ++j) a += dS[i * s.V + j] * vr[j];
                dk_row[i] = a;
              }
              for (int64_t j = 0; j < s.V; ++j) {
                acc_t a = 0;
                for (int64_t i = 0; i < s.K; ++i) a += dS[i * s.V + j] * kr[i];
                dv_row[j] = a;
              }
            }
            // dS is now dS'; the decay's gradient, then dS_{t-1}.
            if (dgp) {
              if (s.g_per_key) {
                acc_t* dg_row = dgp + (row * s.HV + hv) * s.K;
                for (int64_t i = 0; i < s.K; ++i) {
                  acc_t a = 0;
                  for (int64_t j = 0; j < s.V; ++j) a += dS[i * s.V + j] * Sp[i * s.V + j];
                  dg_row[i] = a;
                }
              } else {
                acc_t a = 0;
                for (int64_t x = 0; x < KV; ++x) a += dS[x] * Sp[x];
                dgp[row * s.HV + hv] = a;
              }
            }
            for (int64_t i = 0; i < s.K; ++i)
              for (int64_t j = 0; j < s.V; ++j) dS[i * s.V + j] *= d[i];
          }
        }
        if (dh0p) std::copy(dS.begin(), dS.end(), dh0p + w * KV);
      }
    });
  });
  auto dq = dq_v.view({s.B, s.T, s.H, s.group, s.K}).sum(3);
  auto dk = dk_v.view({s.B, s.T, s.H, s.group, s.K}).sum(3);
  return {dq, dk, dv, dg, dbeta, dh0};
}

}  // namespace fastattn::cpu
