// CUDA glue of dropout_seed and dropout_mask (schemas: csrc/ops.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "cuda/common/dropout.h"
#include "cuda/dropout/dropout_rng.h"
#include "torch/attention_problem.h"
#include "torch/cuda_glue.h"

namespace fastattn {
namespace {

// torch's graph-safe Philox state (what its own fused dropout kernels use):
// under capture, seed and offset come from device memory at replay time.
at::Tensor dropout_seed_cuda(const at::Tensor& like, int64_t increment) {
  TORCH_CHECK(increment >= 0, "fastattn: dropout_seed increment must be >= 0, got ", increment);
  c10::cuda::CUDAGuard guard(like.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(static_cast<uint64_t>(increment));
  }
  at::Tensor out = at::empty({2}, like.options().dtype(at::kLong));
  gpu::PhiloxSeedArgs a;
  if (state.captured_) {
    a.seed_ptr = state.seed_.ptr;
    a.offset_ptr = state.offset_.ptr;
    a.offset_intragraph = state.offset_intragraph_;
  } else {
    a.seed = state.seed_.val;
    a.offset = state.offset_.val;
  }
  a.out = out.data_ptr<int64_t>();
  glue::check_launch(gpu::run_dropout_seed(a, at::cuda::getCurrentCUDAStream()), "dropout_seed");
  return out;
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                             int64_t seqlen_q, int64_t seqlen_k, double dropout_p) {
  check_dropout_mask_args(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p);
  c10::cuda::CUDAGuard guard(rng_state.device());
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  if (dropout_p <= 0.0) return keep.fill_(true);
  const at::Tensor rng = rng_state.contiguous();
  glue::check_launch(gpu::run_dropout_mask(rng.data_ptr<int64_t>(), dropout_threshold(dropout_p),
                                           batch * heads, seqlen_q, seqlen_k, keep.data_ptr<bool>(),
                                           at::cuda::getCurrentCUDAStream()),
                     "dropout_mask");
  return keep;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("dropout_seed", &fastattn::dropout_seed_cuda);
  m.impl("dropout_mask", &fastattn::dropout_mask_cuda);
}
