// The dropout ops' kernels: resolve one call's (seed, offset) on the device
// (so that graph replays draw new ones), and expand a call's keep mask
// (dropout.h's rule, the same the attention kernels apply).
#include "cuda/common/dropout.h"
#include "cuda/dropout/dropout_rng.h"

namespace fastattn {
namespace gpu {
namespace {

__global__ void dropout_seed_kernel(const PhiloxSeedArgs a) {
  if (a.seed_ptr != nullptr) {
    a.out[0] = *a.seed_ptr;
    a.out[1] = static_cast<int64_t>(static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph);
  } else {
    a.out[0] = static_cast<int64_t>(a.seed);
    a.out[1] = static_cast<int64_t>(a.offset);
  }
}

// One thread per (bh, i, 4 consecutive j).
__global__ void dropout_mask_kernel(const int64_t* rng_state, uint32_t threshold, int64_t rows,
                                    int64_t seqlen_q, int64_t seqlen_k, bool* keep) {
  const int64_t quads = (seqlen_k + 3) / 4;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * quads) return;
  const int64_t row = t / quads, j0 = (t % quads) * 4;
  const int64_t bh = row / seqlen_q, i = row % seqlen_q;
  const DropoutStream s = DropoutStream::make(static_cast<uint64_t>(rng_state[0]),
                                              static_cast<uint64_t>(rng_state[1]),
                                              static_cast<uint64_t>(bh));
  for (int64_t j = j0; j < j0 + 4 && j < seqlen_k; ++j) keep[row * seqlen_k + j] = s.keep(i, j, threshold);
}

}  // namespace

cudaError_t run_dropout_seed(const PhiloxSeedArgs& args, cudaStream_t stream) {
  dropout_seed_kernel<<<1, 1, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t run_dropout_mask(const int64_t* rng_state, uint32_t threshold, int64_t batch_heads,
                             int64_t seqlen_q, int64_t seqlen_k, bool* keep, cudaStream_t stream) {
  const int64_t work = batch_heads * seqlen_q * ((seqlen_k + 3) / 4);
  if (work == 0) return cudaSuccess;
  const int threads = 256;
  dropout_mask_kernel<<<static_cast<unsigned>((work + threads - 1) / threads), threads, 0, stream>>>(
      rng_state, threshold, batch_heads * seqlen_q, seqlen_q, seqlen_k, keep);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastattn
