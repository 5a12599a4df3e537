// Host-side launchers of the dropout ops' small kernels (dropout_seed,
// dropout_mask). Torch-free like cuda/flash/launch.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastattn {
namespace gpu {

// torch's Philox state of one call: plain values, or (under CUDA-graph
// capture) pointers to the seed and the graph's base offset that the kernel
// reads at replay, plus the offset of this call within the graph.
struct PhiloxSeedArgs {
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;    // captured: read at run time
  const int64_t* offset_ptr = nullptr;  // captured: read at run time
  uint64_t offset_intragraph = 0;
  int64_t* out = nullptr;  // (seed, offset)
};
cudaError_t run_dropout_seed(const PhiloxSeedArgs& args, cudaStream_t stream);

// keep[bh, i, j] for bh < batch_heads, i < seqlen_q, j < seqlen_k (bool, contiguous).
cudaError_t run_dropout_mask(const int64_t* rng_state, uint32_t threshold, int64_t batch_heads,
                             int64_t seqlen_q, int64_t seqlen_k, bool* keep, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
