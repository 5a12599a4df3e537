// Attention dropout on the CPU: the same mask as the CUDA kernels (the rule of
// cuda/common/dropout.h, evaluated one pair at a time), and the dropout_seed /
// dropout_mask ops.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/common/dropout.h"

namespace fastattn::cpu {

// One call's dropout (off when rng_state is undefined: checked_dropout's result).
struct CpuDropout {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 256;
  double keep_scale = 1.0;

  static CpuDropout make(double dropout_p, const at::Tensor& rng_state) {
    CpuDropout d;
    if (!rng_state.defined()) return d;
    const at::Tensor s = rng_state.cpu();
    d.on = true;
    d.seed = static_cast<uint64_t>(s.data_ptr<int64_t>()[0]);
    d.offset = static_cast<uint64_t>(s.data_ptr<int64_t>()[1]);
    d.threshold = dropout_threshold(dropout_p);
    d.keep_scale = dropout_keep_scale(d.threshold);
    return d;
  }
  DropoutStream stream(int64_t bh) const {
    return DropoutStream::make(seed, offset, static_cast<uint64_t>(bh));
  }
  // The factor of probability (i, j) of stream `s` where it meets V: 0 or 1 / keep.
  template <typename acc_t>
  acc_t weight(const DropoutStream& s, int64_t i, int64_t j) const {
    return s.keep(i, j, threshold) ? static_cast<acc_t>(keep_scale) : acc_t(0);
  }
};

at::Tensor dropout_seed_cpu(const at::Tensor& like, int64_t increment);
at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                            int64_t seqlen_q, int64_t seqlen_k, double dropout_p);

}  // namespace fastattn::cpu
