// Calls fastattn::fwd and fastattn::bwd through the dispatcher (no Python)
// and checks them against a naive float64 computation.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/common/bwd_cta_order.h"
#include "cuda/common/fast_div.h"
#include "cuda/flash/fwd_tile_order.h"

namespace {

using FwdFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t, double, bool, int64_t, int64_t, bool, bool,
    double, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
    int64_t, double, bool, int64_t, int64_t, bool, bool, double, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&);

// Naive causal (bottom-right) GQA attention in float64 over (B, S, H, D).
std::tuple<at::Tensor, at::Tensor> naive(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, double scale) {
  const int64_t sq = q.size(1), sk = k.size(1), group = q.size(2) / k.size(2);
  auto qd = q.to(at::kDouble).transpose(1, 2);
  auto kd = k.to(at::kDouble).transpose(1, 2).repeat_interleave(group, 1);
  auto vd = v.to(at::kDouble).transpose(1, 2).repeat_interleave(group, 1);
  auto s = at::matmul(qd, kd.transpose(-1, -2)) * scale;
  auto i = at::arange(sq, at::kLong).unsqueeze(1);
  auto j = at::arange(sk, at::kLong).unsqueeze(0);
  s = s.masked_fill(j > i + (sk - sq), -INFINITY);
  auto lse = at::logsumexp(s, -1);
  auto out = at::matmul(at::exp(s - lse.unsqueeze(-1)), vd).transpose(1, 2);
  return {out, lse};
}

// The decode kernels' multiply-high division (cuda/common/fast_div.h), with the
// device formula replayed on the host: exact for divisors and numerators
// below 2^31 (all divisors up to 4096 at their edge numerators, then random
// ones from a fixed LCG).
bool check_fast_div() {
  uint64_t state = 12345;
  auto next = [&]() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);  // < 2^31
  };
  int64_t tried = 0, wrong = 0;
  auto one = [&](uint32_t d, uint32_t n) {
    const fastattn::FastDiv f = fastattn::make_fast_div(static_cast<int>(d));
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.mul) >> 32);
    const uint32_t q = (hi + n) >> f.shift;
    ++tried;
    if (q != n / d) ++wrong;
  };
  for (uint32_t d = 1; d <= 4096; ++d) {
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, 0x7ffffffeu, 0x7fffffffu}) one(d, n);
    for (int i = 0; i < 16; ++i) one(d, next());
  }
  for (int i = 0; i < 20000; ++i) {
    const uint32_t d = next() | 1u;
    one(d, next());
    one(d, 0x7fffffffu);
    one(d, d - 1);
  }
  std::printf("fast_div exact               %lld of %lld %s\n", static_cast<long long>(tried - wrong),
              static_cast<long long>(tried), wrong == 0 ? "ok" : "FAIL");
  return wrong == 0;
}

bool check(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  std::printf("%-28s max err %.3e (tol %.1e) %s\n", what, err, tol, err <= tol ? "ok" : "FAIL");
  return err <= tol;
}

}  // namespace

// The persistent forward's tile order (cuda/flash/fwd_tile_order.h): every
// (batch, head, query block) exactly once, and with longest_first the query
// blocks of a section non-increasing (the longest causal tiles start first).
bool check_tile_order() {
  long long bad = 0, total = 0;
  for (int num_m : {1, 3, 8, 17}) {
    for (int heads : {1, 5, 16}) {
      for (int batch : {1, 3}) {
        for (int mode = 0; mode < 3; ++mode) {
          const bool longest_first = mode > 0;
          // mode 2: a section of 4 pairs (kv bytes 1, L2 8) that does not divide the pairs
          fastattn::gpu::FwdTileOrder o;
          if (!fastattn::gpu::FwdTileOrder::make(o, num_m, heads, batch, longest_first,
                                                 mode == 2 ? 1 : 0, 8)) {
            ++bad;
            continue;
          }
          std::vector<int> seen(static_cast<size_t>(o.tiles), 0);
          int last_m = num_m, last_sec = -1;
          for (int t = 0; t < o.tiles; ++t) {
            int b = -1, h = -1, m = -1;
            o.coords(t, b, h, m);
            ++total;
            if (b < 0 || b >= batch || h < 0 || h >= heads || m < 0 || m >= num_m) {
              ++bad;
              continue;
            }
            ++seen[static_cast<size_t>((b * heads + h) * num_m + m)];
            const int sec = (b * heads + h) / o.section;
            if (longest_first) {
              if (sec == last_sec && m > last_m) ++bad;
              last_sec = sec;
              last_m = m;
            }
          }
          for (int c : seen) bad += c != 1;
        }
      }
    }
  }
  std::printf("tile order bijective        %lld tiles %s\n", total, bad == 0 ? "ok" : "WRONG");
  return bad == 0;
}

// The backward's CTA order (cuda/common/bwd_cta_order.h), which the persistent
// warp-specialized backward walks by number: every (KV block, head slot,
// sequence) of the grid exactly once, for plain and grouped orders.
bool check_bwd_cta_order() {
  long long bad = 0, total = 0;
  for (int nb : {1, 5, 16}) {
    for (int ny : {1, 3, 8}) {
      for (int nz : {1, 2, 7}) {
        for (int group : {1, 2, 3, 4, 64}) {
          std::vector<int> seen(static_cast<size_t>(nb * ny * nz), 0);
          for (int lin = 0; lin < nb * ny * nz; ++lin) {
            const fastattn::gpu::BwdCtaStart c = fastattn::gpu::bwd_cta_coords(lin, nb, ny, nz, group);
            ++total;
            if (c.n_first < 0 || c.n_first >= nb || c.slot < 0 || c.slot >= ny || c.b_first < 0 ||
                c.b_first >= nz) {
              ++bad;
              continue;
            }
            ++seen[static_cast<size_t>((c.b_first * ny + c.slot) * nb + c.n_first)];
          }
          for (int n : seen) bad += n != 1;
        }
      }
    }
  }
  std::printf("bwd CTA order bijective     %lld CTAs %s\n", total, bad == 0 ? "ok" : "WRONG");
  return bad == 0;
}

int main() {
  at::manual_seed(0);
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::fwd", "").typed<FwdFn>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::bwd", "").typed<BwdFn>();

  const double scale = 0.125;
  auto q = at::randn({2, 37, 4, 64});
  auto k = at::randn({2, 53, 2, 64});
  auto v = at::randn({2, 53, 2, 64});
  auto [out, lse] = fwd.call(q, k, v, std::nullopt, std::nullopt, 0, 0, scale, true, -1, -1, true,
                             false, 0.0, std::nullopt, 0.0, std::nullopt);
  auto [ref_out, ref_lse] = naive(q, k, v, scale);
  bool ok = check("fwd out (fp32)", out, ref_out, 1e-5);
  ok &= check("fwd lse (fp32)", lse, ref_lse, 1e-5);

  // Backward vs float64 autograd of the naive computation.
  auto qd = q.to(at::kDouble).set_requires_grad(true);
  auto kd = k.to(at::kDouble).set_requires_grad(true);
  auto vd = v.to(at::kDouble).set_requires_grad(true);
  auto dout = at::randn_like(out);
  auto ref = std::get<0>(naive(qd, kd, vd, scale));
  ref.backward(dout.to(at::kDouble));
  auto [dq, dk, dv] = bwd.call(dout, q, k, v, out, lse, std::nullopt, std::nullopt, 0, 0, scale,
                               true, -1, -1, true, false, 0.0, std::nullopt, std::nullopt, 0.0,
                               std::nullopt);
  ok &= check("bwd dq (fp32)", dq, qd.grad(), 1e-4);
  ok &= check("bwd dk (fp32)", dk, kd.grad(), 1e-4);
  ok &= check("bwd dv (fp32)", dv, vd.grad(), 1e-4);

  // Recursive attention: the merge of attention over two halves of the keys
  // is attention over all of them (non-causal, so the halves are independent).
  using MergeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&);
  auto merge = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("fastattn::merge_states", "")
                   .typed<MergeFn>();
  auto [full_out, full_lse] = fwd.call(q, k, v, std::nullopt, std::nullopt, 0, 0, scale, false,
                                       -1, -1, false, false, 0.0, std::nullopt, 0.0, std::nullopt);
  auto [oa, la] = fwd.call(q, k.narrow(1, 0, 20), v.narrow(1, 0, 20), std::nullopt, std::nullopt,
                           0, 0, scale, false, -1, -1, false, false, 0.0, std::nullopt, 0.0,
                           std::nullopt);
  auto [ob, lb] = fwd.call(q, k.narrow(1, 20, 33), v.narrow(1, 20, 33), std::nullopt,
                           std::nullopt, 0, 0, scale, false, -1, -1, false, false, 0.0,
                           std::nullopt, 0.0, std::nullopt);
  auto [merged, merged_lse] = merge.call(oa, la, ob, lb);
  ok &= check("merge_states out (fp32)", merged, full_out.to(at::kDouble), 1e-5);
  ok &= check("merge_states lse (fp32)", merged_lse, full_lse.to(at::kDouble), 1e-5);

  ok &= check_fast_div();
  ok &= check_tile_order();
  ok &= check_bwd_cta_order();

  // Bad input is an error, not a crash.
  try {
    fwd.call(q, k.narrow(2, 0, 1).expand({2, 53, 3, 64}), v, std::nullopt, std::nullopt, 0, 0,
             scale, false, -1, -1, false, false, 0.0, std::nullopt, 0.0, std::nullopt);
    std::printf("bad GQA heads: no error FAIL\n");
    ok = false;
  } catch (const c10::Error& e) {
    std::printf("bad GQA heads rejected        ok\n");
  }
  std::printf(ok ? "smoke: 1 passed, 0 failed\n" : "smoke: 0 passed, 1 failed\n");
  return ok ? 0 : 1;
}
