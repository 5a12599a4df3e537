// dropout_seed and dropout_mask on the CPU (schemas: csrc/ops.cpp).
#include "cpu/dropout_cpu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>

#include "torch/attention_problem.h"

namespace fastattn::cpu {

at::Tensor dropout_seed_cpu(const at::Tensor& like, int64_t increment) {
  TORCH_CHECK(increment >= 0, "fastattn: dropout_seed increment must be >= 0, got ", increment);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt,
                                                                 at::detail::getDefaultCPUGenerator());
  uint64_t seed, offset;
  {
    // The CPU generator is a Mersenne twister: both words are drawn from it,
    // so torch.manual_seed reproduces them.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
    offset = gen->random64();
  }
  at::Tensor out = at::empty({2}, like.options().dtype(at::kLong).device(at::kCPU));
  out.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  out.data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
  return out;
}

at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                            int64_t seqlen_q, int64_t seqlen_k, double dropout_p) {
  check_dropout_mask_args(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p);
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  const CpuDropout d = CpuDropout::make(dropout_p > 0 ? dropout_p : 0.0,
                                        dropout_p > 0 ? rng_state : at::Tensor());
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, batch * heads * seqlen_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / seqlen_q, i = row % seqlen_q;
      const DropoutStream s = d.stream(bh);
      for (int64_t j = 0; j < seqlen_k; ++j) out[row * seqlen_k + j] = !d.on || s.keep(i, j, d.threshold);
    }
  });
  return keep;
}

}  // namespace fastattn::cpu
